"""Done-markers: through the runner (in-process), their partitions, and
which runs look for them everywhere."""
import time

import celery
import pytest
import transaction
import ZODB
import ZODB.interfaces
import ZODB.POSException
import zope.component
import zope.component.hooks
from celery.exceptions import Ignore

import z3c.celery
from z3c.celery import database
from z3c.celery import signing
from z3c.celery.interfaces import ITask
from z3c.celery.worker import connection as worker_connection
from z3c.celery.worker import markers

from tests import tasks
from tests import workers
from tests.conftest import read_data


# Done-markers through the runner, in-process

TASKS = '''
  <celery:config dispatch="inline" />
  <celery:task name="t.increment" handler="tests.tasks.increment" />
  <celery:task name="w.touch" handler="tests.site.tasks.touch" />
'''


@pytest.fixture
def inline(load_zcml, db, login):
    load_zcml(TASKS)
    login('zope.alice')
    return db


def run(name, *args, task_id):
    """Run a task as a worker would run a (re)delivered message."""
    task = zope.component.getUtility(ITask, name)
    return task.apply(args, {'_principal_id_': 'zope.alice'},
                      task_id=task_id, throw=True)


def marked(db, task_id):
    with db.transaction() as conn:
        return markers.done_at(conn, task_id, z3c.celery.CELERY.z3c_setting(
            'done_marker_retention')) is not None


def test_redelivered_task_is_skipped_and_logged(inline, caplog):
    run('t.increment', 'n', task_id='same-id')
    assert marked(inline, 'same-id')
    outcome = run('t.increment', 'n', task_id='same-id')
    assert outcome.state == 'SUCCESS'
    assert outcome.result is None
    with inline.transaction() as conn:
        assert conn.root()['data']['n'] == 1
    assert 'Task t.increment[same-id] was already done' in caplog.text


#: Task ids of the runs of ``counted_increment`` (its body ran).
RAN = []


def counted_increment(key):
    RAN.append(key)
    tasks.increment(key)


@pytest.fixture
def pool_process(load_zcml, db, login):
    """Tasks run as a prefork pool process runs them, Redis the broker."""
    load_zcml('''
      <celery:config dispatch="inline" broker_url="redis://127.0.0.1:1/0" />
      <celery:task name="t.counted"
                   handler="tests.test_markers.counted_increment" />''')
    login('zope.alice')
    RAN.clear()
    yield db
    worker_connection.release_connection()


def run_in_pool(key, task_id, **flags):
    """Run ``t.counted`` from a message delivered with *flags*."""
    task = z3c.celery.CELERY.tasks['t.counted']
    task.push_request(id=task_id, called_directly=False, is_eager=False,
                      retries=0, **flags)
    try:
        return task(key, _principal_id_='zope.alice')
    finally:
        task.pop_request()


def test_a_redelivered_message_whose_run_committed_does_not_run(
        pool_process, caplog):
    run_in_pool('n', 'once', delivery_info={'redelivered': False})
    assert run_in_pool('n', 'once', delivery_info={'redelivered': True}) \
        is None
    assert RAN == ['n']       # skipped before it ran
    assert read_data(pool_process) == {'n': 1}
    assert 'Task t.counted[once] was already done' in caplog.text


def test_a_first_delivery_after_a_resent_copy_ran_is_skipped_at_commit(
        pool_process, caplog):
    """The first delivery looks for its marker when it marks: it ran,
    but its writes are not committed."""
    run_in_pool('n', 'resent', **{markers.RESENT_HEADER: True},
                delivery_info={'redelivered': False})
    assert run_in_pool('n', 'resent',
                       delivery_info={'redelivered': False}) is None
    assert RAN == ['n', 'n']
    assert read_data(pool_process) == {'n': 1}
    assert 'Task t.counted[resent] was already done' in caplog.text


def test_task_that_writes_nothing_gets_no_marker(inline):
    run('w.touch', 'n', task_id='reader')
    assert not marked(inline, 'reader')


def test_markers_can_be_switched_off(load_zcml, db, login):
    load_zcml(TASKS.replace('dispatch="inline"',
                            'dispatch="inline" done_markers="false"'))
    login('zope.alice')
    run('t.increment', 'n', task_id='twice')
    run('t.increment', 'n', task_id='twice')
    assert not marked(db, 'twice')
    with db.transaction() as conn:
        assert conn.root()['data']['n'] == 2


