"""Dispatch mode ``outbox`` on a real FileStorage and a real Redis."""
import json
import logging
import time

import pytest
import transaction
import ZODB
import ZODB.MappingStorage
import zope.component
import zope.event
from BTrees.OOBTree import OOBTree

import z3c.celery
from z3c.celery import database
from z3c.celery.app import BUILTIN_DISPATCHERS
from z3c.celery.interfaces import IDispatcher
from z3c.celery.interfaces import ITask
from z3c.celery.message import TASK_IDS_KEY
from z3c.celery.outbox import store
from z3c.celery.outbox.dispatcher import OutboxDispatcher
from z3c.celery.outbox.relay import Relay
from z3c.celery.sending import publish as publishing
from z3c.celery.testing import servers

from .conftest import VetoingDataManager
from .conftest import read_data


TASKS = '''
  <celery:task name="t.record" handler="tests.tasks.record" />
'''


def broker_ids(redis_server, queue='celery'):
    """The task ids of the messages waiting in *queue*, oldest first."""
    raw = redis_server.client().lrange(queue, 0, -1)
    return [json.loads(m)['headers']['id'] for m in reversed(raw)]


def config(broker_url, dispatch_mode='outbox', extra=''):
    return (f'<celery:config broker_url="{broker_url}" '
            f'dispatch="{dispatch_mode}" {extra} '
            f'broker_connection_retry_on_startup="false" />' + TASKS)


@pytest.fixture
def down_url():
    """A Redis URL where nothing listens."""
    return f'redis://127.0.0.1:{servers.free_port()}/0'


@pytest.fixture
def site(load_zcml, db, login):
    """Load the site with a broker URL; log Alice in."""
    def load(broker_url, **kw):
        load_zcml(config(broker_url, **kw))
        login('zope.alice')
        return db
    return load


def task():
    return zope.component.getUtility(ITask, 't.record')


def write(db, key, value):
    """Change data through a connection joined to the current transaction."""
    conn = db.open()
    conn.root()['data'][key] = value
    return conn


def test_commit_publishes_and_leaves_no_record(site, redis_db,
                                               redis_server):
    db = site(redis_db)
    conn = write(db, 'k', 1)
    ids = [task().delay('a', n).id for n in range(3)]
    transaction.commit()
    conn.close()
    assert broker_ids(redis_server) == ids
    assert store.figures(db)['pending'] == 0
    assert read_data(db) == {'k': 1}


def test_records_are_written_in_the_transaction_of_the_data(
        site, down_url):
    db = site(down_url)
    conn = write(db, 'k', 1)
    ids = [task().delay('a', n).id for n in range(2)]
    transaction.commit()
    lane_tree = store.get_outbox(conn).lanes[store.lane_key()].records
    data_oid = conn.root()['data']._p_oid
    conn.close()
    # One storage transaction holds the data, the records and the ids.
    for txn in db.storage.iterator():
        extension, oids = txn.extension, {record.oid for record in txn}
    assert extension[TASK_IDS_KEY] == ids
    assert data_oid in oids and lane_tree._p_oid in oids
    assert set(store.pending_records(db)) == set(ids)


def test_broker_down_commit_is_fast_data_saved_relay_delivers_once(
        site, tmp_path):
    """Fault 1: the broker is down at commit, then comes back."""
    broker = servers.RedisServer()        # not started yet
    try:
        db = site(broker.url + '/0')
        conn = write(db, 'k', 'saved')
        ids = [task().delay('a', n).id for n in range(20)]
        start = time.perf_counter()
        transaction.commit()              # succeeds
        elapsed = time.perf_counter() - start
        conn.close()
        # Celery's default publish retries alone take 0.6s before failing.
        assert elapsed < 0.5, elapsed
        assert read_data(db) == {'k': 'saved'}
        assert sorted(store.pending_records(db)) == sorted(ids)

        broker.start()
        relay = Relay(z3c.celery.CELERY, db, grace_period=0)
        report = relay.run_once()
        assert (report.sent, report.waiting) == (20, 0)
        again = relay.run_once()
        assert again.sent == 0
        delivered = broker_ids(broker)
        assert sorted(delivered) == sorted(ids)      # each exactly once
        assert store.figures(db)['pending'] == 0
    finally:
        broker.close()


def test_broker_down_commits_do_not_wait_and_count_as_deferred(
        site, down_url, caplog):
    db = site(down_url)
    before = publishing.counters.deferred
    with caplog.at_level(logging.INFO, 'z3c.celery.outbox'):
        for n in range(3):
            task().delay('a', n)
            transaction.commit()
    assert publishing.counters.deferred == before + 3
    assert store.figures(db)['pending'] == 3
    # The first failure is a warning naming the task; later commits do
    # not try the broker again for a while.
    assert 'relay will send them' in caplog.text
    assert 'Broker unavailable a moment ago' in caplog.text


def test_vetoing_data_manager_after_ours_sends_and_stores_nothing(
        site, redis_db, redis_server):
    """Fault 3: a data manager voting no after ours."""
    db = site(redis_db)

    conn = write(db, 'k', 1)
    task().delay('a', 1)
    transaction.get().join(VetoingDataManager())
    with pytest.raises(ValueError, match='vetoed'):
        transaction.commit()
    transaction.abort()
    conn.close()
    assert broker_ids(redis_server) == []
    assert store.figures(db)['pending'] == 0
    assert read_data(db) == {}


