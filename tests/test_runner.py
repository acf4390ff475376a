"""The generic runner, in-process (inline mode) on a real FileStorage."""
import logging
import threading

import pytest
import transaction
import zope.component
import zope.component.hooks
import zope.component.testing
import zope.event
import zope.security.management
from ZODB.POSException import ConflictError

import z3c.celery
from z3c.celery import events
from z3c.celery.exceptions import ConflictRetriesExceeded
from z3c.celery.exceptions import UnknownPrincipal
from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.interfaces import ITask
from z3c.celery.worker.components import BackoffConflictPolicy

from .conftest import read_data
from tests import tasks


TASKS = '''
  <celery:config dispatch="inline" />
  <celery:task name="t.record" handler="tests.tasks.record" />
  <celery:task name="t.bound" handler="tests.tasks.bound_record"
               bind="true" />
  <celery:task name="t.conflict" handler="tests.tasks.conflict_then_record"
               max_retries="3" />
  <celery:task name="t.fail" handler="tests.tasks.fail" />
  <celery:task name="t.handled" handler="tests.tasks.fail_with_handler" />
  <celery:task name="t.abort" handler="tests.tasks.abort_with_handler" />
  <celery:task name="t.read" handler="tests.tasks.read" />
'''


@pytest.fixture
def site(load_zcml, db, login):
    tasks._conflicts.clear()
    load_zcml(TASKS)
    login('zope.alice')
    return db


def task(name):
    return zope.component.getUtility(ITask, name)


@pytest.fixture
def captured_events():
    seen = []
    zope.event.subscribers.append(seen.append)
    yield seen
    zope.event.subscribers.remove(seen.append)


def test_task_runs_after_commit_as_queuing_principal(site):
    result = task('t.record').delay('k', 1)
    assert read_data(site) == {}
    assert result.state == 'PENDING'
    transaction.commit()
    assert result.get() == 1
    assert read_data(site) == {'k': (1, 'zope.alice')}


def test_principal_id_keyword_overrides_the_interaction(site):
    task('t.record').delay('k', 2, _principal_id_='zope.bob')
    transaction.commit()
    assert read_data(site) == {'k': (2, 'zope.bob')}


def test_caller_interaction_and_site_are_restored(site):
    before = zope.security.management.getInteraction()
    task('t.record').delay('k', 1)
    transaction.commit()
    assert zope.security.management.getInteraction() is before
    assert zope.component.hooks.getSite() is None


def test_transaction_metadata_names_principal_and_task(site):
    result = task('t.record').delay('k', 3)
    transaction.commit()
    last = site.storage.undoLog(0, 1)[0]
    assert last['user_name'] == b'zope.alice'
    assert last['task_name'] == 't.record'
    assert last['task_id'] == result.id


def test_bound_task_sees_its_request_id(site):
    result = task('t.bound').delay('k')
    transaction.commit()
    assert read_data(site)['k'] == result.id == result.get()


def test_aborted_transaction_runs_nothing(site):
    task('t.record').delay('k', 1)
    transaction.abort()
    transaction.commit()
    assert read_data(site) == {}


def test_conflicts_are_retried_with_the_changes_rolled_back(
        site, captured_events):
    result = task('t.conflict').delay('k', 2)
    transaction.commit()
    assert result.get() is None
    assert read_data(site) == {'k': ('done', 2)}    # no 'k-dirty'
    retried = [e for e in captured_events
               if isinstance(e, events.TaskRetried)]
    assert [e.info['retries'] for e in retried] == [0, 1]


def test_conflicts_past_max_retries_fail_the_task(site):
    result = task('t.conflict').delay('k', 5)      # limit is 3
    transaction.commit()
    assert result.state == 'FAILURE'
    with pytest.raises(ConflictRetriesExceeded, match='after 3 retries'):
        result.get()
    assert read_data(site) == {}


def test_conflict_at_commit_is_retried(site):
    class VoteConflict:
        """A data manager whose vote raises ConflictError once."""
        calls = 0

        def __init__(self):
            self.transaction_manager = transaction.manager

        def abort(self, txn):
            pass

        tpc_begin = commit = tpc_finish = tpc_abort = abort

        def tpc_vote(self, txn):
            VoteConflict.calls += 1
            if VoteConflict.calls == 1:
                raise ConflictError('at commit')

        def sortKey(self):
            return 'vote-conflict'

    def join_then_record(key):
        transaction.get().join(VoteConflict())
        tasks.record(key, VoteConflict.calls)

    z3c.celery.CELERY.task(join_then_record, name='t.vote', lazy=False)
    try:
        z3c.celery.CELERY.tasks['t.vote'].delay('k')
        transaction.commit()
    finally:
        z3c.celery.CELERY.tasks.unregister('t.vote')
    assert read_data(site) == {'k': (1, 'zope.alice')}


