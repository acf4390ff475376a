"""The pytest fixtures of z3c.celery 1.x, for tests written against 1.x.

Load them as 1.x users did, in your ``conftest.py``::

    pytest_plugins = ['z3c.celery.conftest']

Each name is still a plain function too, so 1.x layer code that calls
them (``z3c.celery.conftest.celery_parameters()``,
``next(z3c.celery.conftest.storage_file())``) keeps working; the fixtures
are registered under the same names.

Celery 4 loaded its own pytest plugin (``celery_session_worker`` and
friends) automatically; Celery 5 does not.  So `celery_session_worker`
is provided here: a real ``celery worker`` process set up from
``celery_config``, ``celery_includes`` and ``celery_worker_parameters``.

New tests should use the ``zope_celery_*`` fixtures of the plugin
(:mod:`z3c.celery.testing.pytest_plugin`), loaded automatically.
"""
import collections
import contextlib
import os
import shutil
import tempfile

import pytest
import transaction
import zope.security.management

import z3c.celery
from z3c.celery import testing
from z3c.celery.app import TransactionAwareTask
from z3c.celery.app import ZopeLoader
from z3c.celery.testing.celery_fixtures import celery_session_worker  # noqa
from z3c.celery.worker.components import login_principal


# The zope_celery_* fixtures these build on (a no-op when pytest loaded
# the plugin through its entry point already).
pytest_plugins = ['z3c.celery.testing.pytest_plugin']

ZODBConnection = collections.namedtuple(
    'ZODBConnection', ['connection', 'rootFolder', 'zodb'])

#: The environment variable 1.x read the broker (and backend) URL from.
BROKER_ENV = 'Z3C_CELERY_BROKER'


# Plain functions (1.x called some of them directly)


def storage_file():
    """Yield the path of a FileStorage file in a new temporary directory."""
    directory = tempfile.mkdtemp(prefix='z3c-celery-storage-')
    try:
        yield os.path.join(directory, 'Data.fs')
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _zope_conf(storage_file, site_zcml_text=None):
    directory = tempfile.mkdtemp(prefix='z3c-celery-conf-')
    try:
        site = os.path.join(directory, 'site.zcml')
        with open(site, 'w') as f:
            f.write(site_zcml_text or testing.site_zcml())
        yield testing.write_zope_conf(
            os.path.join(directory, 'zope.conf'), site,
            zodb_path=storage_file)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def zope_conf(storage_file):
    """Yield the path of a zope.conf (`testing.ZOPE_CONF_TEMPLATE`).

    Its site ZCML is `testing.SITE_ZCML_TEMPLATE` (principals
    ``zope.user`` and ``zope.editor``); its database the FileStorage
    *storage_file*.
    """
    with _zope_conf(storage_file) as path:
        yield path


def celery_config(zope_conf):
    """Celery settings for end-to-end tests (1.x keys).

    The broker and result backend are ``$Z3C_CELERY_BROKER`` when set;
    otherwise there is no ``broker_url`` and the `EndToEndLayer` starts a
    private Redis server (the fixture uses the plugin's).
    """
    config = {
        'worker_send_task_events': True,
        'task_send_sent_event': True,
        'task_remote_tracebacks': True,
        'ZOPE_CONF': zope_conf,
    }
    url = os.environ.get(BROKER_ENV)
    if url:
        config['broker_url'] = url
        config['result_backend'] = url
    return config


def celery_parameters():
    """1.x's parameters to create the Celery app (see `EndToEndLayer`)."""
    return {
        'task_cls': TransactionAwareTask,
        'strict_typing': False,
        'loader': ZopeLoader,
    }


# 1.x's layers built their settings with these (plain functions, not
# fixtures): ``_celery_config(zope_conf)``, ``_celery_parameters()``; and
# ``_zope_conf(storage_file)`` (a context manager, above).
_celery_config = celery_config
_celery_parameters = celery_parameters


def celery_enable_logging():
    return True


def celery_includes():
    """Modules the worker imports; override with your tasks' modules."""
    return ()


def celery_worker_pool():
    return 'prefork'


def celery_worker_parameters():
    return {}


# The fixtures


@pytest.fixture(name='zcml')
def _zcml(zope_celery_zcml):
    """The site ZCML (``zope_celery_site_zcml``) loaded for one test."""
    yield zope_celery_zcml


@pytest.fixture(name='automatic_transaction_begin', autouse=True)
def _automatic_transaction_begin():
    """Begin a new transaction and end the interaction for every test."""
    transaction.begin()
    zope.security.management.endInteraction()


@pytest.fixture(name='interaction')
def _interaction(automatic_transaction_begin):
    """An interaction for principal ``zope.user``; yields the principal."""
    import zope.security.testing
    principal = zope.security.testing.Principal(
        'zope.user', title='User', groups=['zope.Authenticated'],
        description='test@example.com')
    login_principal(principal)
    yield principal
    zope.security.management.endInteraction()


@pytest.fixture(name='storage_file', scope='session')
def _storage_file():
    yield from storage_file()


@pytest.fixture(name='zope_conf', scope='session')
def _zope_conf_fixture(storage_file, zope_celery_site_zcml):
    with _zope_conf(storage_file, zope_celery_site_zcml) as path:
        yield path


@pytest.fixture(name='eager_celery_app')
def _eager_celery_app(zope_conf):
    """``z3c.celery.CELERY`` in eager mode, with ``ZOPE_CONF`` set."""
    undo = testing.override_settings(
        z3c.celery.CELERY,
        dict(testing.mode_settings('eager'), ZOPE_CONF=zope_conf))
    yield z3c.celery.CELERY
    undo()


@pytest.fixture(name='celery_config', scope='session')
def _celery_config_fixture(zope_conf, request):
    config = celery_config(zope_conf)
    if 'broker_url' not in config:
        url = request.getfixturevalue('zope_celery_redis').url + '/1'
        config['broker_url'] = config['result_backend'] = url
    return config


@pytest.fixture(name='celery_parameters', scope='session')
def _celery_parameters_fixture():
    return celery_parameters()


@pytest.fixture(name='celery_enable_logging', scope='session')
def _celery_enable_logging():
    return celery_enable_logging()


@pytest.fixture(name='celery_includes', scope='session')
def _celery_includes():
    return celery_includes()


@pytest.fixture(name='celery_worker_pool', scope='session')
def _celery_worker_pool():
    return celery_worker_pool()


@pytest.fixture(name='celery_worker_parameters', scope='session')
def _celery_worker_parameters():
    return celery_worker_parameters()
