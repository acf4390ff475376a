"""Eager mode (``task_always_eager``) and calling tasks directly."""
import pytest
import transaction
from oneproject import tasks

import z3c.celery.celery


@pytest.fixture(autouse=True)
def clear_recorded():
    del tasks.RECORDED[:]
    yield
    del tasks.RECORDED[:]


def test_eager_task_runs_as_the_current_principal(
        eager_celery_app, zcml):
    z3c.celery.celery.login_principal(
        z3c.celery.celery.get_principal('example.user'))
    tasks.record.delay('eager')
    transaction.commit()
    assert [('eager', 'Ben Utzer')] == tasks.RECORDED


def test_eager_task_runs_as_the_principal_given_to_delay(
        eager_celery_app, zcml):
    tasks.record.delay('as user', _principal_id_='zope.user')
    transaction.commit()
    assert [('as user', 'User')] == tasks.RECORDED


def test_task_called_directly_runs_in_process(interaction):
    assert 3 == tasks.add(1, 2)
    assert 'x' == tasks.record('x')
    # The interaction's principal has no title: its id stands in.
    assert [('x', 'zope.user')] == tasks.RECORDED


def test_direct_call_runs_the_after_abort_callback_and_reraises(
        interaction):
    with pytest.raises(z3c.celery.celery.HandleAfterAbort) as info:
        tasks.fail_with_handler()
    assert 'handled' == str(info.value)
    assert [('callback', ('a1', 'a2'), {'kw': 4})] == tasks.RECORDED


def test_direct_call_of_abort_returns_its_message(interaction):
    assert 'done' == tasks.succeed_but_abort()
    assert [('callback', ('aborted',), {})] == tasks.RECORDED