def test_skip_keeps_a_result_already_stored(inline, monkeypatch):
    task = zope.component.getUtility(ITask, 't.increment')
    monkeypatch.setattr(type(task.backend), 'get_state',
                        lambda self, task_id: 'SUCCESS', raising=False)
    with pytest.raises(Ignore):
        markers.skip(task, markers.AlreadyDone('t', 'id', 0))


def test_marker_written_by_a_later_commit_hook_counts(inline):
    """Writes made in before-commit hooks (e.g. an outbox) are included."""
    def writes_in_hook():
        def hook():
            tasks.data()['from-hook'] = True
        transaction.get().addBeforeCommitHook(hook)
    db = ZODB.DB(None)
    workers.prepare_database(db)
    manager = transaction.TransactionManager()
    conn = db.open(transaction_manager=manager)
    thread_manager = transaction.manager
    saved = thread_manager.manager
    try:
        txn = manager.begin()
        # As the runner does: the task's manager and site for the thread.
        thread_manager.manager = manager
        zope.component.hooks.setSite(database.root_site(conn))
        writes_in_hook()     # the task only queued something
        markers.mark_at_commit(txn, conn, 'hooked', 100)
        manager.commit()
        manager.begin()
        assert markers.done_at(conn, 'hooked', 100) is not None
    finally:
        zope.component.hooks.setSite(None)
        thread_manager.manager = saved
        conn.close()
        db.close()


def test_generations_are_looked_up_and_pruned():
    db = ZODB.DB(None)
    conn = db.open()
    try:
        day = 86400
        markers.mark_done(conn, 'old', day, now=0.5 * day)
        markers.mark_done(conn, 'recent', day, now=1.5 * day)
        # Still found one generation later, gone two generations later.
        assert markers.done_at(conn, 'old', day, now=1.9 * day)
        assert markers.done_at(conn, 'old', day, now=2.1 * day) is None
        markers.mark_done(conn, 'new', day, now=2.5 * day)
        tree = markers.container(conn)
        assert list(tree.keys()) == [1, 2]     # generation 0 dropped
        assert markers.done_at(conn, 'recent', day, now=2.5 * day)
        assert markers.done_at(conn, 'new', day, now=2.5 * day)
    finally:
        transaction.abort()
        conn.close()
        db.close()


# Partitions: a first delivery marks in its process's own partition and,
# when it marks, looks only in the shared one; a run that may repeat one
# looks everywhere and marks in the shared one.  Both kinds at the same
# time conflict.

DAY = 86400


@pytest.fixture
def fs_db(fs_db):
    """The database of conftest in the steady state of markers: this
    generation and our partition exist."""
    conn = fs_db()
    markers.mark_done(conn, 'earlier', DAY, shared=False)
    conn.transaction_manager.commit()
    return fs_db


#: Objects the tasks of the tests write to, one each: they conflict only
#: through their markers.
SLOTS = ('a', 'b', 'c', 'd')


def write_and_mark(conn, task_id, shared, slot='a'):
    """A task's write and its marker, in *conn*'s transaction."""
    conn.root()[slot][task_id] = 1
    markers.mark_done(conn, task_id, DAY, shared=shared)


def test_a_first_delivery_marks_in_its_own_partition(fs_db):
    conn = fs_db()
    write_and_mark(conn, 'first', shared=False)
    conn.transaction_manager.commit()
    partitions = markers.container(conn)[markers.generation(
        time.time(), DAY)]
    assert 'first' in partitions[markers.partition_name()]
    assert 'first' not in partitions[markers.shard_name('first')]
    # Found by a run that may repeat it, not by another first delivery.
    assert markers.done_at(conn, 'first', DAY, everywhere=True)
    assert markers.done_at(conn, 'first', DAY, everywhere=False) is None


def test_a_first_delivery_finds_a_repeated_run_marker_when_marking(fs_db):
    conn = fs_db()
    write_and_mark(conn, 'again', shared=True)
    conn.transaction_manager.commit()
    assert markers.done_at(conn, 'again', DAY, everywhere=False)
    with pytest.raises(markers.AlreadyDone):
        write_and_mark(conn, 'again', shared=False)


def test_a_first_delivery_marking_in_a_commit_hook_fails_the_commit(fs_db):
    """When other before-commit hooks run (an outbox), the marker waits
    for them, and the commit itself raises AlreadyDone."""
    conn = fs_db()
    write_and_mark(conn, 'hooked', shared=True)
    conn.transaction_manager.commit()
    txn = conn.transaction_manager.begin()
    conn.root()['b']['hooked'] = 1
    txn.addBeforeCommitHook(lambda: None)
    markers.mark_at_commit(txn, conn, 'hooked', DAY, shared=False)
    with pytest.raises(markers.AlreadyDone):
        conn.transaction_manager.commit()
    conn.transaction_manager.abort()
    conn.transaction_manager.begin()
    assert 'hooked' not in conn.root()['b']


