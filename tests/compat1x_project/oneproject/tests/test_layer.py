"""plone.testing layers, as the 1.x documentation sets them up."""
import tempfile
import unittest

import oneproject
import plone.testing
import plone.testing.zca
import transaction
import zope.authentication.interfaces
import zope.component
from oneproject import tasks

import z3c.celery.celery
import z3c.celery.conftest
import z3c.celery.layer
from z3c.celery.testing import open_zodb_copy


ZCML_LAYER = plone.testing.zca.ZCMLSandbox(
    name='OneProjectZCML', filename='ftesting.zcml', module=__name__,
    package=oneproject)


class CelerySettingsLayer(plone.testing.Layer):
    """Settings for the end-to-end layer, from z3c.celery.conftest."""

    def setUp(self):
        self['storage'] = tempfile.NamedTemporaryFile()
        self['zope_conf_cm'] = z3c.celery.conftest._zope_conf(
            self['storage'].name)
        self['zope_conf'] = self['zope_conf_cm'].__enter__()
        self['celery_config'] = z3c.celery.conftest._celery_config(
            self['zope_conf'])
        self['celery_parameters'] = (
            z3c.celery.conftest._celery_parameters())
        self['celery_worker_parameters'] = {'queues': ('hiprio',)}
        self['celery_includes'] = ['oneproject.tasks']

    def tearDown(self):
        self['zope_conf_cm'].__exit__(None, None, None)
        self['storage'].close()
        for name in ('zope_conf_cm', 'zope_conf', 'storage', 'celery_config',
                     'celery_parameters', 'celery_worker_parameters',
                     'celery_includes'):
            del self[name]


CELERY_SETTINGS_LAYER = CelerySettingsLayer()
CONFIGURED_END_TO_END_LAYER = z3c.celery.layer.EndToEndLayer(
    bases=[CELERY_SETTINGS_LAYER], name='ConfiguredEndToEndLayer')
ONEPROJECT_CELERY_END_TO_END_LAYER = plone.testing.Layer(
    bases=(CONFIGURED_END_TO_END_LAYER, ZCML_LAYER),
    name='OneProjectCeleryEndToEndLayer')
EAGER_LAYER = plone.testing.Layer(
    bases=(z3c.celery.layer.EAGER_LAYER, ZCML_LAYER),
    name='OneProjectEagerLayer')


class EndToEndLayerTests(unittest.TestCase):

    layer = ONEPROJECT_CELERY_END_TO_END_LAYER

    def test_task_runs_in_the_worker_as_the_principal(self):
        auth = zope.component.getUtility(
            zope.authentication.interfaces.IAuthentication)
        z3c.celery.celery.login_principal(auth.getPrincipal('zope.user'))
        result = tasks.get_principal_title.apply_async(queue='hiprio')
        transaction.commit()
        self.assertEqual('User', result.get(timeout=60))

    def test_worker_writes_into_the_layer_database(self):
        result = tasks.store.apply_async(
            ('layer', 1), {'_principal_id_': 'zope.user'}, queue='hiprio')
        transaction.commit()
        self.assertEqual('layer', result.get(timeout=60))
        with open_zodb_copy(self.layer['storage'].name) as app:
            self.assertEqual((1, 'User'), app['layer'])


class EagerLayerTests(unittest.TestCase):

    layer = EAGER_LAYER

    def setUp(self):
        del tasks.RECORDED[:]

    def test_task_runs_after_commit_as_the_principal(self):
        tasks.record.delay('layer', _principal_id_='example.user')
        transaction.commit()
        self.assertEqual([('layer', 'Ben Utzer')], tasks.RECORDED)
