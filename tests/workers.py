"""Real ``celery worker`` processes for tests, examples and benchmarks.

* `write_site` writes a zope.conf (FileStorage or ZEO client) and a site
  ZCML (``<celery:config>`` pointing at a given Redis, the principals
  ``zope.alice`` / ``zope.bob``, the tasks of ``tests/site/tasks.zcml``)
  from the templates in ``tests/site``.
* `Worker` runs ``celery -A z3c.celery.CELERY worker --zope-conf ...`` as a
  child process (``PYTHONPATH`` includes the checkout, so ``tests.*`` is
  importable), waits until it answers a ping, and stops it by its pid:
  SIGTERM, then SIGKILL to its process group after a bounded wait.  Use it
  as a context manager or call `start` / `stop` from a fixture.
* `PersistentRedis`: a Redis that keeps its data over a restart.

Every wait is bounded; a failure to start raises with the worker's log.
"""
import contextlib
import os
import re
import signal
import string
import subprocess
import sys
import tempfile
import time
import uuid

import celery

from z3c.celery import servers


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SITE_DIR = os.path.join(HERE, 'site')


class Site:
    """The files of one test site."""

    def __init__(self, directory, zope_conf, site_zcml, broker_url,
                 fs_path=None, zeo_address=None):
        self.directory = directory
        self.zope_conf = zope_conf
        self.site_zcml = site_zcml
        self.broker_url = broker_url
        self.fs_path = fs_path
        self.zeo_address = zeo_address

    def __repr__(self):
        return f'<Site {self.zope_conf}>'


def _fill(template_name, target, **values):
    with open(os.path.join(SITE_DIR, template_name)) as f:
        text = string.Template(f.read()).substitute(values)
    with open(target, 'w') as f:
        f.write(text)
    return target


def write_site(directory, broker_url, *, fs_path=None, zeo_address=None,
               relstorage_dsn=None, result_backend=None,
               dispatch='after-commit', config='', extra='', events=True):
    """Write ``zope.conf`` and ``site.zcml`` into *directory*.

    Give *fs_path* (a FileStorage file), *zeo_address* (``(host,
    port)`` or ``'host:port'``) or *relstorage_dsn* (a PostgreSQL DSN).
    *result_backend* defaults to *broker_url*.  *config* is more attributes of
    ``<celery:config>`` (text), *extra* more ZCML inside ``<configure>``.
    With *events*, a subscriber logs every z3c.celery event (``EVENT
    TaskStarted name[id] principal=...``).
    """
    if [fs_path, zeo_address, relstorage_dsn].count(None) != 2:
        raise ValueError('write_site: give one of fs_path, zeo_address, '
                         'relstorage_dsn')
    os.makedirs(directory, exist_ok=True)
    site_zcml = _fill(
        'site.zcml.in', os.path.join(directory, 'site.zcml'),
        site_dir=SITE_DIR, broker_url=broker_url, dispatch=dispatch,
        result_backend=result_backend or broker_url,
        config=config, extra=extra,
        events=f'<include file="{SITE_DIR}/events.zcml" />' if events
        else '')
    zope_conf = os.path.join(directory, 'zope.conf')
    if fs_path is not None:
        _fill('zope-filestorage.conf.in', zope_conf, site_zcml=site_zcml,
              fs_path=os.path.abspath(fs_path))
    elif relstorage_dsn is not None:
        _fill('zope-relstorage.conf.in', zope_conf, site_zcml=site_zcml,
              dsn=relstorage_dsn)
    else:
        if not isinstance(zeo_address, str):
            zeo_address = '%s:%s' % tuple(zeo_address)
        _fill('zope-zeo.conf.in', zope_conf, site_zcml=site_zcml,
              zeo_address=zeo_address)
    return Site(directory, zope_conf, site_zcml, broker_url, fs_path,
                zeo_address)


def prepare_database(db):
    """Give *db* the root folder and the ``data`` tree the tasks use."""
    from BTrees.OOBTree import OOBTree

    from z3c.celery.zopeconf import ensure_root_folder
    ensure_root_folder(db)
    with db.transaction() as conn:
        conn.root().setdefault('data', OOBTree())


def prepare_filestorage(path, data=None):
    """Create the FileStorage at *path* with the site and *data*, closed."""
    import ZODB.FileStorage
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    try:
        prepare_database(db)
        if data:
            with db.transaction() as conn:
                conn.root()['data'].update(data)
    finally:
        db.close()
    return path


def zeo_db(address):
    """A ``ZODB.DB`` on the ZEO server at *address* (a client of it).

    With ``server_sync``: each transaction sees everything committed
    before it began, also by other processes.
    """
    import ZEO
    return ZEO.DB(tuple(address), wait_timeout=30, server_sync=True)


def relstorage_db(dsn):
    """A ``ZODB.DB`` on the RelStorage (PostgreSQL) database *dsn*."""
    import ZODB.config
    return ZODB.config.databaseFromString(
        '%import relstorage\n<zodb>\n <relstorage>\n  <postgresql>\n'
        f'   dsn {dsn}\n  </postgresql>\n </relstorage>\n</zodb>\n')


def read_data(db):
    """The ``data`` tree of *db* as a dict (a fresh transaction)."""
    with db.transaction() as conn:
        conn.sync()
        return dict(conn.root()['data'])


