"""pytest plugin of z3c.celery (loaded through the ``pytest11`` entry point).

Fixtures, all named ``zope_celery_*`` (the 1.x names are in
:mod:`z3c.celery.conftest`):

========================== ======== ==========================================
fixture                    scope    what it gives
========================== ======== ==========================================
zope_celery_site_zcml      session  text of the site ZCML (override it)
zope_celery_site_zcml_file function that text as a file
zope_celery_zcml           function the site ZCML loaded in a clean registry
zope_celery_db             function a FileStorage database with a root folder,
                                    the tasks' database
zope_celery_zeo            session  a ZEO server (``servers.ZEOServer``)
zope_celery_zeo_db         function a database on that server, the tasks'
                                    database (shared with the worker)
zope_celery_principal_id   function id of the principal tests act as
zope_celery_interaction    function an interaction for that principal
zope_celery_eager          function ``CELERY`` in eager mode (1.x)
zope_celery_inline         function ``CELERY`` in inline mode (unit tests)
zope_celery_redis          session  a real ``redis-server``
zope_celery_worker_config  session  Celery settings for the worker
zope_celery_includes       session  modules the worker imports
zope_celery_worker         session  a real ``celery worker`` process
zope_celery_end_to_end     function ``CELERY`` publishing to that worker
zope_celery_recorder       function a ``testing.TaskRecorder``
========================== ======== ==========================================

z3c.celery is not imported, and nothing started, before a test asks for
a fixture (see `_testing`).
"""
import os
import sys

import pytest
import transaction
import zope.component.testing
import zope.security.management
from zope.configuration import xmlconfig


def _testing():
    """``z3c.celery.testing``, imported when a test first asks for a
    fixture, not when pytest loads the plugin: importing z3c.celery makes
    its app Celery's default app, which a test run that does not use
    z3c.celery must not get."""
    from z3c.celery import testing
    return testing


@pytest.fixture(scope='session')
def zope_celery_site_zcml():
    """The site ZCML text the fixtures load (and the worker loads).

    Override it (session scope) with your site, e.g. built with
    ``z3c.celery.testing.site_zcml(body)``.
    """
    return _testing().site_zcml()


class _SiteFiles:
    """Site ZCML texts written to files, one file per distinct text."""

    def __init__(self, tmp_path_factory):
        self.factory = tmp_path_factory
        self.paths = {}

    def path_for(self, text):
        if text not in self.paths:
            path = self.factory.mktemp('z3c-celery-site') / 'site.zcml'
            path.write_text(text)
            self.paths[text] = str(path)
        return self.paths[text]


@pytest.fixture(scope='session')
def _zope_celery_site_files(tmp_path_factory):
    return _SiteFiles(tmp_path_factory)


@pytest.fixture
def zope_celery_site_zcml_file(zope_celery_site_zcml,
                               _zope_celery_site_files):
    """The path of a file holding the site ZCML.

    Function scope, so that a module or directory overriding
    ``zope_celery_site_zcml`` gets its own file.
    """
    return _zope_celery_site_files.path_for(zope_celery_site_zcml)


@pytest.fixture
def zope_celery_zcml(zope_celery_site_zcml_file):
    """Load the site ZCML into a clean component registry.

    Yields the configuration context.  Afterwards everything registered,
    the Celery configuration from ``<celery:config>`` and the interaction
    are cleaned up (``zope.testing.cleanup``).
    """
    zope.component.testing.setUp()
    transaction.abort()
    context = xmlconfig.file(zope_celery_site_zcml_file)
    yield context
    transaction.abort()
    zope.security.management.endInteraction()
    zope.component.testing.tearDown()


@pytest.fixture
def zope_celery_db(zope_celery_zcml, tmp_path):
    """A FileStorage database with a root folder; tasks run against it."""
    testing = _testing()
    db = testing.filestorage_db(str(tmp_path / 'Data.fs'))
    testing.set_database(db)
    yield db
    testing.set_database(None)
    db.close()


@pytest.fixture(scope='session')
def zope_celery_zeo(tmp_path_factory):
    """A ZEO server on a FileStorage, for the whole session."""
    path = tmp_path_factory.mktemp('z3c-celery-zeo') / 'Data.fs'
    server = _testing().ZEOServer(str(path)).start()
    yield server
    server.stop()


@pytest.fixture
def zope_celery_zeo_db(zope_celery_zcml, zope_celery_zeo):
    """A database on the session's ZEO server; tasks run against it.

    The worker of `zope_celery_worker` uses the same server, so both see
    each other's commits.  The data stays for the whole session.
    """
    testing = _testing()
    db = testing.zeo_db(zope_celery_zeo.address)
    testing.set_database(db)
    yield db
    testing.set_database(None)
    db.close()


