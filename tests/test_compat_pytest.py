"""pytest runs the 1.x application's pytest tests with the fixtures of
``z3c.celery.conftest`` (incl. ``celery_session_worker``: a real worker)."""
import os
import sys

from tests.processes import run_bounded


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 180


def test_1x_pytest_fixtures_run_the_1x_tests():
    command = [sys.executable, '-m', 'pytest', '-p', 'z3c.celery.conftest',
               '-p', 'no:cacheprovider', '-q',
               'tests/compat1x/pytest1x_tests.py']
    # Its own process group: on a timeout, the worker it started goes too.
    returncode, output = run_bounded(command, TIMEOUT, 'pytest', cwd=ROOT)
    assert returncode == 0, output
    assert '4 passed' in output, output
