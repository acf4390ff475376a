"""Layers of the 1.x application, built as the 1.x docs describe.

``END_TO_END_LAYER`` runs a real worker; ``EAGER_LAYER`` 1.x's eager mode.
"""
import os
import shutil
import tempfile

import plone.testing
import plone.testing.zca
import zope.principalregistry.principalregistry

import z3c.celery.conftest
import z3c.celery.layer
import z3c.celery.testing

import tests.compat1x
from tests.compat1x import celeryconfig


HERE = os.path.dirname(os.path.abspath(__file__))

class SiteZCML(plone.testing.zca.ZCMLSandbox):
    """The site ZCML; the principals it defines go with it."""

    def tearDown(self):
        super().tearDown()
        # The principal registry is module state, outside the stacked
        # component registry the sandbox pops.
        zope.principalregistry.principalregistry.principalRegistry._clear()


ZCML_LAYER = SiteZCML(
    name='CeleryZCML', filename='ftesting.zcml', package=tests.compat1x)


class CelerySettingsLayer(plone.testing.Layer):
    """Settings for the Celery end to end tests."""

    def setUp(self):
        self['storage_file_fixture'] = z3c.celery.conftest.storage_file()
        self['storage_file'] = next(self['storage_file_fixture'])
        self['conf_dir'] = tempfile.mkdtemp()
        zope_conf = os.path.join(self['conf_dir'], 'zope.conf')
        with open(zope_conf, 'w') as f:
            f.write(z3c.celery.testing.ZOPE_CONF_TEMPLATE.format(
                ftesting_path=os.path.join(HERE, 'ftesting.zcml'),
                zodb_path=self['storage_file'], product_config=''))
        # Read by logging.ini in the worker.
        os.environ['COMPAT1X_TASK_LOG'] = os.path.join(
            self['conf_dir'], 'tasks.log')
        self['celery_config'] = z3c.celery.conftest.celery_config(zope_conf)
        # The deployment's worker settings, from its celeryconfig.
        for name in ('LOGGING_INI', 'DEBUG_WORKER', 'worker_boot_timeout'):
            self['celery_config'][name] = getattr(celeryconfig, name)
        self['celery_parameters'] = (
            z3c.celery.conftest.celery_parameters())
        self['celery_worker_parameters'] = {'queues': ('hiprio', 'celery')}
        self['celery_includes'] = ['tests.compat1x.tasks']

    def tearDown(self):
        del self['celery_config']
        del self['celery_includes']
        del self['celery_parameters']
        del self['celery_worker_parameters']
        next(self['storage_file_fixture'], None)
        del self['storage_file_fixture']
        del self['storage_file']
        shutil.rmtree(self['conf_dir'])
        del self['conf_dir']


CELERY_SETTINGS_LAYER = CelerySettingsLayer()
CONFIGURED_END_TO_END_LAYER = z3c.celery.layer.EndToEndLayer(
    bases=[CELERY_SETTINGS_LAYER], name='ConfiguredEndToEndLayer')
END_TO_END_LAYER = plone.testing.Layer(
    bases=(CONFIGURED_END_TO_END_LAYER, ZCML_LAYER),
    name='Compat1xEndToEndLayer')

EAGER_LAYER = plone.testing.Layer(
    bases=(z3c.celery.layer.EAGER_LAYER, ZCML_LAYER),
    name='Compat1xEagerLayer')
