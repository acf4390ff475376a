"""A real ``celery worker`` process for tests, examples and benchmarks.

`WorkerProcess` starts ``celery -A z3c.celery.CELERY worker`` in a process
group of its own, waits until it answers a ping (or logs ``ready.``),
and stops it by its pid, then its group, within bounded time.
"""
import ast
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import celery

from z3c.celery.app import TransactionAwareTask
from z3c.celery.app import ZopeLoader


def write_celeryconfig(path, settings):
    """Write *settings* as a celeryconfig Python file to *path*.

    Values must be Python literals (strings, numbers, lists, dicts, ...).
    """
    lines = ['"""Written by z3c.celery.testing for a test worker."""']
    for name, value in sorted(settings.items()):
        if not name.isidentifier():
            raise ValueError(
                f'Celery setting {name!r} is not a valid Python name')
        text = repr(value)
        try:
            ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise TypeError(
                f'Celery setting {name!r} cannot be passed to a worker '
                f'process: {value!r} is not a Python literal') from None
        lines.append(f'{name} = {text}')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


#: ``celery worker`` command line options for the 1.x
#: ``celery_worker_parameters`` keys (arguments of Celery's test worker).
_WORKER_OPTIONS = {
    'queues': '--queues',
    'concurrency': '--concurrency',
    'pool': '--pool',
    'loglevel': '--loglevel',
    'hostname': '--hostname',
    'prefetch_multiplier': '--prefetch-multiplier',
    'max_tasks_per_child': '--max-tasks-per-child',
}
#: Keys of Celery's test worker that have no meaning for a real worker
#: process (it is waited for and stopped by us); accepted and ignored.
_IGNORED_WORKER_PARAMETERS = frozenset([
    'perform_ping_check', 'shutdown_timeout', 'ready_timeout', 'logfile',
    'without_heartbeat', 'without_mingle', 'without_gossip'])


def worker_options(parameters):
    """``celery worker`` options for a dict of 1.x worker parameters."""
    options = []
    for key, value in (parameters or {}).items():
        if key in _IGNORED_WORKER_PARAMETERS:
            continue
        option = _WORKER_OPTIONS.get(key)
        if option is None:
            raise ValueError(
                f'Unknown worker parameter {key!r}; supported: '
                f'{", ".join(sorted(_WORKER_OPTIONS))}')
        if key == 'queues' and not isinstance(value, str):
            value = ','.join(value)
        options.extend([option, str(value)])
    return options


#: The keys of ``celery_parameters`` (1.x: arguments to create the test
#: app) that still mean something: 2.x's end-to-end tests use
#: ``z3c.celery.CELERY`` itself, whose task class and loader are fixed.
_PARAMETERS = ('task_cls', 'loader', 'strict_typing')


def check_celery_parameters(parameters):
    """Refuse 1.x ``celery_parameters`` that cannot apply to the app of the
    worker process, ``z3c.celery.CELERY`` (see `EndToEndLayer`)."""
    for key, value in parameters.items():
        if key not in _PARAMETERS:
            raise ValueError(
                f'celery_parameters: {key!r} is not supported; the '
                'end-to-end layer uses z3c.celery.CELERY (put Celery '
                'settings into celery_config)')
        if key == 'task_cls' and not (
                value in ('z3c.celery.task:TransactionAwareTask',
                          'z3c.celery.app:TransactionAwareTask',
                          'z3c.celery.celery:TransactionAwareTask')
                or isinstance(value, type)
                and issubclass(value, TransactionAwareTask)):
            raise ValueError(
                f'celery_parameters: task_cls must be TransactionAwareTask, '
                f'not {value!r}')
        if key == 'loader' and not (
                isinstance(value, type) and issubclass(value, ZopeLoader)
                or value in ('z3c.celery.loader:ZopeLoader',
                             'z3c.celery.app:ZopeLoader',
                             'z3c.celery.celery:ZopeLoader')):
            raise ValueError(
                f'celery_parameters: loader must be ZopeLoader, not '
                f'{value!r}')


