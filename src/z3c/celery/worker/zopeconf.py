"""Load a zope.conf the way zope.app.appsetup does, for a worker.

`load_zope_conf` parses the file with zope.app.appsetup's ZConfig schema,
puts its ``path`` entries on ``sys.path``, applies its product
configurations and executes the site ZCML once per process.
`open_databases` opens its ``<zodb>`` databases as one multi-database
(each registered as an ``IDatabase`` utility, the first also set as the
tasks' database) and makes sure the root folder exists; `close_databases`
closes them.

Opening is apart from loading because a prefork worker loads in the
parent, before forking, but opens the databases in each child: a storage
connection must not be shared across ``fork()``.  `bootstrap_databases`
gives an empty shared database (RelStorage, ZEO) its schema and root from
one process before the others open it.
"""
import contextlib
import logging
import os
import random
import sys
import time

import transaction
import ZConfig
import ZODB
import ZODB.config
import ZODB.interfaces
import zope.app.appsetup.appsetup
import zope.app.appsetup.product
import zope.component
import zope.event
import zope.processlifetime
import zope.testing.cleanup
from ZODB.POSException import ConflictError
from zope.site.folder import rootFolder
from zope.site.site import LocalSiteManager

from z3c.celery import database
from z3c.celery.exceptions import ZopeConfError
from z3c.celery.worker import markers
from z3c.celery.worker.connection import release_connection


log = logging.getLogger(__name__)

SCHEMA_PATH = os.path.join(
    os.path.dirname(zope.app.appsetup.appsetup.__file__),
    'schema', 'schema.xml')


class _State:
    path = None       # the zope.conf loaded in this process
    options = None    # its parsed ZConfig options
    databases = None  # name -> DB, once opened in this process
    main = None       # the first of them
    bootstrapped = False  # bootstrap_databases done (inherited by forks)
    pid = None        # the process that opened them


_state = _State()
_schema = []


def _load_schema():
    if not _schema:
        _schema.append(ZConfig.loadSchema(SCHEMA_PATH))
    return _schema[0]


def load_zope_conf(path, features=()):
    """Load the zope.conf at *path* and execute its site ZCML.

    Returns the parsed options.  ``path`` entries and ``site-definition``
    are relative to the directory of the zope.conf.  The site ZCML is
    executed once per process (a second call with the same file returns
    the options loaded before); ``devmode on`` provides the ``devmode``
    feature, as in zope.app.wsgi.  The ``<eventlog>`` and ``<logger>``
    sections are *not* applied: in a worker Celery (or ``--logging-ini``)
    configures logging.
    """
    path = os.path.abspath(path)
    if _state.options is not None:
        if _state.path != path:
            raise ZopeConfError(
                f'This process already loaded {_state.path}; it cannot load '
                f'a second zope.conf ({path})')
        return _state.options
    if not os.path.isfile(path):
        raise ZopeConfError(f'zope.conf not found: {path}')
    try:
        options, _ = ZConfig.loadConfig(_load_schema(), path)
    except ZConfig.ConfigurationError as e:
        raise ZopeConfError(f'Invalid zope.conf {path}: {e}') from None
    here = os.path.dirname(path)
    if options.path:
        sys.path[:0] = [os.path.join(here, p) for p in options.path
                        if os.path.join(here, p) not in sys.path]
    zope.app.appsetup.product.setProductConfigurations(
        options.product_config)
    if options.devmode:
        features = tuple(features) + ('devmode',)
    site_zcml = os.path.join(here, options.site_definition)
    if not os.path.isfile(site_zcml):
        raise ZopeConfError(
            f'The site-definition of {path} does not exist: {site_zcml}')
    zope.app.appsetup.appsetup.config(site_zcml, features=features)
    _state.path = path
    _state.options = options
    log.info('Loaded %s (site ZCML %s)', path, site_zcml)
    return options


def loaded_options():
    """The options of the zope.conf this process loaded, or ``None``."""
    return _state.options


