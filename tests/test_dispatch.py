"""Sending side, ``after-commit`` mode, against a real Redis broker."""
import contextlib
import json
import logging
import threading
import traceback

import pytest
import transaction
import zope.component
import zope.event
from celery.exceptions import Retry
from ZODB.POSException import ConflictError

import z3c.celery
from z3c.celery.interfaces import ITask
from z3c.celery.message import RESENT_HEADER
from z3c.celery.message import TASK_IDS_KEY
from z3c.celery.sending import publish as publishing
from z3c.celery.sending import queue

from .conftest import VetoingDataManager


def broker_messages(redis_server, queue='celery'):
    """The task messages waiting in *queue*, oldest first."""
    raw = redis_server.client().lrange(queue, 0, -1)
    return [json.loads(m)['headers'] for m in reversed(raw)]


@pytest.fixture
def site(load_zcml, redis_db, login):
    load_zcml(f'''
      <celery:config broker_url="{redis_db}" dispatch="after-commit"
                     broker_connection_retry_on_startup="false" />
      <celery:task name="t.record" handler="tests.tasks.record" />
      <celery:task name="t.other" handler="tests.tasks.record"
                   queue="other" />
    ''')
    login('zope.alice')


def task(name='t.record'):
    return zope.component.getUtility(ITask, name)


def test_nothing_leaves_before_commit_and_all_leave_after(
        site, redis_server):
    first = task().delay('a', 1)
    second = task().apply_async(('b', 2), task_id='fixed-id')
    assert second.id == 'fixed-id'
    assert broker_messages(redis_server) == []
    transaction.commit()
    sent = broker_messages(redis_server)
    assert [(m['id'], m['task']) for m in sent] == [
        (first.id, 't.record'), ('fixed-id', 't.record')]


def test_principal_travels_with_the_message(site, redis_server):
    task().delay('a', 1)
    task().delay('b', 2, _principal_id_='zope.bob')
    transaction.commit()
    raw = redis_server.client().lrange('celery', 0, -1)
    bodies = [json.loads(__import__('base64').b64decode(
        json.loads(m)['body'])) for m in reversed(raw)]
    assert [b[1]['_principal_id_'] for b in bodies] == [
        'zope.alice', 'zope.bob']


def test_abort_sends_nothing(site, redis_server):
    task().delay('a', 1)
    transaction.abort()
    transaction.commit()
    assert broker_messages(redis_server) == []


def test_queue_option_of_the_task_is_kept(site, redis_server):
    task('t.other').delay('a', 1)
    transaction.commit()
    assert len(broker_messages(redis_server, 'other')) == 1
    assert broker_messages(redis_server) == []


def test_savepoint_rollback_drops_tasks_queued_after_it(site, redis_server):
    kept = task().delay('kept', 1)
    savepoint = transaction.savepoint()
    task().delay('dropped', 2)
    inner = transaction.savepoint(optimistic=True)
    task().delay('dropped too', 3)
    inner.rollback()
    savepoint.rollback()
    also_kept = task().delay('also kept', 4)
    transaction.savepoint()          # taken after queueing: never raises
    transaction.commit()
    assert [m['id'] for m in broker_messages(redis_server)] == [
        kept.id, also_kept.id]


def test_vetoing_data_manager_after_ours_means_no_message(
        site, redis_server):
    task().delay('a', 1)
    transaction.get().join(VetoingDataManager())
    with pytest.raises(ValueError, match='vetoed'):
        transaction.commit()
    transaction.abort()
    assert broker_messages(redis_server) == []


def test_argsrepr_is_what_celery_would_make_of_the_arguments(
        site, redis_server):
    """`publish` makes ``argsrepr``/``kwargsrepr`` of plain arguments
    itself (faster); they read as Celery's own."""
    from celery.utils.saferepr import saferepr
    cases = [((1, 'x'), {}), ((True, 2.5), {}), ((None, 'y' * 99), {}),
             (('y' * 500, 'y' * 600), {}),
             (({'nested': [1, 2]}, 2.5), {}),
             ((), {'key': 'a', 'value': None})]
    for args, kwargs in cases:
        task().delay(*args, **kwargs)
    transaction.commit()
    for (args, kwargs), headers in zip(cases, broker_messages(redis_server)):
        kwargs = dict(kwargs, _principal_id_='zope.alice')
        assert headers['argsrepr'] == saferepr(args, 1024)
        assert headers['kwargsrepr'] == saferepr(kwargs, 1024)


