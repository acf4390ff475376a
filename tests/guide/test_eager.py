"""Eager mode (1.x compatible): ``task_always_eager``."""
import transaction
import zope.component

from z3c.celery import testing
from z3c.celery.interfaces import ITask


def test_eager_task_runs_at_commit(
        zope_celery_eager, zope_celery_db, zope_celery_interaction):
    task = zope.component.getUtility(ITask, 'guide.remember')
    with testing.TaskRecorder() as recorder:
        result = task.delay('greeting', 'hello')
        assert result.state == 'PENDING'      # 1.x would have run it here
        transaction.commit()
    assert result.get() == 'hello'
    assert recorder.sent_names == ['guide.remember']
