"""A 1.x project's own test suite (tests/compat1x_project) runs unchanged.

It runs in a pytest process of its own, from its own directory, so that
its ``conftest.py`` is the only one (as in a real project), with the
plugins such a project has installed: celery's (``-p
celery.contrib.pytest``; Celery 4 loaded it automatically), z3c.celery's
and zope.pytestlayer's (entry points).  ``$Z3C_CELERY_BROKER`` names a
private Redis server.  The suite must pass without changing its tests.
"""
import os
import re
import sys

import pytest

from z3c.celery.testing.servers import RedisServer

from tests.processes import run_bounded


HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.join(HERE, 'compat1x_project')
TIMEOUT = 420
#: The tests of the project (all must pass).
EXPECTED = 24


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_1x_project_suite_passes_unchanged():
    with RedisServer() as redis:
        env = dict(os.environ, Z3C_CELERY_BROKER=redis.url + '/1')
        env.pop('PYTHONPATH', None)
        env.pop('CELERY_CONFIG_MODULE', None)
        env.pop('CELERY_CONFIG_FILE', None)
        command = [sys.executable, '-m', 'pytest', '-p',
                   'celery.contrib.pytest', '-v', '-p', 'no:cacheprovider']
        # Its own process group: on a timeout, what it started goes too.
        returncode, output = run_bounded(
            command, TIMEOUT, 'The 1.x project suite', cwd=PROJECT, env=env)
    summary = output.strip().splitlines()[-1]
    assert returncode == 0, output
    assert re.search(rf'\b{EXPECTED} passed\b', summary), output
    for word in ('skipped', 'xfail', 'xpass', 'deselected', 'error'):
        assert word not in summary, output
