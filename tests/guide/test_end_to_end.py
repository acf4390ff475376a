"""End-to-end: a real ``celery worker`` and Redis, a shared ZEO database."""
import transaction
import zope.component

from z3c.celery.interfaces import ITask


def test_worker_runs_the_task(
        zope_celery_end_to_end, zope_celery_zeo_db, zope_celery_interaction):
    task = zope.component.getUtility(ITask, 'guide.remember')
    result = task.delay('e2e', 'hello')
    transaction.commit()
    assert result.get(timeout=30) == 'hello'
    with zope_celery_zeo_db.transaction() as conn:
        assert conn.root()['Application']['e2e'] == ('hello', 'zope.user')