def test_marking_an_id_twice_in_one_partition_is_already_done(fs_db):
    conn = fs_db()
    write_and_mark(conn, 'twice', shared=False)
    conn.transaction_manager.commit()
    with pytest.raises(markers.AlreadyDone):
        write_and_mark(conn, 'twice', shared=False)


@pytest.mark.parametrize('first_commits', ['first delivery', 'repeated'])
def test_both_kinds_of_run_of_one_message_at_once_conflict(
        fs_db, first_commits):
    """Whichever commits second gets a conflict (and is retried)."""
    first, repeated = fs_db(), fs_db()
    # Both looked and found nothing.
    assert markers.done_at(first, 'same', DAY, everywhere=False) is None
    assert markers.done_at(repeated, 'same', DAY, everywhere=True) is None
    write_and_mark(first, 'same', shared=False, slot='a')
    write_and_mark(repeated, 'same', shared=True, slot='b')
    winner, loser = (first, repeated) if first_commits == 'first delivery' \
        else (repeated, first)
    winner.transaction_manager.commit()
    with pytest.raises(ZODB.POSException.ConflictError):
        loser.transaction_manager.commit()
    loser.transaction_manager.abort()
    # Retried, the loser finds the winner's marker.
    loser.transaction_manager.begin()
    assert markers.done_at(loser, 'same', DAY, everywhere=True)


def test_different_messages_at_once_do_not_conflict(fs_db, monkeypatch):
    first, other_process, repeated = fs_db(), fs_db(), fs_db()
    # (Different shards: a repeated run's marker conflicts only with first
    # deliveries of its shard, one in markers.SHARDS.)
    assert markers.shard_name('one') != markers.shard_name('three')
    write_and_mark(first, 'one', shared=False, slot='b')
    monkeypatch.setattr(markers, 'partition_name', lambda: 'host:other')
    write_and_mark(other_process, 'two', shared=False, slot='c')
    write_and_mark(repeated, 'three', shared=True, slot='d')
    for conn in (repeated, first, other_process):
        conn.transaction_manager.commit()
    conn.transaction_manager.begin()
    assert all(markers.done_at(conn, task_id, DAY)
               for task_id in ('one', 'two', 'three'))


def request(**info):
    from celery.app.task import Context
    values = dict(retries=0, is_eager=False,
                  delivery_info={'redelivered': False})
    values.update(info)
    return Context(**values)


class FakeTask:
    def __init__(self, broker_url):
        self.app = celery.Celery(broker=broker_url, set_as_current=False)


@pytest.mark.parametrize('info, expected', [
    ({}, False),
    ({'retries': 1}, False),
    # A request saying it is eager is not known to run in-process: a
    # message's embed can say so (see signing.in_process).
    ({'is_eager': True}, False),
    ({'delivery_info': {'redelivered': True}}, True),
    ({'redelivered': True}, True),
    ({markers.RESENT_HEADER: True}, True),
])
def test_which_runs_may_repeat_an_earlier_delivery(info, expected):
    task = FakeTask('redis://127.0.0.1:1/0')
    assert markers.maybe_repeated(task, request(**info)) is expected


def test_runs_started_in_process_may_repeat_an_earlier_delivery():
    task = FakeTask('redis://127.0.0.1:1/0')
    with signing.in_process():
        assert markers.maybe_repeated(task, request(is_eager=True)) is True


@pytest.mark.parametrize('url, expected', [
    ('redis://127.0.0.1:1/0', False),
    ('sentinel://127.0.0.1:1;sentinel://127.0.0.1:2', False),
    ('amqp://guest@127.0.0.1//', False),
    ('sqs://', True),
    ('redis://127.0.0.1:1/0;sqs://', True),
    ('filesystem://', True),
])
def test_brokers_that_do_not_flag_redeliveries_always_look(url, expected):
    assert markers.maybe_repeated(FakeTask(url), request()) is expected


def test_signed_messages_always_look(fs_db):
    """A replayed signed message may have lost its flags."""
    task = FakeTask('redis://127.0.0.1:1/0')
    assert markers.maybe_repeated(task, request(), secret='s3cret')
