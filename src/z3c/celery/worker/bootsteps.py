"""``celery worker`` in the Zope environment: options, bootstep, signals.

``--zope-conf`` / ``--logging-ini`` (or 1.x's ``ZOPE_CONF`` /
``LOGGING_INI`` settings) are loaded as soon as the worker is created
(``celeryd_init``); the `ZopeEnvironment` bootstep opens the databases
where the tasks run (each prefork child after the fork, else the worker
process) and closes them at stop.  ``--zope-conf`` is a preload option:
every other ``celery`` subcommand (``beat``, ``inspect``, ``call``,
``outbox``, ...) loads the site's configuration with it before it runs
(``user_preload_options``), opening no database.  Imported only by
workers and the ``celery`` command.  See docs/worker.rst.
"""
import contextlib
import logging
import os
import sys
import traceback

import celery.signals
import click
# As in a Zope application server: zope.event notifications (our task
# events among them) reach the <subscriber>s registered in ZCML.
import zope.component.event  # noqa: F401
from celery import bootsteps
from celery.bin.base import CeleryOption
from celery.concurrency.prefork import TaskPool

import z3c.celery.logging
from z3c.celery import database
from z3c.celery.exceptions import WorkerSetupError
from z3c.celery.exceptions import ZopeConfError
from z3c.celery.worker import beat
from z3c.celery.worker import zopeconf


log = logging.getLogger(__name__)

NO_ZOPE_CONF = (
    'z3c.celery: no zope.conf to load. Start the worker with '
    '--zope-conf PATH, or set ZOPE_CONF in a celeryconfig named by '
    '--config MODULE, CELERY_CONFIG_MODULE=MODULE or '
    'CELERY_CONFIG_FILE=PATH.')

#: What ``--zope-conf`` defaults to, for programs that cannot pass it
#: (Flower, a ``celery`` command line written elsewhere).
ZOPE_CONF_ENV = 'Z3C_CELERY_ZOPE_CONF'


class _State:
    app = None            # the app whose worker runs in this process
    booted = False
    logging_ini = None
    prefork = False


_state = _State()


def zope_conf_option():
    return CeleryOption(
        ('--zope-conf',), help_group='Zope Options',
        type=click.Path(exists=True, dir_okay=False, resolve_path=True),
        default=None, envvar=ZOPE_CONF_ENV, show_envvar=True,
        help='zope.conf of the site: its ZCML configures broker, backend '
             'and settings (a worker also opens its <zodb> databases). '
             'Default: the ZOPE_CONF setting of the celeryconfig.')


def logging_ini_option():
    return CeleryOption(
        ('--logging-ini',), help_group='Zope Options',
        type=click.Path(exists=True, dir_okay=False, resolve_path=True),
        default=None,
        help='Logging configuration (ini file, e.g. your paste.ini) '
             'applied with logging.config.fileConfig. Default: the '
             'LOGGING_INI setting of the celeryconfig.')


def booted():
    """Whether this process's worker has loaded its site already."""
    return _state.booted


def command_options():
    """Our options of the ``celery`` subcommands (``app.user_options``).

    ``--zope-conf`` is a preload option: Celery adds it to every
    subcommand (``worker`` included) and sends ``user_preload_options``.
    """
    return {'preload': {zope_conf_option()},
            'worker': {logging_ini_option()}}


def boot(app, zope_conf=None, logging_ini=None):
    """Load the zope.conf and site ZCML for *app*'s worker (once).

    The options win over the 1.x settings ``ZOPE_CONF`` / ``LOGGING_INI``.
    Raises `WorkerSetupError` when there is nothing to load, unless this
    process already has a database (a worker embedded in a process that set
    up the Zope environment itself, as test layers do).
    """
    if _state.booted:
        return
    conf = app.conf
    zope_conf = zope_conf or conf.get('ZOPE_CONF')
    logging_ini = logging_ini or conf.get('LOGGING_INI')
    if logging_ini:
        _setup_logging_ini(app, logging_ini)
    if zope_conf:
        try:
            zopeconf.load_zope_conf(zope_conf)
        except ZopeConfError as e:
            raise WorkerSetupError(f'z3c.celery: {e}') from None
        import_site_modules(app)
    elif database.get_database(app.z3c_setting('zodb_database')) is None:
        raise WorkerSetupError(NO_ZOPE_CONF)
    if not logging_ini and conf.get('LOGGING_INI'):
        # Set by the site's <celery:config>, known only now.
        _setup_logging_ini(app, conf.get('LOGGING_INI'))
    timeout = app.z3c_setting('worker_boot_timeout')
    if timeout:
        conf.worker_proc_alive_timeout = float(timeout)
    # A result that cannot be stored because the backend is away for a
    # moment (a Redis restart) would turn a committed task into a FAILURE:
    # retry storing it instead, unless the site chose otherwise.
    _worker_default(conf, 'result_backend_always_retry', True)
    _state.app = app
    _state.booted = True