class PersistentRedis(servers.RedisServer):
    """A Redis that writes every change to disk and keeps it on restart."""

    def start(self, timeout=20.0):
        self.process = subprocess.Popen(
            [servers.redis_server_binary(),
             '--bind', '127.0.0.1', '--port', str(self.port),
             '--save', '', '--appendonly', 'yes',
             '--appendfsync', 'always',
             '--dir', self.directory, '--protected-mode', 'yes',
             '--loglevel', 'warning'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.wait_for_port(self.port, timeout, self.process)
        return self


def wait_for(predicate, timeout, interval=0.05, message='condition'):
    """Call *predicate* until it returns a true value; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f'{message}: not reached after {timeout}s')
        time.sleep(interval)


def result_of(result, timeout=30.0):
    """The value of *result* (raising its error), waiting *timeout* at most.

    Waits for the result backend's notification, and reads the stored
    state when none came within a few seconds: under load, Celery's Redis
    result backend now and then misses the notification of a result that
    was stored (the worker did its part), and ``get()`` would wait for
    its whole timeout.
    """
    import celery.exceptions
    import celery.states
    deadline = time.monotonic() + timeout
    while True:
        try:
            return result.get(
                timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except celery.exceptions.TimeoutError:
            if result.state in celery.states.READY_STATES:
                # Now in the result's cache: get() returns at once.
                return result.get(timeout=1.0)
            if time.monotonic() > deadline:
                raise


def wait_results(results, timeout=60.0):
    """Wait until every result in *results* is ready (errors included)."""
    import celery.states
    deadline = time.monotonic() + timeout
    for result in results:
        try:
            result_of(result, max(0.1, deadline - time.monotonic()))
        except Exception:
            if result.state not in celery.states.READY_STATES:
                raise
    return results


class WorkerError(RuntimeError):
    """A worker did not start or exited; the message holds its log."""


class Worker:
    """A ``celery worker`` child process for ``z3c.celery.CELERY``.

    *zope_conf* is passed as ``--zope-conf`` (leave it out for the 1.x
    ways: *config* is passed as ``--config``, *env* may name
    ``CELERY_CONFIG_FILE``).  *broker_url* is where `start` pings the
    worker to know it is ready; without it, `start` waits for the
    ``ready.`` line in the log.  The log (stdout and stderr) is in
    ``log_path``.  *app* is the ``-A`` argument (another app for
    comparisons, e.g. a plain Celery one).
    """

    def __init__(self, zope_conf=None, *, broker_url=None, pool='solo',
                 concurrency=1, logging_ini=None, config=None, env=None,
                 args=(), directory=None, loglevel='INFO',
                 start_timeout=60.0, stop_timeout=15.0,
                 app='z3c.celery.CELERY'):
        self.app = app
        self.zope_conf = zope_conf
        self.broker_url = broker_url
        self.pool = pool
        self.concurrency = concurrency
        self.logging_ini = logging_ini
        self.config = config
        self.env = dict(env or {})
        self.args = list(args)
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix='z3c-worker-')
        self.loglevel = loglevel
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.name = f'z3c-{uuid.uuid4().hex[:8]}@127.0.0.1'
        self.log_path = os.path.join(self.directory,
                                     f'worker-{self.name[4:12]}.log')
        self.process = None
        self._log = None
        self._ping_app = None

    def command(self):
        command = [sys.executable, '-m', 'celery', '-A', self.app]
        if self.config:
            command += ['--config', self.config]
        command += ['worker', '-P', self.pool, '-c', str(self.concurrency),
                    '-n', self.name, '-l', self.loglevel,
                    '--without-gossip', '--without-mingle',
                    '--without-heartbeat']
        if self.zope_conf:
            command += ['--zope-conf', self.zope_conf]
        if self.logging_ini:
            command += ['--logging-ini', self.logging_ini]
        return command + self.args

    def environ(self):
        env = dict(os.environ)
        for name in ('CELERY_CONFIG_MODULE', 'CELERY_CONFIG_FILE'):
            env.pop(name, None)
        pythonpath = [ROOT] + [p for p in env.get('PYTHONPATH', '').split(
            os.pathsep) if p]
        env['PYTHONPATH'] = os.pathsep.join(pythonpath)
        env['PYTHONUNBUFFERED'] = '1'
        env.update(self.env)
        return env

    def start(self, wait=True):
        """Start the process; with *wait*, until it is ready."""
        self._log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            self.command(), cwd=self.directory, env=self.environ(),
            stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            try:
                self.wait_ready()
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
            f'The worker exited with {self.process.returncode}; its '
            f'log:\n{self.log()}')

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

    def wait_ready(self, timeout=None):
        """Wait until the worker consumes (ping, or its ``ready.`` line)."""
        timeout = self.start_timeout if timeout is None else timeout
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
            f'The worker was not ready after {timeout}s; its log:\n'
            f'{self.log()}')

    def wait_for_log(self, pattern, timeout=30.0, count=1):
        """Wait until *pattern* (a regex) occurs *count* times in the log."""
        def found():
            matches = re.findall(pattern, self.log())
            if len(matches) >= count:
                return matches
            if not self.running():
                raise self._exited()
            return None
        return wait_for(found, timeout, 0.1,
                        f'{pattern!r} x{count} in the worker log')

    def wait_exit(self, timeout=30.0):
        """Wait until the process ended by itself; its exit code."""
        return self.process.wait(timeout)

    def _signal_group(self, sig):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout=None):
        """SIGTERM (warm shutdown), then SIGKILL to the process group."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.process is not None:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            # Pool children the parent left behind, if any.
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self._close()

    def kill(self):
        """SIGKILL the worker and its pool processes at once."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(self.stop_timeout)
        self._close()

    def _close(self):
        if self._ping_app is not None:
            with contextlib.suppress(Exception):
                self._ping_app.close()
            self._ping_app = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