def test_arguments_over_the_size_limit_fail_at_delay(site, redis_server):
    with pytest.raises(TypeError, match=r'message_size_limit \(4194304 '
                       r'bytes\)') as error:
        task().delay('big', 'x' * (4 * 1024 * 1024))
    assert 't.record: the arguments take 41943' in str(error.value)
    task().delay('small', 'x' * 1024)
    transaction.commit()
    assert len(broker_messages(redis_server)) == 1


def test_extended_info_is_committed(site, db):
    conn = db.open()
    conn.root()['touched'] = 1
    ids = [task().delay('a', n).id for n in range(2)]
    transaction.commit()
    conn.close()
    record = db.storage.undoLog(0, 1)[0]
    assert record[TASK_IDS_KEY] == ids


@pytest.mark.parametrize('args, kwargs, message', [
    ((object(), 1), {}, 'argument 0'),
    (('a',), {'value': {1, 2}}, "argument 'value'"),
])
def test_unserializable_arguments_fail_at_delay(site, args, kwargs,
                                                message):
    with pytest.raises(TypeError, match=message) as info:
        task().apply_async(args, kwargs)
    assert 't.record' in str(info.value) and 'json' in str(info.value)
    assert queue.queued_messages() == []


def test_wrong_arity_fails_at_delay(site):
    with pytest.raises(TypeError, match='t.record'):
        task().delay('only one argument')


def test_callers_kwargs_are_not_modified(site):
    kwargs = {'key': 'a', 'value': 1, '_principal_id_': 'zope.bob'}
    task().apply_async((), kwargs)
    assert kwargs == {'key': 'a', 'value': 1, '_principal_id_': 'zope.bob'}
    [message] = queue.queued_messages()
    assert message.principal_id == 'zope.bob'
    assert message.kwargs == {'key': 'a', 'value': 1}


def test_principal_id_also_accepted_as_an_execution_option(site):
    task().apply_async(('a', 1), _principal_id_='zope.bob')
    [message] = queue.queued_messages()
    assert message.principal_id == 'zope.bob'
    assert '_principal_id_' not in message.options


def test_old_task_id_keyword_is_accepted_and_ignored(site):
    result = task().delay('a', 1, _task_id_='old')
    [message] = queue.queued_messages()
    assert message.task_id == result.id != 'old'
    assert '_task_id_' not in message.kwargs


def test_broker_down_at_commit_is_logged_with_ids_and_counted(
        load_zcml, login, caplog):
    from z3c.celery.testing.servers import free_port
    load_zcml(f'''
      <celery:config broker_url="redis://127.0.0.1:{free_port()}/0"
                     dispatch="after-commit"
                     broker_connection_max_retries="1"
                     broker_connection_timeout="1"
                     task_publish_retry="false" />
      <celery:task name="t.record" handler="tests.tasks.record" />
    ''')
    login('zope.alice')
    before = publishing.counters.publish_failures
    ids = [task().delay('a', n).id for n in range(3)]
    with caplog.at_level(logging.ERROR):
        transaction.commit()             # the commit itself succeeds
    assert publishing.counters.publish_failures == before + 3
    for task_id in ids:
        assert task_id in caplog.text
    assert 'LOST' in caplog.text


def test_events_queued_and_sent(site):
    seen = []
    zope.event.subscribers.append(seen.append)
    try:
        result = task().delay('a', 1)
        assert [type(e).__name__ for e in seen] == ['TaskQueued']
        transaction.commit()
    finally:
        zope.event.subscribers.remove(seen.append)
    assert [(type(e).__name__, e.task_id) for e in seen] == [
        ('TaskQueued', result.id), ('TaskSent', result.id)]


def test_one_producer_for_all_messages_of_a_commit(site, monkeypatch):
    app = z3c.celery.CELERY
    acquired = []
    original = app.producer_or_acquire

    def counting(producer=None):
        acquired.append(producer)
        return original(producer)
    monkeypatch.setattr(app, 'producer_or_acquire', counting)
    for n in range(20):
        task().delay('a', n)
    transaction.commit()
    # send_task is handed the one producer each time; only one is taken
    # from the pool.
    assert len(acquired) == 21
    assert acquired.count(None) == 1
    assert len({id(p) for p in acquired if p is not None}) == 1