def test_unlimited_retries_with_max_retries_none(site, load_zcml):
    load_zcml(full='<configure xmlns:celery="http://namespaces.zope.org/'
              'celery"><include package="z3c.celery" file="meta.zcml" />'
              '<celery:task name="t.forever" handler='
              '"tests.tasks.conflict_then_record" max_retries="None" />'
              '</configure>')
    result = task('t.forever').delay('k', 25)
    transaction.commit()
    assert result.successful()
    assert read_data(site) == {'k': ('done', 25)}


def test_error_aborts_and_fails_the_task_visibly(site, caplog):
    result = task('t.fail').delay('k')
    with caplog.at_level(logging.ERROR):
        transaction.commit()
    assert result.state == 'FAILURE'
    with pytest.raises(ValueError, match='task failed for k'):
        result.get()
    assert read_data(site) == {}
    assert 'task failed for k' in caplog.text


def test_handle_after_abort_runs_callback_in_new_transaction(site):
    result = task('t.handled').delay('k')
    transaction.commit()
    assert read_data(site) == {'k': 'handled'}
    assert result.state == 'FAILURE'
    assert str(result.result) == 'failed: k'


def test_abort_succeeds_with_message_and_runs_callback(site):
    result = task('t.abort').delay('k')
    transaction.commit()
    assert result.get() == 'aborted: k'
    assert read_data(site) == {'k': 'aborted'}


def test_unknown_principal_fails_the_task_naming_the_id(site):
    result = task('t.record').delay('k', 1, _principal_id_='zope.mallory')
    transaction.commit()
    assert result.state == 'FAILURE'
    with pytest.raises(UnknownPrincipal, match='zope.mallory'):
        result.get()
    assert read_data(site) == {}


def test_task_queued_without_interaction_runs_without_principal(site):
    zope.security.management.endInteraction()
    def participations():
        return len(zope.security.management.getInteraction().participations)
    z3c.celery.CELERY.task(participations, name='t.anon', lazy=False)
    try:
        result = z3c.celery.CELERY.tasks['t.anon'].delay()
        transaction.commit()
    finally:
        z3c.celery.CELERY.tasks.unregister('t.anon')
    assert result.get() == 0


class BadAbort:
    """A data manager whose abort fails."""

    transaction_manager = None

    def abort(self, txn):
        raise RuntimeError('abort failed')

    tpc_abort = abort

    def sortKey(self):
        return 'bad-abort'


def join_and_fail(key):
    tasks.data()[key] = 'dirty'
    transaction.get().join(BadAbort())
    raise ValueError('boom')


@pytest.fixture
def opened(site, monkeypatch):
    """The connections the runner opens on the site's database."""
    connections = []
    original_open = site.open

    def open_(*a, **kw):
        conn = original_open(*a, **kw)
        connections.append(conn)
        return conn
    monkeypatch.setattr(site, 'open', open_)
    return connections


def run_in_worker(name, *args):
    """Run task *name* as a worker's pool process does (not in-process)."""
    from celery.utils import uuid
    task_ = z3c.celery.CELERY.tasks[name]
    task_.push_request(id=uuid(), called_directly=False, is_eager=False,
                       retries=0)
    try:
        return task_(*args, _principal_id_='zope.alice')
    finally:
        task_.pop_request()


def test_worker_thread_keeps_one_connection_and_sees_new_commits(
        site, opened):
    assert run_in_worker('t.record', 'a', 1) == 1
    elsewhere = transaction.TransactionManager()
    conn = type(site).open(site, elsewhere)    # not counted in *opened*
    conn.root()['data']['b'] = 'from elsewhere'
    elsewhere.commit()
    conn.close()
    assert run_in_worker('t.read', 'b') == 'from elsewhere'
    assert run_in_worker('t.record', 'c', 3) == 3
    assert len(opened) == 1 and opened[0].opened is not None
    # Left as implicit as it was opened (the runner's own commit skips
    # the look for news that the next task's begin makes anyway).
    assert opened[0].explicit_transactions is False
    # Other threads (the threads pool) get connections of their own.
    seen = []
    thread = threading.Thread(
        target=lambda: seen.append(run_in_worker('t.read', 'c')))
    thread.start()
    thread.join(10)
    assert seen == [(3, 'zope.alice')] and len(opened) == 2
    assert read_data(site) == {'a': (1, 'zope.alice'), 'b': 'from elsewhere',
                               'c': (3, 'zope.alice')}


class Stop(BaseException):
    """Not an Exception: what a gevent timeout or an interrupt is like."""


def write_and_stop(key):
    tasks.data()[key] = 'dirty'
    raise Stop()


