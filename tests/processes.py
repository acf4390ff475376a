"""Run a command (a pytest, a testrunner, a tutorial step) in its own
process group, bounded in time: on a timeout the whole group (and every
worker or server it started) is killed, and the test fails with the
output so far."""
import os
import signal
import subprocess

import pytest


def run_bounded(command, timeout, what=None, **kw):
    """Run *command*; return ``(returncode, output)`` (stderr merged).

    Keyword arguments go to ``subprocess.Popen`` (``cwd``, ``env``,
    ``shell``, ...).
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, **kw)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=30)
        pytest.fail(f'{what or command} did not finish in {timeout}s:\n'
                    f'{output}')
    return process.returncode, output
