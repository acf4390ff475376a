"""Tests of the 1.x application for zope.testrunner (1.x API only)."""
import os
import unittest

import celery.exceptions
import transaction
import zope.security.management

import z3c.celery.celery
from z3c.celery.testing import open_zodb_copy

from tests.compat1x import layers
from tests.compat1x import tasks


TIMEOUT = 30


class Compat1xTests(unittest.TestCase):

    def login(self, principal_id):
        z3c.celery.celery.login_principal(
            z3c.celery.celery.get_principal(principal_id))

    def tearDown(self):
        transaction.abort()
        zope.security.management.endInteraction()


class EndToEndTests(Compat1xTests):

    layer = layers.END_TO_END_LAYER

    def test_task_runs_as_the_principal_who_queued_it(self):
        self.login('example.user')
        result = tasks.get_principal_title_task.delay()
        transaction.commit()
        self.assertEqual('Ben Utzer', result.get(timeout=TIMEOUT))

    def test_principal_id_keyword(self):
        self.login('example.user')
        result = tasks.get_principal_title_task.delay(
            _principal_id_='zope.user')
        transaction.commit()
        self.assertEqual('User', result.get(timeout=TIMEOUT))

    def test_other_queue(self):
        self.login('zope.user')
        result = tasks.get_principal_title_task.apply_async(queue='hiprio')
        transaction.commit()
        self.assertEqual('User', result.get(timeout=TIMEOUT))

    def test_aborted_transaction_sends_nothing(self):
        self.login('zope.user')
        result = tasks.store.delay('never', 1)
        transaction.abort()
        with self.assertRaises(celery.exceptions.TimeoutError):
            result.get(timeout=1)

    def test_task_writes_to_the_zodb(self):
        self.login('example.user')
        result = tasks.store.delay('stored', 42)
        transaction.commit()
        self.assertEqual(42, result.get(timeout=TIMEOUT))
        with open_zodb_copy(self.layer['storage_file']) as app:
            self.assertEqual((42, 'Ben Utzer'), app['stored'])

    def test_bound_task_sees_its_id(self):
        self.login('zope.user')
        job = tasks.get_task_id.apply_async(task_id='my-nice-task-id')
        transaction.commit()
        self.assertEqual('my-nice-task-id', job.get(timeout=TIMEOUT))

    def test_handle_after_abort(self):
        self.login('zope.user')
        job = tasks.except_with_handler.delay()
        transaction.commit()
        with self.assertRaises(Exception) as error:
            job.get(timeout=TIMEOUT)
        self.assertEqual('handled', str(error.exception))
        with open_zodb_copy(self.layer['storage_file']) as app:
            self.assertEqual(('a1', 'a2', 1, 4, 'User'), app['data'])
            self.assertNotIn('foo', app)

    def test_abort(self):
        self.login('zope.user')
        job = tasks.success_but_abort_transaction.delay()
        transaction.commit()
        self.assertEqual('done', job.get(timeout=TIMEOUT))
        with open_zodb_copy(self.layer['storage_file']) as app:
            self.assertNotIn('flub', app)

    def test_task_formatter_names_the_task(self):
        self.login('zope.user')
        job = tasks.log_message.delay('hello from 1.x')
        transaction.commit()
        job.get(timeout=TIMEOUT)
        with open(os.environ['COMPAT1X_TASK_LOG']) as f:
            lines = [line for line in f if 'hello from 1.x' in line]
        self.assertEqual(1, len(lines))
        self.assertIn(
            f' tests.compat1x.tasks.log_message {job.id} hello from 1.x',
            lines[0])


class EagerTests(Compat1xTests):

    layer = layers.EAGER_LAYER

    def test_eager_task_runs_at_commit(self):
        self.login('example.user')
        result = tasks.get_principal_title_task.delay()
        transaction.commit()
        self.assertEqual('Ben Utzer', result.get())
