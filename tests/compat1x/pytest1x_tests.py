"""Tests of the 1.x application written for pytest, with the fixtures of
``z3c.celery.conftest`` (run with ``-p z3c.celery.conftest``, as a 1.x
``conftest.py`` loads them with ``pytest_plugins``)."""
import os

import plone.testing.zca
import pytest
import transaction
import zope.authentication.interfaces
import zope.component
import zope.principalregistry.principalregistry

import z3c.celery.celery
import z3c.celery.testing
from z3c.celery.session import celery_session
from z3c.celery.testing import open_zodb_copy

import tests.compat1x
from tests.compat1x import tasks


HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='session')
def zope_conf(storage_file, tmp_path_factory):
    """The application's zope.conf (1.x: override the fixture)."""
    path = tmp_path_factory.mktemp('conf') / 'zope.conf'
    path.write_text(z3c.celery.testing.ZOPE_CONF_TEMPLATE.format(
        ftesting_path=os.path.join(HERE, 'ftesting.zcml'),
        zodb_path=storage_file, product_config=''))
    return str(path)


@pytest.fixture
def zcml():
    """The application's ZCML (1.x: override the fixture)."""
    layer = plone.testing.zca.ZCMLSandbox(
        name='CeleryZCML', filename='ftesting.zcml', module=__name__,
        package=tests.compat1x)
    layer.setUp()
    yield layer
    layer.tearDown()
    zope.principalregistry.principalregistry.principalRegistry._clear()


@pytest.fixture(scope='session')
def celery_includes():
    return ('tests.compat1x.tasks',)


def test_delay_registers_a_task(interaction):
    assert 0 == len(celery_session)
    tasks.store.delay('x', 1)
    assert 1 == len(celery_session)


def test_task_runs_as_the_principal(celery_session_worker, zcml):
    auth = zope.component.getUtility(
        zope.authentication.interfaces.IAuthentication)
    z3c.celery.celery.login_principal(auth.getPrincipal('example.user'))
    result = tasks.get_principal_title_task.delay()
    transaction.commit()
    assert 'Ben Utzer' == result.get(timeout=30)


def test_handle_after_abort(celery_session_worker, storage_file,
                            interaction):
    job = tasks.except_with_handler.delay()
    transaction.commit()
    with pytest.raises(Exception):
        job.get(timeout=30)
    with open_zodb_copy(storage_file) as app:
        assert ('a1', 'a2', 1, 4, 'User') == app['data']


def test_eager(eager_celery_app, zcml):
    auth = zope.component.getUtility(
        zope.authentication.interfaces.IAuthentication)
    z3c.celery.celery.login_principal(auth.getPrincipal('zope.user'))
    result = tasks.get_principal_title_task.delay()
    transaction.commit()
    assert 'User' == result.get()
