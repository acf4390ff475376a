"""``celery worker`` in the Zope environment: options, bootstep, signals.

``--zope-conf`` / ``--logging-ini`` (or 1.x's ``ZOPE_CONF`` /
``LOGGING_INI`` settings) are loaded as soon as the worker is created
(``celeryd_init``); the `ZopeEnvironment` bootstep opens the databases
where the tasks run (each prefork child after the fork, else the worker
process) and closes them at stop.  Imported only by workers and the
``celery`` command.  See docs/worker.rst.
"""
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
from z3c.celery.worker import zopeconf


log = logging.getLogger(__name__)

NO_ZOPE_CONF = (
    'z3c.celery: no zope.conf to load. Start the worker with '
    '--zope-conf PATH, or set ZOPE_CONF in a celeryconfig named by '
    '--config MODULE, CELERY_CONFIG_MODULE=MODULE or '
    'CELERY_CONFIG_FILE=PATH.')


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
        default=None,
        help='zope.conf to load (its <zodb> databases and site ZCML). '
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
    """Our options of the ``celery`` subcommands (``app.user_options``)."""
    return {'worker': {zope_conf_option(), logging_ini_option()}}


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
    try:
        boot(app, options.get('zope_conf'), options.get('logging_ini'))
    except WorkerSetupError as e:
        # Celery would log and ignore an Exception raised here.
        raise SystemExit(str(e)) from None
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        raise SystemExit(
            f'z3c.celery: loading the Zope environment failed: '
            f'{type(e).__name__}: {e}') from None


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