def test_savepoints_leave_exactly_the_surviving_tasks(site, down_url):
    """Fault 5: savepoint rollbacks, nested and optimistic."""
    db = site(down_url)
    kept = task().delay('kept', 1).id
    outer = transaction.savepoint()
    task().delay('dropped', 2)
    inner = transaction.savepoint(optimistic=True)
    task().delay('dropped too', 3)
    inner.rollback()
    outer.rollback()
    middle = transaction.savepoint()
    also_kept = task().delay('also kept', 4).id
    nested = transaction.savepoint()
    task().delay('dropped three', 5)
    nested.rollback()
    transaction.savepoint()            # taken after queueing: never raises
    del middle
    transaction.commit()
    records = store.pending_records(db)
    assert sorted(records) == sorted([kept, also_kept])
    assert {r['args'][0] for r in records.values()} == {'kept', 'also kept'}


def test_record_holds_what_a_relay_needs(site, down_url):
    db = site(down_url)
    result = task().apply_async(('a', 1), countdown=30, priority=3)
    transaction.commit()
    [(task_id, record)] = store.pending_records(db).items()
    assert task_id == result.id
    assert record['name'] == 't.record'
    assert record['args'] == ('a', 1)
    assert record['kwargs'] == {}
    assert record['principal_id'] == 'zope.alice'
    # Times are kept absolute from the commit (a late relay keeps them).
    assert 'countdown' not in record['options']
    assert record['options']['eta'].timestamp() == pytest.approx(
        record['created'] + 30)
    assert record['options']['priority'] == 3
    assert record['attempts'] == 0
    assert time.time() - 60 < record['created'] <= time.time()


def test_without_joined_connection_a_connection_is_opened_and_closed(
        site, down_url):
    db = site(down_url)
    task().delay('a', 1)               # nothing else in this transaction
    transaction.commit()
    assert store.figures(db)['pending'] == 1
    pool = db.pool
    assert len(pool.available) == len(pool.all)   # all closed again


def test_joined_connection_is_used_never_a_second_one(site, down_url):
    db = site(down_url)
    opened_before = len(db.pool.all)
    conn = write(db, 'k', 1)
    task().delay('a', 1)
    transaction.commit()
    conn.close()
    # A second connection of the database would have been a new one.
    assert len(db.pool.all) == opened_before
    assert store.figures(db)['pending'] == 1


def test_named_database_of_a_multi_database_holds_the_outbox(
        load_zcml, db, login, down_url):
    databases = {}
    main = ZODB.DB(ZODB.MappingStorage.MappingStorage(), databases=databases,
                   database_name='')
    other = ZODB.DB(ZODB.MappingStorage.MappingStorage(),
                    databases=databases, database_name='tasks')
    try:
        database.set_database(main)
        load_zcml(config(down_url, extra='zodb_database="tasks"'))
        login('zope.alice')
        conn = main.open()
        conn.root()['data'] = OOBTree({'k': 1})
        task().delay('a', 1)
        transaction.commit()
        # Written through the sibling connection of the committing one.
        sibling = conn.connections['tasks']
        assert store.get_outbox(sibling) is not None
        conn.close()
        assert store.figures(other)['pending'] == 1
        assert store.figures(main)['pending'] == 0
    finally:
        database.set_database(None)
        main.close()
        other.close()


def test_default_mode_is_outbox(load_zcml, db, login, down_url):
    load_zcml(f'<celery:config broker_url="{down_url}" />' + TASKS)
    login('zope.alice')
    assert isinstance(z3c.celery.CELERY.dispatcher(),
                      OutboxDispatcher)
    task().delay('a', 1)
    transaction.commit()
    assert store.figures(db)['pending'] == 1


def test_default_mode_without_database_falls_back_to_after_commit(
        load_zcml, login, redis_db, redis_server, caplog):
    load_zcml(f'<celery:config broker_url="{redis_db}" />' + TASKS)
    login('zope.alice')
    with caplog.at_level(logging.WARNING):
        result = task().delay('a', 1)
        transaction.commit()
    assert broker_ids(redis_server) == [result.id]
    assert 'no ZODB database' in caplog.text
    assert 'after-commit' in caplog.text


def test_explicit_outbox_without_database_fails_the_commit_clearly(
        load_zcml, login, redis_db, redis_server):
    load_zcml(config(redis_db))
    login('zope.alice')
    task().delay('a', 1)
    with pytest.raises(LookupError, match='no database named') as info:
        transaction.commit()
    transaction.abort()
    assert 'dispatch="after-commit"' in str(info.value)
    assert broker_ids(redis_server) == []


def test_events_sent_after_commit_and_for_relayed_tasks(
        site, down_url, redis_db, redis_server):
    db = site(down_url)
    seen = []
    zope.event.subscribers.append(seen.append)
    try:
        result = task().delay('a', 1)
        transaction.commit()
        assert [type(e).__name__ for e in seen] == ['TaskQueued']
        z3c.celery.CELERY.conf.broker_url = redis_db
        from z3c.celery.settings import reset_connections
        reset_connections(z3c.celery.CELERY)
        Relay(z3c.celery.CELERY, db, grace_period=0).run_once()
    finally:
        zope.event.subscribers.remove(seen.append)
    assert [(type(e).__name__, e.task_id) for e in seen] == [
        ('TaskQueued', result.id), ('TaskSent', result.id)]
    assert broker_ids(redis_server) == [result.id]


def test_outbox_dispatcher_is_registered_and_builtin(load_zcml):
    load_zcml()
    assert isinstance(zope.component.getUtility(IDispatcher, 'outbox'),
                      OutboxDispatcher)
    assert isinstance(BUILTIN_DISPATCHERS['outbox'](),
                      OutboxDispatcher)


def test_many_tasks_in_one_commit_all_leave_in_order(site, redis_db,
                                                     redis_server):
    db = site(redis_db)
    ids = [task().delay('a', n).id for n in range(1200)]
    transaction.commit()
    assert broker_ids(redis_server) == ids
    assert store.figures(db)['pending'] == 0
