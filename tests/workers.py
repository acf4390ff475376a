"""The test site of real ``celery worker`` processes, for tests and benchmarks.

* `write_site` writes a zope.conf (FileStorage or ZEO client) and a site
  ZCML (``<celery:config>`` pointing at a given Redis, the principals
  ``zope.alice`` / ``zope.bob``, the tasks of ``tests/site/tasks.zcml``)
  with the templates of `z3c.celery.testing`.
* `Worker` is `z3c.celery.testing.WorkerProcess` with our defaults (the
  checkout on its ``PYTHONPATH``, so ``tests.*`` is importable).
* `PersistentRedis`: a Redis that keeps its data over a restart.

Every wait is bounded; a failure to start raises with the worker's log.
"""
import contextlib
import os
import subprocess
import time

from z3c.celery import testing
from z3c.celery.testing import servers


#: The principals of the test site (``id, title, login, password``).
PRINCIPALS = (('zope.alice', 'Alice', 'alice', 'a'),
              ('zope.bob', 'Bob', 'bob', 'b'))


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


def write_site(directory, broker_url, *, fs_path=None, zeo_address=None,
               dispatch='after-commit', config='', extra='', events=True):
    """Write ``zope.conf`` and ``site.zcml`` into *directory*.

    Give *fs_path* (a FileStorage file) or *zeo_address* (``(host,
    port)`` or ``'host:port'``).  *config* is more attributes of
    ``<celery:config>`` (text), *extra* more ZCML inside ``<configure>``.
    With *events*, a subscriber logs every z3c.celery event (``EVENT
    TaskStarted name[id] principal=...``).
    """
    if (fs_path is None) == (zeo_address is None):
        raise ValueError('write_site: give either fs_path or zeo_address')
    os.makedirs(directory, exist_ok=True)
    site_zcml = os.path.join(directory, 'site.zcml')
    body = f"""
  <celery:config
      broker_url="{broker_url}"
      result_backend="{broker_url}"
      dispatch="{dispatch}"
      {config}
      />
  <include file="{SITE_DIR}/tasks.zcml" />
  {f'<include file="{SITE_DIR}/events.zcml" />' if events else ''}
  {extra}"""
    with open(site_zcml, 'w') as f:
        f.write(testing.site_zcml(body, principals=PRINCIPALS))
    zope_conf = testing.write_zope_conf(
        os.path.join(directory, 'zope.conf'), site_zcml,
        zodb_path=None if fs_path is None else os.path.abspath(fs_path),
        zeo_address=zeo_address, wait_timeout=15)
    return Site(directory, zope_conf, site_zcml, broker_url, fs_path,
                zeo_address)


def prepare_database(db):
    """Give *db* the root folder and the ``data`` tree the tasks use."""
    from BTrees.OOBTree import OOBTree
    testing.ensure_root_folder(db)
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


@contextlib.contextmanager
def as_web_process(site, db, principal_id='zope.alice'):
    """This process as a web process of *site* on *db*, logged in."""
    import transaction
    import zope.component.testing
    import zope.security.management
    from zope.configuration import xmlconfig
    from z3c.celery import database
    from z3c.celery.testing import get_principal
    from z3c.celery.testing import login_principal
    zope.component.testing.setUp()
    try:
        xmlconfig.file(site.site_zcml)
        database.set_database(db)
        login_principal(get_principal(principal_id))
        yield
    finally:
        transaction.abort()
        zope.security.management.endInteraction()
        zope.component.testing.tearDown()


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


def Worker(zope_conf=None, *, pool='solo', concurrency=1, loglevel='INFO',
           start_timeout=60.0, **options):
    """A `z3c.celery.testing.WorkerProcess` of our tests.

    *zope_conf* is passed as ``--zope-conf``; the checkout is on the
    worker's ``PYTHONPATH``.  The other *options* are those of
    `WorkerProcess` (``broker_url``, ``logging_ini``, ``config``,
    ``env``, ``args``, ``directory``, ``app``, ...).
    """
    return testing.WorkerProcess(
        zope_conf=zope_conf, timeout=start_timeout, pythonpath=[ROOT],
        parameters={'pool': pool, 'concurrency': concurrency,
                    'loglevel': loglevel}, **options)
