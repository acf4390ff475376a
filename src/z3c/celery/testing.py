"""Test support: ZODB, zope.conf and worker helpers, and what was queued.

Used by the pytest plugin (:mod:`z3c.celery.pytest_plugin`), the 1.x
fixtures (:mod:`z3c.celery.conftest`) and the layers
(:mod:`z3c.celery.layer`); usable on their own in any test runner.

Everything a helper starts (a worker, a server) runs on 127.0.0.1 and is
stopped by its pid.
"""
import ast
import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import zope.event

from z3c.celery import dispatch
from z3c.celery import events
from z3c.celery import servers
from z3c.celery.celery import login_principal  # noqa: F401 - 1.x name


#: A zope.conf for a test worker (1.x name and placeholders):
#: ``ftesting_path`` is the site ZCML, ``zodb_path`` a FileStorage file,
#: ``product_config`` extra text (e.g. ``<product-config>`` sections).
ZOPE_CONF_TEMPLATE = """\
site-definition {ftesting_path}

<zodb>
  <filestorage>
    path {zodb_path}
  </filestorage>
</zodb>

{product_config}

# zope.app.appsetup's schema requires an eventlog section.
<eventlog>
</eventlog>
"""

#: The same with a ZEO client: worker and tests share the database.
#: ``zeo_address`` is ``host:port``.
ZEO_ZOPE_CONF_TEMPLATE = """\
%import ZEO

site-definition {ftesting_path}

<zodb>
  <zeoclient>
    server {zeo_address}
  </zeoclient>
</zodb>

{product_config}

<eventlog>
</eventlog>
"""

#: A site ZCML for tests: z3c.celery, the principal registry as the
#: ``IAuthentication`` utility with two principals (``zope.user`` "User"
#: and ``zope.editor`` "Editor"), and ``{body}`` (task registrations,
#: ``<celery:config>``, includes of your packages).
SITE_ZCML_TEMPLATE = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:celery="http://namespaces.zope.org/celery">
  <include package="zope.component" file="meta.zcml" />
  <include package="zope.security" file="meta.zcml" />
  <include package="zope.principalregistry" file="meta.zcml" />
  <include package="z3c.celery" />
  <principal id="zope.user" title="User" login="user" password="u" />
  <principal id="zope.editor" title="Editor" login="editor" password="e" />
  <utility
      component="zope.principalregistry.principalregistry.principalRegistry"
      provides="zope.authentication.interfaces.IAuthentication" />
  {body}