def test_worker_aborts_after_a_base_exception_and_keeps_connection(
        site, opened):
    z3c.celery.CELERY.task(write_and_stop, name='t.stop', lazy=False)
    try:
        with pytest.raises(Stop):
            run_in_worker('t.stop', 'k')
        assert run_in_worker('t.record', 'a', 1) == 1
    finally:
        z3c.celery.CELERY.tasks.unregister('t.stop')
    # Aborted, so the connection is clean and kept for the next task.
    assert len(opened) == 1
    assert read_data(site) == {'a': (1, 'zope.alice')}


def test_worker_connection_is_released_with_the_test_cleanup(site, opened):
    run_in_worker('t.record', 'a', 1)
    zope.component.testing.tearDown()
    assert opened[0].opened is None
    zope.component.testing.setUp()


def test_interaction_ends_and_connection_closes_when_abort_fails(
        site, opened, caplog):
    z3c.celery.CELERY.task(join_and_fail, name='t.badabort', lazy=False)
    try:
        result = z3c.celery.CELERY.tasks['t.badabort'].delay('k')
        with caplog.at_level(logging.ERROR):
            transaction.commit()
    finally:
        z3c.celery.CELERY.tasks.unregister('t.badabort')
    assert result.state == 'FAILURE'
    assert 'Aborting the transaction failed' in caplog.text
    assert opened and all(c.opened is None for c in opened)  # closed
    assert read_data(site) == {}


def test_direct_call_runs_plain_function_in_callers_transaction(site):
    conn = site.open()
    try:
        zope.component.hooks.setSite(conn.root()['Application'])
        assert task('t.record')('direct', 9) == 9
        transaction.commit()
    finally:
        zope.component.hooks.setSite(None)
        conn.close()
    assert read_data(site) == {'direct': (9, 'zope.alice')}


def test_events_follow_the_life_of_a_task(site, captured_events):
    result = task('t.record').delay('k', 1)
    transaction.commit()
    task('t.fail').delay('x')
    transaction.commit()
    kinds = [(type(e).__name__, e.task_name) for e in captured_events]
    assert kinds == [
        ('TaskQueued', 't.record'), ('TaskStarted', 't.record'),
        ('TaskSucceeded', 't.record'), ('TaskSent', 't.record'),
        ('TaskQueued', 't.fail'), ('TaskStarted', 't.fail'),
        ('TaskFailed', 't.fail'), ('TaskSent', 't.fail')]
    assert captured_events[0].task_id == result.id


def test_component_handlers_get_events_also_registered_late(site):
    """Nobody listening is remembered only until the registry changes."""
    from z3c.celery.interfaces import ITaskStartedEvent
    from z3c.celery.interfaces import ITaskSucceededEvent
    task('t.record').delay('a', 1)
    transaction.commit()                 # nobody listens yet
    seen = []
    zope.component.provideHandler(
        lambda event: seen.append(event), [ITaskStartedEvent])
    result = task('t.record').delay('b', 2)
    transaction.commit()
    assert [(type(e).__name__, e.task_id) for e in seen] == [
        ('TaskStarted', result.id)]
    zope.component.provideHandler(
        lambda event: seen.append(event.info['result']),
        [ITaskSucceededEvent])
    task('t.record').delay('c', 3)
    transaction.commit()
    assert seen[1:] == [seen[1], 3] and type(seen[1]).__name__ == \
        'TaskStarted'


def test_backoff_grows_with_jitter_and_respects_limit():
    class Task:
        max_retries = 4
        app = z3c.celery.CELERY
    policy = BackoffConflictPolicy(base=0.1, cap=1.0, random=lambda: 1.0)
    assert [policy.countdown(Task, None, n) for n in range(5)] == [
        0.1, 0.2, 0.4, 0.8, None]
    low = BackoffConflictPolicy(base=0.1, cap=1.0, random=lambda: 0.0)
    assert low.countdown(Task, None, 3) == 0.4
    assert BackoffConflictPolicy(base=0.1, cap=1.0).countdown(
        Task, None, 10) is None
    Task.max_retries = None
    assert policy.countdown(Task, None, 100) == 1.0    # capped


def test_after_abort_handler_error_is_logged_and_task_fails_with_original(
        site, load_zcml, caplog):
    @zope.interface.implementer(IAfterAbortHandler)
    class Broken:
        def __call__(self, task, error, manager, policy):
            raise RuntimeError('handler broke')
    zope.component.provideUtility(Broken(), IAfterAbortHandler, 't.fail')
    result = task('t.fail').delay('k')
    with caplog.at_level(logging.ERROR):
        transaction.commit()
    with pytest.raises(ValueError):
        result.get()
    assert 'After-abort handler of task t.fail' in caplog.text
