"""Inline mode: queued for real, run in this process right after commit."""
import transaction
import zope.component

from z3c.celery import testing
from z3c.celery.interfaces import ITask


def remember():
    return zope.component.getUtility(ITask, 'guide.remember')


def stored(db):
    """What the tasks stored in the root folder."""
    with db.transaction() as conn:
        return dict(conn.root()['Application'].items())


def test_task_runs_after_commit_as_the_user(
        zope_celery_inline, zope_celery_db, zope_celery_interaction):
    result = remember().delay('greeting', 'hello')
    assert stored(zope_celery_db) == {}       # nothing runs before commit
    transaction.commit()
    assert result.get() == 'hello'
    assert stored(zope_celery_db) == {'greeting': ('hello', 'zope.user')}


def test_what_the_transaction_queued(
        zope_celery_inline, zope_celery_db, zope_celery_interaction):
    result = remember().delay('greeting', 'hello')
    [queued] = testing.queued_tasks()
    assert queued.name == 'guide.remember'
    assert queued.args == ('greeting', 'hello')
    assert queued.principal_id == 'zope.user'
    assert queued.task_id == result.id
    transaction.abort()                       # an abort sends nothing
    assert testing.queued_tasks() == []
    assert stored(zope_celery_db) == {}
