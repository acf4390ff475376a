"""The guide's tests for zope.testrunner, in the inline and eager layers."""
import unittest

import transaction
import zope.component
import zope.security.management

from z3c.celery.interfaces import ITask
from z3c.celery.testing import get_principal
from z3c.celery.testing import login_principal

from tests.guide import layers


class RememberTests:
    """The same test in each mode."""

    def setUp(self):
        login_principal(get_principal('zope.user'))

    def tearDown(self):
        transaction.abort()
        zope.security.management.endInteraction()

    def test_task_runs_after_commit_as_the_user(self):
        task = zope.component.getUtility(ITask, 'guide.remember')
        result = task.delay('greeting', 'hello')
        transaction.commit()
        self.assertEqual(result.get(), 'hello')
        with self.layer['zodbDB'].transaction() as conn:
            self.assertEqual(conn.root()['Application']['greeting'],
                             ('hello', 'zope.user'))


class InlineTests(RememberTests, unittest.TestCase):

    layer = layers.INLINE_LAYER


class EagerTests(RememberTests, unittest.TestCase):

    layer = layers.EAGER_LAYER
