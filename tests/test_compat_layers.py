"""zope.testrunner runs the layered tests of the 1.x application (against
a real worker and Redis, through ``EndToEndLayer``) and of the testing
guide (``InlineLayer``, ``EagerLayer``), as their users run them."""
import os
import re
import sys

import pytest

from tests.processes import run_bounded


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 180


@pytest.fixture(scope='module')
def testrunner():
    """Run zope.testrunner once over both packages; return its output."""
    command = [sys.executable, '-m', 'zope.testrunner', '--test-path', ROOT,
               '-s', 'tests.compat1x', '-s', 'tests.guide',
               '--tests-pattern', '^layered_tests$', '-vv']
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, env.get('PYTHONPATH')) if p)
    # Its own process group: on a timeout, the worker it started goes too.
    return run_bounded(command, TIMEOUT, 'zope.testrunner', cwd=ROOT,
                       env=env)


def layer_summary(output, layer):
    """``(tests run, failures, errors)`` of *layer* in the output."""
    match = re.search(
        rf'Running {re.escape(layer)} tests:.*?Ran (\d+) tests with '
        rf'(\d+) failures, (\d+) errors', output, re.S)
    assert match, f'{layer} did not run:\n{output}'
    return tuple(int(n) for n in match.groups())


def test_all_layered_tests_pass(testrunner):
    returncode, output = testrunner
    assert returncode == 0, output
    assert 'Total: 12 tests, 0 failures, 0 errors' in output, output


def test_1x_application_passes_against_a_real_worker(testrunner):
    _, output = testrunner
    assert layer_summary(
        output, 'tests.compat1x.layers.Compat1xEndToEndLayer') == (9, 0, 0)
    assert layer_summary(
        output, 'tests.compat1x.layers.Compat1xEagerLayer') == (1, 0, 0)


def test_guide_layers_pass(testrunner):
    _, output = testrunner
    assert layer_summary(
        output, 'tests.guide.layers.GuideInlineLayer') == (1, 0, 0)
    assert layer_summary(
        output, 'tests.guide.layers.GuideEagerLayer') == (1, 0, 0)