class WorkerError(RuntimeError):
    """A worker did not start or exited; the message holds its log."""


class WorkerProcess:
    """A real ``celery worker`` process for ``z3c.celery.CELERY``.

    Two ways to tell it its site:

    * *zope_conf*: passed as ``--zope-conf``;
    * *settings* (1.x): a dict of Celery settings, written to a
      ``celeryconfig.py`` the worker reads with ``--config celeryconfig``
      (the Celery 5 form of the 1.x command line); it must then contain
      the ``ZOPE_CONF`` the worker loads.

    *broker_url* (default: the settings' ``broker_url``) is where `start`
    pings the worker to know it is ready; without one, `start` waits for
    the ``ready.`` line of its log.  *includes* are modules the worker
    imports (``--include``), *parameters* worker options by their 1.x
    names (``queues``, ``concurrency``, ``pool`` (default ``solo``),
    ``loglevel``, ``hostname``, ...), *args* more command-line
    arguments; *config* is passed as ``--config``, *logging_ini* as
    ``--logging-ini``, *app* as ``-A``.  *pythonpath* entries go in front
    of the worker's ``PYTHONPATH``, *env* over its environment.

    `start` waits up to *timeout* seconds (default ``worker_boot_timeout``
    or 60) and raises `WorkerError` with the worker's log if it exits or
    does not answer; `stop` ends it by its pid (SIGTERM, then SIGKILL to
    its process group) and keeps its exit status in `returncode`.  Its
    output is in `log_path`.
    """

    def __init__(self, settings=None, includes=(), parameters=None,
                 pythonpath=(), directory=None, env=None, timeout=None, *,
                 zope_conf=None, broker_url=None, logging_ini=None,
                 config=None, args=(), app='z3c.celery.CELERY',
                 stop_timeout=15.0):
        self.settings = None if settings is None else dict(settings)
        self.includes = tuple(includes)
        self.parameters = dict(parameters or {})
        self.parameters.setdefault('pool', 'solo')
        self.parameters.setdefault('loglevel', 'info')
        self.name = self.parameters.setdefault(
            'hostname', f'z3c-{uuid.uuid4().hex[:8]}@127.0.0.1')
        self.pythonpath = tuple(pythonpath)
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix='z3c-worker-')
        self.env = dict(env or {})
        self.zope_conf = zope_conf
        self.broker_url = broker_url or (self.settings or {}).get(
            'broker_url')
        self.logging_ini = logging_ini
        self.config = config
        self.args = list(args)
        self.app = app
        self.timeout = timeout or float(
            (self.settings or {}).get('worker_boot_timeout') or 60)
        self.stop_timeout = stop_timeout
        self.log_path = os.path.join(
            self.directory, f'worker-{self.name.partition("@")[0]}.log')
        self.config_path = os.path.join(self.directory, 'celeryconfig.py')
        self.process = None
        #: The exit status of the process, once stopped.
        self.returncode = None
        self._log = None
        self._ping_app = None

    #: 1.x name of `name`.
    @property
    def hostname(self):
        return self.name

    def command(self):
        command = [sys.executable, '-m', 'celery', '-A', self.app]
        config = self.config or ('celeryconfig' if self.settings is not None
                                 else None)
        if config:
            command += ['--config', config]
        command += ['worker', '--without-heartbeat', '--without-gossip',
                    '--without-mingle']
        command += worker_options(self.parameters)
        if self.includes:
            command += ['--include', ','.join(self.includes)]
        if self.zope_conf:
            command += ['--zope-conf', self.zope_conf]
        if self.logging_ini:
            command += ['--logging-ini', self.logging_ini]
        return command + self.args

    def environment(self):
        env = dict(os.environ)
        for name in ('CELERY_CONFIG_MODULE', 'CELERY_CONFIG_FILE'):
            env.pop(name, None)
        path = list(self.pythonpath)
        if self.settings is not None:
            path.append(self.directory)     # where celeryconfig.py is
        if env.get('PYTHONPATH'):
            path.append(env['PYTHONPATH'])
        if path:
            env['PYTHONPATH'] = os.pathsep.join(path)
        env['PYTHONUNBUFFERED'] = '1'
        env.update(self.env)
        return env

    def start(self, wait=True):
        """Start the process; with *wait*, until it is ready."""
        if self.settings is not None:
            if not self.zope_conf and 'ZOPE_CONF' not in self.settings:
                raise ValueError(
                    'The worker settings need ZOPE_CONF (the zope.conf the '
                    'worker loads); see z3c.celery.testing.write_zope_conf')
            write_celeryconfig(self.config_path, self.settings)
        self._log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            self.command(), cwd=self.directory, env=self.environment(),
            stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            try:
                self.wait_until_ready()
            except BaseException:
                self.stop()
                raise
        return self

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def pool_pids(self):
        """The pids of the worker's pool processes (its children)."""
        path = f'/proc/{self.pid}/task/{self.pid}/children'
        with open(path) as f:
            return [int(pid) for pid in f.read().split()]

    def running(self):
        return self.process is not None and self.process.poll() is None

    def log(self):
        """The worker's output so far (text)."""
        with contextlib.suppress(OSError), open(self.log_path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')
        return ''

    def _exited(self):
        return WorkerError(
            f'The worker exited with {self.process.returncode} while '
            f'starting or running; its output:\n{self.log()}')

    def ping(self, timeout=1.0):
        """Whether the worker answers a ping through the broker."""
        for attempt in (1, 2):
            if self._ping_app is None:
                self._ping_app = celery.Celery(
                    'z3c-test-ping', broker=self.broker_url,
                    set_as_current=False)
            try:
                replies = self._ping_app.control.ping(
                    destination=[self.name], timeout=timeout)
            except Exception:
                # A broker restarted since the last ping: reconnect once.
                with contextlib.suppress(Exception):
                    self._ping_app.close()
                self._ping_app = None
                if attempt == 2:
                    raise
                continue
            return any(self.name in reply for reply in replies or ())

    def wait_until_ready(self, timeout=None):
        """Wait until the worker consumes (ping, or its ``ready.`` line).

        Its logging may be configured to say nothing: with a broker URL
        the ping tells.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise self._exited()
            if self.broker_url:
                with contextlib.suppress(Exception):
                    if self.ping(timeout=0.5):
                        return self
            elif re.search(r'\bready\.', self.log()):
                return self
            time.sleep(0.1)
        raise WorkerError(
            f'The worker was not ready after {timeout}s; its output:\n'
            f'{self.log()}')

    wait_ready = wait_until_ready

    def wait_for_log(self, pattern, timeout=30.0, count=1):
        """Wait until *pattern* (a regex) occurs *count* times in the log.

        Returns the matches; raises `WorkerError` if the worker exits and
        `TimeoutError` after *timeout* seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            matches = re.findall(pattern, self.log())
            if len(matches) >= count:
                return matches
            if not self.running():
                raise self._exited()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f'{pattern!r} x{count} not in the worker log after '
                    f'{timeout}s')
            time.sleep(0.1)

    def wait_exit(self, timeout=30.0):
        """Wait until the process ended by itself; its exit code."""
        return self.process.wait(timeout)

    def _signal_group(self, sig):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout=None, sig=signal.SIGTERM):
        """Stop the worker by its pid: *sig* (default SIGTERM, a warm
        shutdown), then SIGKILL to its process group after *timeout*."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.process is not None:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout)
            # Pool children the parent left behind, if any.
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self._release()

    def kill(self):
        """SIGKILL the worker and its pool processes at once."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(self.stop_timeout)
        self._release()

    def _release(self):
        if self.process is not None:
            self.returncode = self.process.returncode
            self.process = None
        if self._ping_app is not None:
            with contextlib.suppress(Exception):
                self._ping_app.close()
            self._ping_app = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self):
        """Stop the worker and remove its directory (unless given)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