@pytest.fixture
def zope_celery_principal_id():
    """The principal tests act as (one of the default site ZCML)."""
    return 'zope.user'


@pytest.fixture
def zope_celery_interaction(zope_celery_zcml, zope_celery_principal_id):
    """An interaction for `zope_celery_principal_id`; yields the principal.

    Tasks queued in the test run as this principal.
    """
    testing = _testing()
    principal = testing.get_principal(zope_celery_principal_id)
    testing.login_principal(principal)
    yield principal
    zope.security.management.endInteraction()


def _mode(mode):
    testing = _testing()
    return testing.override_settings(
        testing.CELERY, testing.mode_settings(mode))


@pytest.fixture
def zope_celery_eager(zope_celery_zcml):
    """``z3c.celery.CELERY`` in eager mode (1.x: ``task_always_eager``).

    Tasks run in this process right after the commit, without
    serializing their arguments.
    """
    undo = _mode('eager')
    yield _testing().CELERY
    undo()


@pytest.fixture
def zope_celery_inline(zope_celery_zcml):
    """``z3c.celery.CELERY`` in inline mode, the mode for unit tests.

    Tasks are queued for real and run in this process right after the
    commit, each in its own transaction and ZODB connection, as a worker
    would run them.
    """
    undo = _mode('inline')
    yield _testing().CELERY
    undo()


@pytest.fixture(scope='session')
def zope_celery_redis():
    """A real ``redis-server`` on 127.0.0.1, for the whole session."""
    server = _testing().RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope='session')
def zope_celery_includes():
    """Modules with tasks the worker imports (override it)."""
    return ()


@pytest.fixture(scope='session')
def zope_celery_worker_parameters():
    """Worker options: ``queues``, ``concurrency``, ``pool``, ..."""
    return {}


@pytest.fixture(scope='session')
def zope_celery_worker_config(zope_celery_redis, zope_celery_zeo,
                              zope_celery_site_zcml, _zope_celery_site_files,
                              tmp_path_factory):
    """The Celery settings of the worker and of the end-to-end app.

    Redis as broker and result backend, and a zope.conf (``ZOPE_CONF``)
    with the site ZCML and the session's ZEO server.  One worker serves
    the session: override ``zope_celery_site_zcml`` in the top-level
    ``conftest.py`` so that worker and tests load the same site.
    """
    testing = _testing()
    directory = tmp_path_factory.mktemp('z3c-celery-worker')
    zope_conf = testing.write_zope_conf(
        str(directory / 'zope.conf'),
        _zope_celery_site_files.path_for(zope_celery_site_zcml),
        zeo_address=zope_celery_zeo.address)
    url = zope_celery_redis.url + '/0'
    return {
        'broker_url': url,
        'result_backend': url,
        'ZOPE_CONF': zope_conf,
    }


@pytest.fixture(scope='session')
def zope_celery_worker(zope_celery_worker_config, zope_celery_includes,
                       zope_celery_worker_parameters):
    """A real ``celery -A z3c.celery.CELERY worker`` process.

    Started once per session, stopped by its pid at the end.  It imports
    `zope_celery_includes`; the test's ``sys.path`` is its ``PYTHONPATH``.
    """
    worker = _testing().WorkerProcess(
        zope_celery_worker_config, includes=zope_celery_includes,
        parameters=zope_celery_worker_parameters,
        pythonpath=[p for p in sys.path if p and os.path.isdir(p)])
    worker.start()
    yield worker
    worker.close()


@pytest.fixture
def zope_celery_end_to_end(zope_celery_worker, zope_celery_worker_config,
                           zope_celery_zeo_db):
    """``z3c.celery.CELERY`` publishing after commit to the real worker.

    Results come back through the result backend (``result.get(timeout=)``).
    The tasks' database is the ZEO database the worker uses too.
    """
    testing = _testing()
    undo = testing.override_settings(
        testing.CELERY,
        dict(zope_celery_worker_config, **testing.mode_settings(
            'end-to-end')))
    yield testing.CELERY
    testing.release_results(testing.CELERY)
    undo()


@pytest.fixture
def zope_celery_recorder():
    """A `z3c.celery.testing.TaskRecorder` active during the test."""
    with _testing().TaskRecorder() as recorder:
        yield recorder


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Register `z3c.celery.testing.celery_fixtures` after every plugin.

    1.x projects used ``celery_session_worker`` of Celery's plugin; the
    one of `celery_fixtures` (a real Zope worker when
    ``celery_config`` names a ``ZOPE_CONF``) must win over Celery's,
    whether that was loaded with ``-p``, an entry point or a
    ``pytest_plugins`` of an initial conftest: among plugins, the one
    registered last wins.
    """
    name = 'z3c.celery.testing.celery_fixtures'
    if not config.pluginmanager.has_plugin(name):
        config.pluginmanager.import_plugin(name)