def loaded_path():
    """The path of the zope.conf this process loaded, or ``None``."""
    return _state.path


def open_databases(options=None):
    """Open the databases of *options* (default: the loaded zope.conf).

    They form one multi-database; each is registered as an ``IDatabase``
    utility under its name (an unnamed one as ''), the first is set as the
    tasks' database and gets a root folder if it has none.  Subscribers
    of ``zope.processlifetime.IDatabaseOpened`` are notified, as when
    zope.app.wsgi opens them.  Returns the main database.
    """
    if options is None:
        options = _state.options
        if options is None:
            raise ZopeConfError('No zope.conf loaded in this process')
    if _state.databases is not None:
        return _state.main
    bootstrap_databases(options)
    dbs, databases = zope.app.appsetup.appsetup.multi_database(
        options.databases)
    main = dbs[0]
    _state.databases = databases
    _state.main = main
    _state.pid = os.getpid()
    database.set_database(main)
    zope.event.notify(zope.processlifetime.DatabaseOpened(main))
    ensure_root_folder(main)
    return main


def close_databases():
    """Close the databases `open_databases` opened (if any)."""
    databases, _state.databases, _state.main = _state.databases, None, None
    if not databases:
        return
    release_connection()
    database.set_database(None)
    gsm = zope.component.getGlobalSiteManager()
    for name, db in databases.items():
        gsm.unregisterUtility(db, ZODB.interfaces.IDatabase, name)
        with contextlib.suppress(Exception):
            db.close()


#: Storages only one process opens (or each its own): nothing to race for.
_PRIVATE_STORAGES = (ZODB.config.FileStorage, ZODB.config.MappingStorage,
                     ZODB.config.DemoStorage)


def bootstrap_databases(options=None, attempts=8, delay=0.2):
    """Create what empty shared databases lack, before others open them.

    Opening an empty RelStorage database creates its tables; opening any
    empty database creates the ZODB root object; `ensure_root_folder`
    adds the root folder.  Processes that do this at the same moment (the
    pool processes of a prefork worker and its outbox relay, or workers
    started together) fail but one: a unique violation in RelStorage's
    schema, a ``ConflictError`` on oid 0.  A prefork worker calls this in
    its main process before the pool forks, so that its children find
    everything in place; here each database of *options* is opened,
    completed and closed again.  A process that loses the race against
    another worker waits a growing, jittered time (from *delay*, at most
    2 s) and tries again, *attempts* times in all, then raises the last
    error.  FileStorage and in-memory storages are skipped (only one
    process opens them).  Once per process (a fork inherits it).
    """
    if options is None:
        options = _state.options
        if options is None:
            raise ZopeConfError('No zope.conf loaded in this process')
    if _state.bootstrapped:
        return
    for index, factory in enumerate(options.databases):
        if isinstance(getattr(factory.config, 'storage', None),
                      _PRIVATE_STORAGES):
            continue
        for attempt in range(1, attempts + 1):
            try:
                _bootstrap_one(factory, main=index == 0)
                break
            except Exception as e:
                if attempt == attempts:
                    raise
                wait = min(2.0, delay * 2 ** (attempt - 1))
                wait = wait / 2 + random.random() * wait / 2
                log.warning(
                    'Bootstrapping database %r: %s: %s (another process '
                    'creating it at the same time?); trying again in '
                    '%.2fs', factory.name, type(e).__name__, e, wait)
                time.sleep(wait)
    _state.bootstrapped = True


def _bootstrap_one(factory, main):
    storage = factory.config.storage.open()
    try:
        db = ZODB.DB(storage)   # creates the root object if missing
    except BaseException:
        with contextlib.suppress(Exception):
            storage.close()
        raise
    try:
        if main:
            ensure_root_folder(db)
    finally:
        db.close()