def test_result_of_delay_is_found_however_late_it_is_asked_for(
        load_zcml, redis_db, redis_server, login):
    """Publishing does not subscribe to the result (with the result
    backend away that stalled commits, see test_backend_outage.py);
    ``get()`` subscribes and finds a result stored before as well as one
    stored while it waits."""
    load_zcml(f'''
      <celery:config broker_url="{redis_db}" result_backend="{redis_db}"
                     dispatch="after-commit" />
      <celery:task name="t.record" handler="tests.tasks.record" />
    ''')
    login('zope.alice')
    backend = z3c.celery.CELERY.backend
    result = task().delay('k', 1)
    transaction.commit()
    channel = f'celery-task-meta-{result.id}'.encode()
    assert channel not in redis_server.client().pubsub_channels()
    backend.mark_as_done(result.id, 5)    # before anybody asked
    assert result.get(timeout=5) == 5
    result = task().delay('k', 2)
    transaction.commit()
    timer = threading.Timer(0.5, backend.mark_as_done, (result.id, 7))
    timer.start()
    try:
        assert result.get(timeout=5) == 7
    finally:
        timer.join(5)


def test_a_publish_tried_again_is_flagged(site, redis_server, monkeypatch):
    """A publish that reported an error may still have reached the broker
    (the connection dropped before the reply): kombu tries again, and
    the second copy tells the worker to look for a done-marker everywhere.
    The fault is made by hand: a real broker cannot be made to lose just
    the reply.  Without batching, as with transports that cannot batch."""
    from kombu.transport import redis as redis_transport
    monkeypatch.setattr(publishing, '_batch',
                        lambda producer: contextlib.nullcontext())
    original = redis_transport.Channel.basic_publish
    calls = []

    def arrives_but_fails_once(self, message, *args, **kw):
        original(self, message, *args, **kw)
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError('connection lost before the reply')
    monkeypatch.setattr(redis_transport.Channel, 'basic_publish',
                        arrives_but_fails_once)
    result = task().delay('twice', 1)
    transaction.commit()
    sent = broker_messages(redis_server)
    assert [m['id'] for m in sent] == [result.id, result.id]
    assert RESENT_HEADER not in sent[0]
    assert sent[1][RESENT_HEADER] is True
    # Nothing of it stays behind for later publishes.
    later = task().delay('later', 1)
    transaction.commit()
    assert RESENT_HEADER not in broker_messages(redis_server)[-1]
    assert later.id == broker_messages(redis_server)[-1]['id']


@pytest.mark.parametrize('repeated', [False, True])
def test_a_retry_is_sent_at_once_and_flagged_like_its_run(
        site, redis_server, repeated):
    """``self.retry()`` in a worker: the message leaves now (the run's
    transaction is aborted), flagged when the run may repeat an earlier
    delivery (the runner sets ``z3c_repeated``)."""
    t = task()
    t.push_request(id='retried-id', args=('k', 1), kwargs={}, retries=0,
                   is_eager=False, called_directly=False, delivery_info={},
                   z3c_repeated=repeated)
    try:
        t.retry(countdown=0, throw=False)
    finally:
        t.pop_request()
    transaction.abort()
    sent = broker_messages(redis_server)
    assert [(m['id'], m['retries']) for m in sent] == [('retried-id', 1)]
    assert (sent[0].get(RESENT_HEADER) is True) is repeated


def test_a_conflict_retry_is_raised_with_a_short_traceback(
        site, redis_server):
    """A worker copies and formats every frame of a retry's traceback (for
    the RETRY state): the runner raises it from its entry point, not from
    deep in its attempts, and without the conflict chained to it."""
    def conflicting(key):
        raise ConflictError(f'simulated conflict at {key}')
    t = z3c.celery.CELERY.task(conflicting, name='t.conflicting', lazy=False)
    t.push_request(id='conflicted-id', args=('k',), kwargs={}, retries=0,
                   is_eager=False, called_directly=False, delivery_info={})
    try:
        with pytest.raises(Retry) as raised:
            t('k')
    finally:
        t.pop_request()
        z3c.celery.CELERY.tasks.unregister('t.conflicting')
    retry = raised.value
    assert isinstance(retry.exc, ConflictError)
    assert retry.__context__ is None and retry.__cause__ is None
    frames = [frame.f_code.co_qualname for frame, _ in
              traceback.walk_tb(retry.__traceback__)]
    assert frames[1:] == ['TransactionAwareTask.__call__', 'run']
    sent = broker_messages(redis_server)
    # After the attempts at once in the process, through the broker.
    attempts = z3c.celery.CELERY.z3c_setting('conflict_in_process')
    assert [(m['id'], m['retries']) for m in sent] == [
        ('conflicted-id', attempts + 1)]
