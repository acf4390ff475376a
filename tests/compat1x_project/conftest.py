"""The project's fixtures, as a project using z3c.celery 1.x defines them.

``celery_session_worker`` and the defaults of the other ``celery_*``
fixtures come from the installed pytest plugins.
"""
import os
import tempfile

import oneproject
import plone.testing.zca
import pytest
import transaction
import zope.principalregistry.principalregistry
import zope.security.management
import zope.security.testing

import z3c.celery.celery
import z3c.celery.testing


HERE = os.path.dirname(os.path.abspath(oneproject.__file__))


@pytest.fixture(scope='session')
def storage_file():
    with tempfile.NamedTemporaryFile() as storage_file:
        yield storage_file.name


@pytest.fixture(scope='session')
def zope_conf(storage_file):
    with tempfile.NamedTemporaryFile(mode='w', suffix='.conf') as conf:
        conf.write(z3c.celery.testing.ZOPE_CONF_TEMPLATE.format(
            zodb_path=storage_file,
            ftesting_path=os.path.join(HERE, 'ftesting.zcml'),
            product_config=''))
        conf.flush()
        yield conf.name


@pytest.fixture(scope='session')
def celery_config(zope_conf):
    return {
        'broker_url': os.environ['Z3C_CELERY_BROKER'],
        'result_backend': os.environ['Z3C_CELERY_BROKER'],
        'worker_send_task_events': True,
        'task_send_sent_event': True,
        'task_remote_tracebacks': True,
        'ZOPE_CONF': zope_conf,
    }


@pytest.fixture(scope='session')
def celery_parameters():
    return {
        'task_cls': z3c.celery.celery.TransactionAwareTask,
        'strict_typing': False,
        'loader': z3c.celery.celery.ZopeLoader,
    }


@pytest.fixture(scope='session')
def celery_includes():
    return ('oneproject.tasks',)


@pytest.fixture(scope='session')
def celery_worker_pool():
    return 'prefork'


@pytest.fixture
def zcml():
    layer = plone.testing.zca.ZCMLSandbox(
        name='OneProjectZCML', filename='ftesting.zcml',
        module=__name__, package=oneproject)
    layer.setUp()
    yield layer
    layer.tearDown()
    zope.principalregistry.principalregistry.principalRegistry._clear()


@pytest.fixture(autouse=True)
def automatic_transaction_begin():
    transaction.begin()
    zope.security.management.endInteraction()


@pytest.fixture
def interaction(automatic_transaction_begin):
    principal = zope.security.testing.Principal(
        'zope.user', groups=['zope.Authenticated'],
        description='test@example.com')
    z3c.celery.celery.login_principal(principal)
    yield principal
    zope.security.management.endInteraction()


@pytest.fixture
def eager_celery_app(zope_conf):
    app = z3c.celery.CELERY
    old = dict(app.conf)
    app.conf['ZOPE_CONF'] = zope_conf
    app.conf['task_always_eager'] = True
    app.conf['task_eager_propagates'] = True
    yield app
    app.conf.update(old)