def forget_inherited_databases():
    """Forget the databases a parent process opened before forking this one.

    Their storage connections belong to the parent (a forked ``worker -B``
    beat process even closed their files): they are neither used nor
    closed here.  Returns whether there were any.
    """
    if _state.databases is None or _state.pid == os.getpid():
        return False
    databases, _state.databases, _state.main = _state.databases, None, None
    database.set_database(None)
    gsm = zope.component.getGlobalSiteManager()
    for name, db in databases.items():
        gsm.unregisterUtility(db, ZODB.interfaces.IDatabase, name)
    return True


def ensure_root_folder(db, attempts=5):
    """Create the root folder ``Application`` in *db* unless it exists.

    Done as zope.app.appsetup's bootstrap subscriber does: a
    ``zope.site`` root folder with a local site manager.  The container
    of the done-markers is created as well.  Several processes may start
    at once: a conflict means another one created them, so look again.
    Returns whether the root folder was created.
    """
    manager = transaction.TransactionManager()
    for _ in range(attempts):
        connection = db.open(transaction_manager=manager)
        try:
            manager.begin()
            root = connection.root()
            created = False
            if database.ROOT_NAME not in root:
                folder = rootFolder()
                folder.setSiteManager(LocalSiteManager(folder))
                root[database.ROOT_NAME] = folder
                created = True
            # Now, not by the first tasks at once (they would conflict).
            missing_markers = markers.container(connection) is None
            if missing_markers:
                markers.container(connection, create=True)
            if not (created or missing_markers):
                manager.abort()
                return False
            manager.get().note('z3c.celery: bootstrap')
            manager.commit()
            if created:
                log.info('Created the root folder %r', database.ROOT_NAME)
            return created
        except ConflictError:
            manager.abort()
        finally:
            connection.close()
    raise ZopeConfError(
        f'Could not create the root folder in {db} ({attempts} conflicts)')


def open_own_database(app, zope_conf=None, avoid_filestorage=False):
    """Open the outbox database of a zope.conf for this caller alone.

    The zope.conf is *zope_conf*, else the one this process loaded, else
    the ``ZOPE_CONF`` setting (it is loaded, site ZCML included, if this
    process has not loaded one).  Its databases are opened as a new
    multi-database, apart from the ones tasks use, and neither registered
    nor set anywhere.  Returns ``(db, close)``, or ``(None, None)`` when
    there is no zope.conf, or (with *avoid_filestorage*) it is a
    FileStorage.
    """
    options = loaded_options()
    path = zope_conf or (None if options is not None
                         else app.z3c_setting('ZOPE_CONF'))
    if path:
        options = load_zope_conf(path)
    if options is None:
        log.warning('Outbox relay not started: no ZODB database in this '
                    'process and no zope.conf to open one from')
        return None, None
    name = app.z3c_setting('zodb_database')
    factories = list(options.databases)
    names = [f.name or '' for f in factories]
    wanted = factories[names.index(name)] if name in names else (
        factories[0] if factories and not name else None)
    if wanted is None:
        raise LookupError(f'The zope.conf has no database named {name!r}')
    if avoid_filestorage and isinstance(
            getattr(wanted.config, 'storage', None), ZODB.config.FileStorage):
        log.warning('Outbox relay not started in this prefork worker: its '
                    'database is a FileStorage, which only one process may '
                    'open (use ZEO, or run "celery outbox flush")')
        return None, None
    dbs, databases = zope.app.appsetup.appsetup.multi_database(factories)

    def close():
        for db in dbs:
            try:
                db.close()
            except Exception:   # pragma: no cover
                log.warning('Closing %r failed', db, exc_info=True)
    return databases[name] if name in databases else dbs[0], close



def unload():
    """Close the databases and forget the zope.conf this process loaded.

    The site's component registrations stay (they go with the tests'
    cleanup).
    """
    close_databases()
    _state.path = None
    _state.options = None
    _state.bootstrapped = False


zope.testing.cleanup.addCleanUp(unload)