</configure>
"""


def site_zcml(body=''):
    """The text of `SITE_ZCML_TEMPLATE` with *body* inserted."""
    return SITE_ZCML_TEMPLATE.replace('{body}', body)


def write_zope_conf(path, site_zcml_path, zodb_path=None, zeo_address=None,
                    product_config=''):
    """Write a zope.conf for a worker to *path* and return *path*.

    Give either *zodb_path* (a FileStorage file; only one process may open
    it) or *zeo_address* (``(host, port)`` or ``'host:port'``).
    """
    if (zodb_path is None) == (zeo_address is None):
        raise ValueError('write_zope_conf: give either zodb_path or '
                         'zeo_address')
    if zeo_address is not None:
        if not isinstance(zeo_address, str):
            zeo_address = '{}:{}'.format(*zeo_address)
        text = ZEO_ZOPE_CONF_TEMPLATE.format(
            ftesting_path=site_zcml_path, zeo_address=zeo_address,
            product_config=product_config)
    else:
        text = ZOPE_CONF_TEMPLATE.format(
            ftesting_path=site_zcml_path, zodb_path=zodb_path,
            product_config=product_config)
    with open(path, 'w') as f:
        f.write(text)
    return path


# ZODB


#: The key of the root folder in the ZODB root.
ROOT_NAME = 'Application'


def ensure_root_folder(db):
    """Create the root folder (a site) in *db* unless it exists.

    Tasks run with the root folder as their site, as the worker sets it;
    this is what a worker does at start (`zopeconf.ensure_root_folder`).
    """
    from z3c.celery.zopeconf import ensure_root_folder
    ensure_root_folder(db)
    return db


def filestorage_db(path):
    """A database on the FileStorage *path*, with a root folder."""
    import ZODB
    import ZODB.FileStorage
    return ensure_root_folder(ZODB.DB(ZODB.FileStorage.FileStorage(path)))


def zeo_db(address, timeout=30):
    """A database on the ZEO server at *address*, with a root folder."""
    import ZEO
    return ensure_root_folder(
        ZEO.DB(tuple(address), wait_timeout=timeout))


@contextlib.contextmanager
def open_zodb_copy(zodb_path):
    """Open a copy of the FileStorage *zodb_path*; yield its root folder.

    For a database another process (a worker) holds open.  The copy and
    its index files are removed afterwards.
    """
    import ZODB
    import ZODB.FileStorage
    directory = tempfile.mkdtemp(prefix='z3c-zodb-copy-')
    copy = os.path.join(directory, os.path.basename(zodb_path))
    try:
        shutil.copyfile(zodb_path, copy)
        db = ZODB.DB(ZODB.FileStorage.FileStorage(copy, read_only=True))
        try:
            connection = db.open()
            try:
                yield connection.root()[ROOT_NAME]
            finally:
                connection.close()
        finally:
            db.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def last_transaction_info(db):
    """The extended info of *db*'s last committed transaction (a dict).

    The ids of the tasks it queued are under
    ``z3c.celery.dispatch.TASK_IDS_KEY``; a task's own transaction has
    ``task_name`` and ``task_id``.
    """
    storage = db.storage
    tid = storage.lastTransaction()
    for record in storage.iterator(tid, tid):
        return dict(record.extension)
    return {}


# What a transaction queued


QueuedTask = collections.namedtuple(
    'QueuedTask',
    ['name', 'args', 'kwargs', 'task_id', 'principal_id', 'options'])
QueuedTask.__doc__ = 'One task queued in a transaction, as a test sees it.'


def _as_queued(message):
    return QueuedTask(message.name, tuple(message.args),
                      dict(message.kwargs), message.task_id,
                      message.principal_id, dict(message.options))


def queued_tasks():
    """The tasks queued so far in the current transaction (`QueuedTask`)."""
    return [_as_queued(m) for m in dispatch.queued_messages()]


def queued_task_names():
    """The names of the tasks queued in the current transaction."""
    return [m.name for m in dispatch.queued_messages()]


class TaskRecorder:
    """Record the task events of this process while it is active.

    ``queued`` and ``sent`` are lists of `QueuedTask`: what transactions
    queued, and what left at commit (published, or run in-process in the
    inline and eager modes).  ``started``, ``succeeded``, ``failed`` and
    ``retried`` hold the events of tasks that ran in this process.  Use as
    a context manager, or call `start` and `stop`.
    """

    def __init__(self):
        self.queued = []
        self.sent = []
        self.started = []
        self.succeeded = []
        self.failed = []
        self.retried = []

    def __call__(self, event):
        if isinstance(event, events.TaskQueued):
            self.queued.append(_as_queued(event.message))
        elif isinstance(event, events.TaskSent):
            self.sent.append(_as_queued(event.message))
        elif isinstance(event, events.TaskStarted):
            self.started.append(event)
        elif isinstance(event, events.TaskSucceeded):
            self.succeeded.append(event)
        elif isinstance(event, events.TaskFailed):
            self.failed.append(event)
        elif isinstance(event, events.TaskRetried):
            self.retried.append(event)

    @property
    def sent_names(self):
        return [task.name for task in self.sent]

    def start(self):
        zope.event.subscribers.append(self)
        return self

    def stop(self):
        if self in zope.event.subscribers:
            zope.event.subscribers.remove(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _record_as_queued(task_id, record):
    return QueuedTask(record['name'], tuple(record['args']),
                      dict(record['kwargs']), task_id,
                      record['principal_id'], dict(record['options']))


def _in_queue_order(records):
    ordered = sorted(records.items(),
                     key=lambda item: (item[1]['created'], item[1]['seq']))
    return [_record_as_queued(task_id, record)
            for task_id, record in ordered]


def outbox_tasks(db):
    """The tasks waiting in the outbox of *db*, oldest first (`QueuedTask`).

    With dispatch mode ``outbox`` a task waits there from the commit of
    the transaction that queued it until it was published.
    """
    from z3c.celery import outbox
    return _in_queue_order(outbox.pending_records(db))


def outbox_dead_letters(db):
    """The tasks the relay gave up on (`QueuedTask`), oldest first."""
    from z3c.celery import outbox
    return _in_queue_order(outbox.dead_letters(db))


def outbox_figures(db):
    """``pending``, ``oldest_age`` (seconds), ``dead`` and ``lanes``."""
    from z3c.celery import outbox
    return outbox.figures(db)


# Celery configuration of z3c.celery.CELERY for a while


_ABSENT = object()


def override_settings(app, settings):
    """Apply *settings* to *app*'s configuration; return an undo function.

    The undo function restores each key to what it was (or removes it),
    and drops cached broker connections when the broker changed.
    """
    from z3c.celery import app as app_module
    conf = app_module.loaded_conf(app)
    saved = {key: conf.changes.get(key, _ABSENT) for key in settings}
    conf.update(settings)
    app_module.reset_connections(app)

    def undo():
        for key, value in saved.items():
            if value is _ABSENT:
                conf.changes.pop(key, None)
            else:
                conf.changes[key] = value
        app_module.reset_connections(app)
    return undo


def release_results(app):
    """Stop waiting for the results *app* still waits for.

    A ``result.get(timeout=...)`` that timed out leaves its result
    subscribed at the result backend; when it is garbage collected after
    the test's Redis stopped, Celery tries to reconnect for a long while.
    Call this while the backend is still reachable (the end-to-end layer
    and fixtures do).
    """
    backend = getattr(app._local, 'backend', None)
    pending = getattr(backend, '_pending_results', None)
    if not pending:
        return
    for mapping in pending:
        for waiters in list(mapping.values()):
            for result in list(waiters.values()):
                backend.remove_pending_result(result)


#: The settings of each test mode.
MODE_SETTINGS = {
    # 1.x: task_always_eager; 2.x runs the task right after the commit.
    'eager': {'task_always_eager': True, 'task_eager_propagates': True},
    # Queued for real, run in-process after commit, like a worker would.
    'inline': {'task_always_eager': False, 'dispatch': 'inline'},
    # Published to the broker after commit; a worker runs them.
    'end-to-end': {'task_always_eager': False, 'dispatch': 'after-commit'},
}


def mode_settings(mode):
    try:
        return dict(MODE_SETTINGS[mode])
    except KeyError:
        raise ValueError(
            f'Unknown test mode {mode!r}; choose one of '
            f'{", ".join(sorted(MODE_SETTINGS))}') from None


# A real worker


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


class WorkerProcess:
    """A real ``celery worker`` process for ``z3c.celery.CELERY``.

    *settings* (a dict, written to a ``celeryconfig.py`` the worker
    reads with ``--config celeryconfig``, the Celery 5 form of the 1.x
    command line) must contain the broker and the ``ZOPE_CONF`` the
    worker loads.  *includes* are modules the worker imports
    (``--include``), *parameters* 1.x worker parameters (``queues``,
    ``concurrency``, ``pool`` (default ``solo``), ``loglevel``, ...).
    *pythonpath* entries are put in front of the worker's ``PYTHONPATH``.

    `start` waits until the worker answers a ping (up to *timeout*
    seconds, default ``worker_boot_timeout`` or 60) and raises with the
    worker's output if it exits or does not answer; `stop` ends it by
    its pid (SIGQUIT, then SIGKILL).  Its output is in `log_path`.
    """

    def __init__(self, settings, includes=(), parameters=None,
                 pythonpath=(), directory=None, env=None, timeout=None):
        self.settings = dict(settings)
        self.includes = tuple(includes)
        self.parameters = dict(parameters or {})
        self.parameters.setdefault('pool', 'solo')
        self.parameters.setdefault('loglevel', 'info')
        self.hostname = self.parameters.setdefault(
            'hostname', f'z3c-test-{os.getpid()}-{id(self)}@127.0.0.1')
        self.pythonpath = tuple(pythonpath)
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix='z3c-worker-')
        self.env = dict(env or {})
        self.timeout = timeout or float(
            self.settings.get('worker_boot_timeout') or 60)
        self.process = None
        self.log_path = os.path.join(self.directory, 'worker.log')
        self.config_path = os.path.join(self.directory, 'celeryconfig.py')
        self._log = None

    def command(self):
        # Celery 5's form of 1.x's ``celery worker --app=... --config=...``
        # (the config module is found in the worker's directory).
        command = [sys.executable, '-m', 'celery', '-A', 'z3c.celery.CELERY',
                   '--config', 'celeryconfig',
                   'worker', '--without-heartbeat', '--without-gossip',
                   '--without-mingle']
        command.extend(worker_options(self.parameters))
        if self.includes:
            command.extend(['--include', ','.join(self.includes)])
        return command

    def environment(self):
        env = dict(os.environ)
        env.pop('CELERY_CONFIG_FILE', None)
        path = [p for p in self.pythonpath]
        if env.get('PYTHONPATH'):
            path.append(env['PYTHONPATH'])
        if path:
            env['PYTHONPATH'] = os.pathsep.join(path)
        env.update(self.env)
        return env

    def start(self):
        if 'ZOPE_CONF' not in self.settings:
            raise ValueError(
                'The worker settings need ZOPE_CONF (the zope.conf the '
                'worker loads); see z3c.celery.testing.write_zope_conf')
        write_celeryconfig(self.config_path, self.settings)
        self._log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT,
            env=self.environment(), cwd=self.directory)
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log(self):
        """The worker's output so far (text)."""
        try:
            with open(self.log_path, errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def wait_until_ready(self):
        """Wait until the worker answers a ping (its logging may be
        configured to say nothing)."""
        import celery
        app = celery.Celery(
            'z3c.celery.testing.ping', set_as_current=False,
            broker=self.settings['broker_url'])
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f'The celery worker exited with '
                        f'{self.process.returncode} while starting; its '
                        f'output:\n{self.log()}')
                if app.control.ping([self.hostname], timeout=0.5):
                    return
        finally:
            app.close()
        raise TimeoutError(
            f'The celery worker was not ready after {self.timeout}s; its '
            f'output:\n{self.log()}')

    def stop(self, timeout=20.0, sig=signal.SIGQUIT):
        """Stop the worker by its pid: *sig*, then SIGKILL after *timeout*.

        The default is Celery's cold shutdown (SIGQUIT): a test worker has
        no task left to finish, and it still closes its databases.
        """
        process, self.process = self.process, None
        servers.stop_process(process, timeout, sig)
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
