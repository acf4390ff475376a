"""Fixtures of z3c.celery's own tests: a clean component registry, a real
ZODB with a root site, the site ZCML, a real Redis server."""
import os

import pytest
import transaction
import ZODB
import ZODB.FileStorage
import zope.component.testing
import zope.security.management
from BTrees.OOBTree import OOBTree
from zope.configuration import xmlconfig

from z3c.celery import environment
from z3c.celery import servers
from z3c.celery.zopeconf import ensure_root_folder


HERE = os.path.dirname(__file__)

#: A 1.x project with a conftest of its own, run in its own pytest process
#: by test_compat1x_project.py.
collect_ignore = ['compat1x_project']

ROOT = os.path.dirname(HERE)

#: The site part every functional test loads: our package, two principals
#: and the principal registry as the site's IAuthentication utility.
SITE_ZCML = '''\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:celery="http://namespaces.zope.org/celery">
  <include package="zope.component" file="meta.zcml" />
  <include package="zope.security" file="meta.zcml" />
  <include package="zope.principalregistry" file="meta.zcml" />
  <include package="z3c.celery" />
  <principal id="zope.alice" title="Alice" login="alice" password="a" />
  <principal id="zope.bob" title="Bob" login="bob" password="b" />
  <utility
      component="zope.principalregistry.principalregistry.principalRegistry"
      provides="zope.authentication.interfaces.IAuthentication" />
  {body}
</configure>
'''


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
    database = make_site_db(str(tmp_path / 'Data.fs'))
    environment.set_database(database)
    yield database
    environment.set_database(None)
    database.close()


def read_data(db):
    with db.transaction() as conn:
        return dict(conn.root()['data'])


@pytest.fixture
def login():
    """Start an interaction for a principal of SITE_ZCML."""
    from z3c.celery.celery import get_principal
    from z3c.celery.celery import login_principal

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
