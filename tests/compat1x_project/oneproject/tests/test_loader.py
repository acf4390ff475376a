"""The worker's loader: ``z3c.celery.loader.ZopeLoader``."""
import contextlib
import os

import celery
import oneproject
import plone.testing.zca
import pytest
import zope.app.appsetup.appsetup
from zope.principalregistry.principalregistry import principalRegistry

import z3c.celery
import z3c.celery.testing
from z3c.celery.loader import ZopeLoader


HERE = os.path.dirname(os.path.abspath(oneproject.__file__))


@pytest.fixture
def own_zope_conf(tmp_path):
    path = tmp_path / 'zope.conf'
    path.write_text(z3c.celery.testing.ZOPE_CONF_TEMPLATE.format(
        zodb_path=str(tmp_path / 'Data.fs'),
        ftesting_path=os.path.join(HERE, 'ftesting.zcml'),
        product_config=''))
    return str(path)


@contextlib.contextmanager
def zope_loader(app):
    plone.testing.zca.pushGlobalRegistry()
    try:
        app.loader.on_worker_process_init()
        yield
    finally:
        app.loader.on_worker_shutdown()
        plone.testing.zca.popGlobalRegistry()
        principalRegistry._clear()
        zope.app.appsetup.appsetup.reset()


def test_process_init_without_zope_conf_raises(eager_celery_app):
    eager_celery_app.conf['ZOPE_CONF'] = None
    loader = ZopeLoader(app=eager_celery_app)
    with pytest.raises(ValueError) as err:
        loader.on_worker_process_init()
    assert ('Celery setting ZOPE_CONF not set, check celery worker config.'
            == str(err.value))


def test_process_init_loads_the_zope_conf_and_its_site(
        eager_celery_app, own_zope_conf):
    eager_celery_app.conf['ZOPE_CONF'] = own_zope_conf
    with zope_loader(eager_celery_app):
        assert ('Ben Utzer' ==
                principalRegistry.getPrincipal('example.user').title)


def test_process_init_can_run_again_after_shutdown(
        eager_celery_app, own_zope_conf):
    eager_celery_app.conf['ZOPE_CONF'] = own_zope_conf
    with zope_loader(eager_celery_app):
        pass
    with zope_loader(eager_celery_app):
        assert 'User' == principalRegistry.getPrincipal('zope.user').title


def test_configuration_from_a_python_file(tmp_path, monkeypatch):
    path = tmp_path / 'myceleryconfig.py'
    path.write_text("broker_url = 'memory://'\nZOPE_CONF = '/x/zope.conf'\n")
    monkeypatch.delenv('CELERY_CONFIG_MODULE', raising=False)
    monkeypatch.setenv('CELERY_CONFIG_FILE', str(path))
    app = celery.Celery('oneproject.config', loader=ZopeLoader,
                        set_as_current=False)
    config = app.loader.read_configuration()
    assert 'memory://' == config['broker_url']
    assert '/x/zope.conf' == config['ZOPE_CONF']
