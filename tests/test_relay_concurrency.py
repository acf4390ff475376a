"""Concurrent relays and committers on a real ZEO (and RelStorage) with a
real Redis (issue 15, part 4).

* Relays that run at the same time publish each record once: the claim
  looks again at the claims in its own transaction, and two claims of one
  record conflict.
* During a broker outage the relays write nothing where the committers
  write: no user commit gets a ConflictError from them.
* A record's countdown and expiry count from the commit, however late the
  relay sends it.
"""
import collections
import datetime
import json
import threading
import time
import uuid

import pytest
import transaction
import ZODB.POSException

import z3c.celery
from z3c.celery import database
from z3c.celery.message import TaskMessage
from z3c.celery.outbox import store
from z3c.celery.outbox.relay import Relay
from z3c.celery.testing import servers

from .test_big_transaction import relstorage_db  # noqa: F401 (fixture)
from .test_outbox import config
from .test_outbox import task
from tests import workers


def published_ids(redis_server, queue='celery'):
    raw = redis_server.client().lrange(queue, 0, -1)
    return [json.loads(m)['headers']['id'] for m in raw]


def write_pending(db, n, created):
    """*n* records in one lane, as a commit whose publish failed left."""
    messages = [TaskMessage('t.record', (f'p{i}', i), {}, {},
                            str(uuid.uuid4()), 'zope.alice')
                for i in range(n)]
    manager = transaction.TransactionManager()
    txn = manager.begin()
    store.write_records(txn, db, messages, key=f'lane-{uuid.uuid4()}',
                        now=created)
    manager.commit()
    return [m.task_id for m in messages]


@pytest.fixture
def zeo_dbs(zeo):
    """Three clients of the module's ZEO server (as three processes)."""
    dbs = [workers.zeo_db(zeo.address) for _ in range(3)]
    workers.prepare_database(dbs[0])
    store.ensure_outbox(dbs[0])
    yield dbs
    for db in dbs:
        db.close()


def test_concurrent_relays_publish_each_record_once(
        load_zcml, redis_db, redis_server, zeo_dbs):
    load_zcml(config(redis_db))
    app = z3c.celery.CELERY
    relays = [Relay(app, db, grace_period=0) for db in zeo_dbs]
    client = redis_server.client()
    duplicates = collections.Counter()
    for run in range(20):
        client.delete('celery')
        ids = write_pending(zeo_dbs[0], 100, time.time() - 60)
        barrier = threading.Barrier(len(relays))
        reports = []

        def relay_run(relay):
            barrier.wait(10)
            reports.append(relay.run_once())
        threads = [threading.Thread(target=relay_run, args=(relay,))
                   for relay in relays]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        counts = collections.Counter(published_ids(redis_server))
        duplicates.update({task_id: n - 1 for task_id, n in counts.items()
                           if n > 1})
        # What a relay did not get to (it lost every claim) is sent by
        # the next run; nothing is lost.
        for relay in relays:
            relay.flush()
        assert set(published_ids(redis_server)) == set(ids), run
    assert sum(duplicates.values()) == 0, duplicates.most_common(5)


def outage_commits_and_drain(db, relay_dbs, down_port, commits=200,
                             seconds=30.0):
    """*commits* commits each queuing one task over *seconds* while the
    broker is down and two relays run; then the broker comes back.

    Returns ``(conflicts in user commits, task ids, the Redis)``.
    """
    app = z3c.celery.CELERY
    stop = threading.Event()
    relay_errors = []

    def relay_loop(relay):
        while not stop.is_set():
            try:
                relay.run_once()
            except Exception as e:   # pragma: no cover - shown below
                relay_errors.append(e)
            stop.wait(0.2)
    relays = [Relay(app, relay_db, grace_period=0, interval=0.2)
              for relay_db in relay_dbs]
    threads = [threading.Thread(target=relay_loop, args=(relay,))
               for relay in relays]
    for thread in threads:
        thread.start()
    conflicts = 0
    ids = []
    try:
        conn = db.open()
        pause = seconds / commits
        for i in range(commits):
            for attempt in range(10):
                conn.root()['data'][f'o{i}'] = i
                result = task().delay(f'o{i}', i)
                try:
                    transaction.commit()
                except ZODB.POSException.ConflictError:
                    conflicts += 1
                    transaction.abort()
                    continue
                ids.append(result.id)
                break
            time.sleep(pause)
        conn.close()
        assert len(ids) == commits
        # The broker comes back where the site expects it.
        redis = servers.RedisServer(port=down_port).start()
        try:
            workers.wait_for(
                lambda: redis.client().llen('celery') >= commits, 60,
                message='relays drained the outbox')
            time.sleep(1.0)   # a duplicate would arrive meanwhile
            counts = collections.Counter(published_ids(redis))
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            redis.close()
    finally:
        stop.set()
    assert not relay_errors, relay_errors
    return conflicts, ids, counts


def test_no_conflicts_in_user_commits_during_an_outage_zeo(
        load_zcml, login, zeo_dbs):
    port = servers.free_port()
    load_zcml(config(f'redis://127.0.0.1:{port}/0'))
    login('zope.alice')
    database.set_database(zeo_dbs[0])
    conflicts, ids, counts = outage_commits_and_drain(
        zeo_dbs[0], zeo_dbs[1:], port)
    assert conflicts == 0
    assert counts == {task_id: 1 for task_id in ids}


def test_no_conflicts_in_user_commits_during_an_outage_relstorage(
        load_zcml, login, relstorage_db):  # noqa: F811 (fixture)
    from .test_big_transaction import _relstorage_db
    port = servers.free_port()
    load_zcml(config(f'redis://127.0.0.1:{port}/0'))
    login('zope.alice')
    workers.prepare_database(relstorage_db)
    store.ensure_outbox(relstorage_db)
    database.set_database(relstorage_db)
    others = [_relstorage_db(relstorage_db.test_name) for _ in range(2)]
    try:
        conflicts, ids, counts = outage_commits_and_drain(
            relstorage_db, others, port)
    finally:
        for other in others:
            other.close()
    assert conflicts == 0
    assert counts == {task_id: 1 for task_id in ids}


def test_countdown_and_expires_count_from_the_commit(load_zcml, login, db):
    """A relay that sends late keeps the times the commit gave."""
    port = servers.free_port()
    load_zcml(config(f'redis://127.0.0.1:{port}/0'))
    login('zope.alice')
    before = datetime.datetime.now(datetime.timezone.utc)
    task().apply_async(('late', 1), countdown=60, expires=15)
    transaction.commit()
    after = datetime.datetime.now(datetime.timezone.utc)
    [record] = store.pending_records(db).values()
    redis = servers.RedisServer(port=port).start()
    try:
        time.sleep(1.0)    # the relay sends later than the commit
        report = Relay(z3c.celery.CELERY, db).flush()
        assert report.sent == 1
        [raw] = redis.client().lrange('celery', 0, -1)
    finally:
        redis.close()
    headers = json.loads(raw)['headers']
    eta = datetime.datetime.fromisoformat(headers['eta'])
    expires = datetime.datetime.fromisoformat(headers['expires'])
    slack = datetime.timedelta(seconds=0.5)
    assert before + datetime.timedelta(seconds=60) - slack <= eta <= \
        after + datetime.timedelta(seconds=60) + slack
    assert before + datetime.timedelta(seconds=15) - slack <= expires <= \
        after + datetime.timedelta(seconds=15) + slack
    assert record['created']
