"""The 1.x API, in-process: the compat application's tasks in inline and
eager mode, ``celery_session`` and the 1.x names.

The end-to-end half (a real worker) is in test_compat_end_to_end.py.
"""
import os

import celery
import pytest
import transaction
import zope.authentication.interfaces
import zope.component.hooks

import z3c.celery
import z3c.celery.celery
import z3c.celery.layer
import z3c.celery.loader
import z3c.celery.logging
import z3c.celery.session
import z3c.celery.testing
from z3c.celery.session import celery_session
from z3c.celery.task import TransactionAwareTask

from tests.compat1x import tasks


HERE = os.path.dirname(__file__)


@pytest.fixture(scope='session')
def zope_celery_site_zcml_file():
    """The compat application's own site ZCML (no z3c.celery ZCML)."""
    return os.path.join(HERE, 'compat1x', 'ftesting.zcml')


@pytest.fixture
def site(zope_celery_db, zope_celery_inline):
    return zope_celery_db


def login(principal_id):
    z3c.celery.celery.login_principal(
        z3c.celery.celery.get_principal(principal_id))


def root_folder(db):
    with db.transaction() as conn:
        return dict(conn.root()['Application'].items())


def test_1x_names_are_importable():
    assert z3c.celery.celery.CELERY is z3c.celery.CELERY
    assert z3c.celery.task.__self__ is z3c.celery.CELERY
    assert z3c.celery.celery.TransactionAwareTask is TransactionAwareTask
    assert issubclass(z3c.celery.celery.Abort,
                      z3c.celery.celery.HandleAfterAbort)
    assert issubclass(z3c.celery.celery.Retry, celery.exceptions.Retry)
    assert z3c.celery.celery.ZopeLoader is z3c.celery.loader.ZopeLoader
    assert z3c.celery.celery.celery_session is celery_session
    assert z3c.celery.layer.EAGER_LAYER.__class__ is \
        z3c.celery.layer.EagerLayer
    assert callable(z3c.celery.layer.EndToEndLayer)
    assert '{zodb_path}' in z3c.celery.testing.ZOPE_CONF_TEMPLATE
    assert callable(z3c.celery.testing.open_zodb_copy)
    for name in ('TaskFormatter', 'TaskId', 'JsonFormatter'):
        assert hasattr(z3c.celery.logging, name)


def test_shared_tasks_belong_to_our_app_with_our_task_class():
    assert tasks.store.app is z3c.celery.CELERY
    assert isinstance(tasks.store._get_current_object(), TransactionAwareTask)
    assert celery.current_app is z3c.celery.CELERY or \
        celery.current_app._get_current_object() is z3c.celery.CELERY


def test_shared_task_waits_for_commit_and_runs_in_zope(site):
    login('example.user')
    result = tasks.store.delay('k', 1)
    assert len(celery_session) == 1
    assert root_folder(site) == {}
    transaction.commit()
    assert result.get() == 1
    assert root_folder(site) == {'k': (1, 'Ben Utzer')}
    assert len(celery_session) == 0


def test_shared_task_is_not_sent_when_the_transaction_aborts(site):
    login('example.user')
    tasks.store.delay('k', 1)
    transaction.abort()
    transaction.commit()
    assert root_folder(site) == {}


def test_principal_id_keyword_overrides_the_interaction(site):
    login('example.user')
    result = tasks.get_principal_title_task.delay(_principal_id_='zope.user')
    transaction.commit()
    assert result.get() == 'User'


def test_bound_shared_task_sees_its_task_id(site):
    login('zope.user')
    result = tasks.get_task_id.apply_async(task_id='my-nice-task-id')
    transaction.commit()
    assert result.get() == 'my-nice-task-id'


def test_old_task_id_keyword_is_accepted_and_ignored(site):
    login('zope.user')
    result = tasks.get_task_id.delay(_task_id_='from-1.x')
    assert result.id != 'from-1.x'
    transaction.commit()
    assert result.get() == result.id


def test_message_of_a_1x_web_process_runs(site):
    # 1.x sent these keywords with every task; a 2.x worker drops them.
    outcome = tasks.get_principal_title_task.apply(
        kwargs={'_run_asynchronously_': True, '_principal_id_': 'zope.user',
                '_task_id_': 'old-id'})
    assert outcome.get() == 'User'


def test_handle_after_abort_runs_its_callback_after_the_abort(site):
    login('zope.user')
    result = tasks.except_with_handler.delay()
    transaction.commit()
    with pytest.raises(z3c.celery.celery.HandleAfterAbort, match='handled'):
        result.get()
    assert root_folder(site) == {'data': ('a1', 'a2', 1, 4, 'User')}


def test_abort_succeeds_with_its_message_and_writes_nothing(site):
    login('zope.user')
    result = tasks.success_but_abort_transaction.delay()
    transaction.commit()
    assert result.get() == 'done'
    assert root_folder(site) == {}


def test_eager_mode_runs_after_commit_not_inside_delay(
        zope_celery_db, zope_celery_eager):
    login('example.user')
    result = tasks.store.delay('k', 1)
    assert result.state == 'PENDING'           # 1.x had run it already
    assert root_folder(zope_celery_db) == {}
    transaction.commit()
    assert result.get() == 1
    assert root_folder(zope_celery_db) == {'k': (1, 'Ben Utzer')}


def test_get_principal_raises_as_in_1x(zope_celery_zcml):
    with pytest.raises(zope.authentication.interfaces.PrincipalLookupError):
        z3c.celery.celery.get_principal('nobody')


def test_login_principal_accepts_a_task_name(zope_celery_zcml):
    principal = z3c.celery.celery.get_principal('zope.user')
    z3c.celery.celery.login_principal(principal, 'some.task')
    assert tasks.principal_title() == 'User'


class TestCelerySession:

    def test_len_counts_the_tasks_of_the_current_transaction(
            self, zope_celery_zcml):
        assert len(celery_session) == 0
        tasks.store.delay('a', 1)
        tasks.store.delay('b', 2)
        assert len(celery_session) == 2
        assert [m.args for m in celery_session] == [('a', 1), ('b', 2)]
        transaction.abort()
        assert len(celery_session) == 0

    def test_savepoint_rollback_uncounts(self, zope_celery_zcml):
        tasks.store.delay('a', 1)
        savepoint = transaction.savepoint()
        tasks.store.delay('b', 2)
        assert len(celery_session) == 2
        savepoint.rollback()
        assert len(celery_session) == 1

    def test_reset_drops_the_queued_tasks(self, site):
        login('zope.user')
        tasks.store.delay('a', 1)
        celery_session.reset()
        assert len(celery_session) == 0
        transaction.commit()
        assert root_folder(site) == {}


@z3c.celery.task
def decorated(key, value):
    """A task made with the 1.x decorator ``z3c.celery.task``."""
    return tasks.store.run(key, value)


def test_1x_task_decorator_makes_transaction_aware_tasks(site):
    assert isinstance(decorated, TransactionAwareTask)
    login('zope.user')
    result = decorated.delay('d', 4)
    assert len(celery_session) == 1
    transaction.commit()
    assert result.get() == 4
    assert root_folder(site) == {'d': (4, 'User')}
