"""Fixtures of z3c.celery's own tests: a clean component registry, a real
ZODB with a root site, the site ZCML, a real Redis server."""
import os

import persistent.mapping
import pytest
import transaction
import ZODB
import ZODB.FileStorage
import zope.component.testing
import zope.security.management
from BTrees.OOBTree import OOBTree
from zope.configuration import xmlconfig

from z3c.celery import database
from z3c.celery import testing
from z3c.celery.testing import servers
from z3c.celery.worker.zopeconf import ensure_root_folder

from tests.workers import PRINCIPALS


HERE = os.path.dirname(__file__)

#: A 1.x project with a conftest of its own, run in its own pytest process
#: by test_compat1x_project.py.
collect_ignore = ['compat1x_project']

ROOT = os.path.dirname(HERE)

#: The site every functional test loads: our package, the principals of
#: the test site and ``{body}`` (fill it in with ``str.format``).
SITE_ZCML = testing.site_zcml('{body}', principals=PRINCIPALS)


class VetoingDataManager:
    """Votes no; sorts after every other data manager (after ours too)."""

    transaction_manager = transaction.manager

    def abort(self, txn):
        pass
    tpc_begin = commit = tpc_abort = tpc_finish = abort

    def tpc_vote(self, txn):
        raise ValueError('vetoed')

    def sortKey(self):
        return '~~~ after everything'


@pytest.fixture
def zca():
    """A clean component registry, Celery configuration and interaction."""
    zope.component.testing.setUp()
    transaction.abort()
    yield
    transaction.abort()
    zope.security.management.endInteraction()
    zope.component.testing.tearDown()


@pytest.fixture
def load_zcml(zca):
    """Load a site ZCML snippet (inside SITE_ZCML) and return the context."""
    def load(body='', full=None):
        return xmlconfig.string(full or SITE_ZCML.format(body=body))
    return load


def make_site_db(path):
    """A FileStorage database with a root site folder and ``data``."""
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path))
    ensure_root_folder(db)
    with db.transaction() as conn:
        conn.root().setdefault('data', OOBTree())
    return db


@pytest.fixture
def db(tmp_path, zca):
    """A real FileStorage database, set as the tasks' database."""
    site_db = make_site_db(str(tmp_path / 'Data.fs'))
    database.set_database(site_db)
    yield site_db
    database.set_database(None)
    site_db.close()


@pytest.fixture
def fs_db(tmp_path):
    """A FileStorage database with persistent mappings ``a`` to ``d`` in
    its root; yields a factory of connections, each with a transaction
    manager of its own and a transaction begun."""
    db = ZODB.DB(str(tmp_path / 'Objects.fs'))
    with db.transaction() as conn:
        for name in ('a', 'b', 'c', 'd'):
            conn.root()[name] = persistent.mapping.PersistentMapping()
    opened = []

    def open_connection():
        manager = transaction.TransactionManager()
        conn = db.open(transaction_manager=manager)
        opened.append(conn)
        manager.begin()
        return conn
    yield open_connection
    for conn in opened:
        conn.transaction_manager.abort()
        conn.close()
    db.close()


def read_data(db):
    with db.transaction() as conn:
        return dict(conn.root()['data'])


@pytest.fixture
def login():
    """Start an interaction for a principal of SITE_ZCML."""
    from z3c.celery.testing import get_principal
    from z3c.celery.testing import login_principal

    def login(principal_id):
        login_principal(get_principal(principal_id))
    yield login
    zope.security.management.endInteraction()


@pytest.fixture(scope='session')
def redis_server():
    """A real redis-server on 127.0.0.1 at a free port (whole session)."""
    server = servers.RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_db(redis_server):
    """A flushed Redis database and its URL."""
    client = redis_server.client()
    client.flushall()
    yield redis_server.url + '/0'
    client.flushall()


# Module-scoped real servers for the modules that share one worker.

@pytest.fixture(scope='module')
def redis():
    """A real redis-server for the tests of one module."""
    with servers.RedisServer() as server:
        yield server


@pytest.fixture(scope='module')
def zeo(tmp_path_factory):
    """A real ZEO server (FileStorage behind it) for one module."""
    path = tmp_path_factory.mktemp('zeo') / 'Data.fs'
    with servers.ZEOServer(str(path)) as server:
        yield server


@pytest.fixture(scope='module')
def zodb(zeo):
    """A client of the module's ZEO database, with the test site in it."""
    from tests import workers
    db = workers.zeo_db(zeo.address)
    workers.prepare_database(db)
    yield db
    db.close()
