"""End-to-end: a real worker (``celery_session_worker``) runs the tasks."""
import pytest
import transaction
import zope.component
from oneproject import tasks

import z3c.celery.celery
from z3c.celery.session import celery_session
from z3c.celery.testing import open_zodb_copy


TIMEOUT = 60


def test_result_comes_back_through_the_result_backend(
        celery_session_worker, interaction):
    result = tasks.add.delay(1, 2)
    transaction.commit()
    assert 3 == result.get(timeout=TIMEOUT)


def test_task_runs_as_the_principal_given_to_delay(celery_session_worker):
    result = tasks.get_principal_title.delay(_principal_id_='zope.user')
    transaction.commit()
    assert 'User' == result.get(timeout=TIMEOUT)


def test_task_runs_as_the_principal_who_queued_it(
        celery_session_worker, zcml):
    z3c.celery.celery.login_principal(
        z3c.celery.celery.get_principal('example.user'))
    result = tasks.get_principal_title.delay()
    transaction.commit()
    assert 'Ben Utzer' == result.get(timeout=TIMEOUT)


def test_worker_writes_into_the_storage_file(
        celery_session_worker, storage_file, interaction):
    result = tasks.store.delay('stored', 42)
    transaction.commit()
    assert 'stored' == result.get(timeout=TIMEOUT)
    with open_zodb_copy(storage_file) as app:
        assert (42, 'User') == app['stored']


def test_aborted_transaction_sends_nothing(
        celery_session_worker, storage_file, interaction):
    tasks.store.delay('aborted', 1)
    assert 1 == len(celery_session)
    transaction.abort()
    assert 0 == len(celery_session)
    result = tasks.store.delay('committed', 2)
    transaction.commit()
    assert 'committed' == result.get(timeout=TIMEOUT)
    with open_zodb_copy(storage_file) as app:
        assert 'aborted' not in app
        assert (2, 'User') == app['committed']


def test_handle_after_abort_runs_the_callback_after_the_abort(
        celery_session_worker, storage_file, interaction):
    result = tasks.fail_with_handler.delay()
    transaction.commit()
    with pytest.raises(Exception) as info:
        result.get(timeout=TIMEOUT)
    assert 'handled' in str(info.value)
    with open_zodb_copy(storage_file) as app:
        assert 'foo' not in app
        assert (('a1', 'a2'), {'kw': 4}, 'User') == app['data']


def test_abort_returns_its_message_and_writes_nothing(
        celery_session_worker, storage_file, interaction):
    result = tasks.succeed_but_abort.delay()
    transaction.commit()
    assert 'done' == result.get(timeout=TIMEOUT)
    with open_zodb_copy(storage_file) as app:
        assert 'flub' not in app


def test_bound_shared_task_knows_its_task_id(
        celery_session_worker, interaction):
    result = tasks.get_task_id.delay()
    transaction.commit()
    assert result.id == result.get(timeout=TIMEOUT)


def test_task_can_retry(celery_session_worker, interaction):
    result = tasks.retry_once.delay()
    transaction.commit()
    assert 1 == result.get(timeout=TIMEOUT)


def test_keyword_arguments_and_apply_async(
        celery_session_worker, interaction):
    result = tasks.add.apply_async(kwargs={'a': 2, 'b': 5})
    transaction.commit()
    assert 7 == result.get(timeout=TIMEOUT)


def test_arguments_must_be_serializable(interaction):
    with pytest.raises(TypeError):
        tasks.add.delay(object(), 1)


def test_principal_lookup_uses_the_site_authentication(zcml):
    auth = zope.component.getUtility(
        zope.authentication.interfaces.IAuthentication)
    assert 'Ben Utzer' == auth.getPrincipal('example.user').title