def import_site_modules(app):
    """Import the modules of ``imports`` / ``include`` (their tasks).

    Celery imports them before ``celeryd_init`` (and remembers the list),
    so those that the site's <celery:config> names are imported here.
    """
    loader = app.loader
    loader.__dict__.pop('default_modules', None)    # a cached_property
    for module in loader.default_modules:
        loader.import_task_module(module)


def _worker_default(conf, name, value):
    """Set Celery setting *name* unless the site's configuration has it."""
    # conf.maps: changes (ZCML), the celeryconfig, Celery's defaults.
    if not any(name in layer for layer in conf.maps[:-1]):
        conf[name] = value


def _setup_logging_ini(app, path):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise WorkerSetupError(
            f'z3c.celery: logging configuration not found: {path}')
    _state.logging_ini = path
    if app.log.already_setup:
        z3c.celery.logging.apply_logging_ini(path)
    else:
        # Celery configures logging only when nobody answers this signal.
        celery.signals.setup_logging.connect(
            _on_setup_logging, weak=False, dispatch_uid='z3c.celery.logging')


def _on_setup_logging(**kw):
    z3c.celery.logging.apply_logging_ini(_state.logging_ini)


@celery.signals.celeryd_init.connect(weak=False)
def _on_celeryd_init(sender=None, instance=None, options=None, **kw):
    app = getattr(instance, 'app', None)
    if not getattr(app, 'zope_environment', False):
        return   # the worker of another app, in this process
    options = options or {}
    with _exit_on_failure('loading the Zope environment'):
        boot(app, options.get('zope_conf'), options.get('logging_ini'))


@contextlib.contextmanager
def _exit_on_failure(what):
    """Exit saying why *what* failed (Celery would log and ignore an
    Exception raised in a signal handler, and go on without the site)."""
    try:
        yield
    except WorkerSetupError as e:
        raise SystemExit(str(e)) from None
    except ZopeConfError as e:
        raise SystemExit(f'z3c.celery: {e}') from None
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        raise SystemExit(
            f'z3c.celery: {what} failed: {type(e).__name__}: {e}') from None


@celery.signals.user_preload_options.connect(weak=False)
def _on_preload_options(sender=None, app=None, options=None, **kw):
    """Load the site's configuration before a subcommand runs."""
    if not getattr(app, 'zope_environment', False):
        return
    ctx = click.get_current_context(silent=True)
    command = getattr(ctx, 'info_name', None)
    if command == 'worker':
        return   # celeryd_init loads it, after --logging-ini (see boot)
    path = (options or {}).get('zope_conf')
    if not path and command == 'beat':
        path = app.conf.get('ZOPE_CONF')
        if not path:
            log.warning(
                'z3c.celery: beat without a zope.conf: the site\'s ZCML '
                '(<celery:config>, <celery:schedule>) is not loaded. Give '
                '--zope-conf PATH or set %s.', ZOPE_CONF_ENV)
    if path:
        # The configuration only: a command that is not a worker opens no
        # database (the outbox command opens its own).
        with _exit_on_failure(f'loading the site configuration of {path}'):
            zopeconf.load_zope_conf(path)


@celery.signals.beat_init.connect(weak=False)
def _on_beat_init(sender=None, **kw):
    app = getattr(sender, 'app', None)
    if getattr(app, 'zope_environment', False):
        beat.make_transactional(sender.scheduler)


def _is_prefork(pool_cls):
    return isinstance(pool_cls, type) and issubclass(pool_cls, TaskPool)


class ZopeEnvironment(bootsteps.StartStopStep):
    """Worker bootstep: the Zope environment where the tasks run.

    Loads the zope.conf (when the command line did not already), opens
    the databases at start unless prefork children do, and closes them at
    stop.
    """

    label = 'Zope'
    requires = ('celery.worker.components:Pool',)

    def __init__(self, worker, zope_conf=None, logging_ini=None, **kw):
        boot(worker.app, zope_conf, logging_ini)
        self.prefork = _state.prefork = _is_prefork(worker.pool_cls)
        self.opened = False

    def create(self, worker):
        if self.prefork and zopeconf.loaded_options() is not None:
            # Before the pool forks: the children (and the outbox relay in
            # this process) would otherwise race to create an empty
            # database's schema and root.
            zopeconf.bootstrap_databases()
        return self

    def start(self, worker):
        if self.prefork or zopeconf.loaded_options() is None:
            return
        zopeconf.open_databases()
        self.opened = True
        log.info('Zope environment ready in the worker process')

    def stop(self, worker):
        if self.opened:
            self.opened = False
            zopeconf.close_databases()

    terminate = stop


@celery.signals.worker_process_init.connect(weak=False)
def _on_worker_process_init(**kw):
    if not _state.booted or zopeconf.loaded_options() is None:
        return
    try:
        zopeconf.open_databases()
    except BaseException:
        log.critical('Could not open the databases of %s in pool process '
                     '%d', zopeconf.loaded_path(), os.getpid(), exc_info=True)
        # Without its database the child could only fail every task.
        raise SystemExit(1) from None


@celery.signals.worker_process_shutdown.connect(weak=False)
def _on_worker_process_shutdown(**kw):
    if _state.booted:
        zopeconf.close_databases()
