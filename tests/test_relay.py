"""The outbox relay: grace period, claims, dead letters, lanes, timer."""
import json
import time

import pytest
import transaction
from celery.utils import uuid

import z3c.celery
from z3c.celery.message import RESENT_HEADER
from z3c.celery.message import TaskMessage
from z3c.celery.outbox import relay
from z3c.celery.outbox import store as outbox_store
from z3c.celery.outbox.relay import Relay
from z3c.celery.outbox.relay import RelayTimer
from z3c.celery.outbox.store import purge
from z3c.celery.outbox.store import retry_dead_letters
from z3c.celery.sending import publish as publishing
from z3c.celery.testing import servers

from .test_outbox import broker_ids


APP = z3c.celery.CELERY


@pytest.fixture
def broker(load_zcml, db, redis_db):
    """The site, with the session's Redis as broker."""
    load_zcml(f'<celery:config broker_url="{redis_db}" '
              f'outbox_max_attempts="2" />'
              '<celery:task name="t.record" handler="tests.tasks.record" />')
    return redis_db


def message(n, **options):
    return TaskMessage('t.record', ('k', n), {}, options, uuid(),
                                'zope.alice')


def store(db, messages, key='a-lane', created=None):
    """Commit outbox records of *messages*, as a committing process does."""
    manager = transaction.TransactionManager()
    txn = manager.begin()
    outbox_store.write_records(txn, db, messages, key=key, now=created)
    manager.commit()
    return [m.task_id for m in messages]


def test_records_younger_than_the_grace_period_are_left_alone(
        broker, db, redis_server):
    ids = store(db, [message(n) for n in range(3)])
    assert Relay(APP, db, grace_period=10).run_once().sent == 0
    assert broker_ids(redis_server) == []
    later = Relay(APP, db, grace_period=10, clock=lambda: time.time() + 11)
    assert later.run_once().sent == 3
    assert broker_ids(redis_server) == ids          # oldest first
    assert outbox_store.figures(db)['pending'] == 0


def test_a_record_claimed_by_one_relay_is_not_sent_by_another(
        broker, db, redis_server, monkeypatch):
    ids = store(db, [message(n) for n in range(5)], created=0)
    first, second = Relay(APP, db), Relay(APP, db)
    original = publishing.publish
    seen = []

    def publish_while_another_relay_runs(*args, **kw):
        if not seen:
            seen.append(second.run_once())
        return original(*args, **kw)
    monkeypatch.setattr(relay, 'publish', publish_while_another_relay_runs)
    report = first.run_once()
    assert report.sent == 5
    assert seen[0].sent == 0
    assert sorted(broker_ids(redis_server)) == sorted(ids)


def test_broker_down_uses_no_attempts(load_zcml, db):
    load_zcml(f'<celery:config broker_url="redis://127.0.0.1:'
              f'{servers.free_port()}/0" outbox_max_attempts="1" />')
    store(db, [message(n) for n in range(3)], created=0)
    relay = Relay(APP, db)
    for _ in range(3):
        report = relay.run_once(force=True)
        assert (report.sent, report.waiting, report.dead) == (0, 3, 0)
        assert report.error is not None
    records = outbox_store.pending_records(db)
    assert [r['attempts'] for r in records.values()] == [0, 0, 0]
    assert outbox_store.figures(db)['dead'] == 0


def test_a_message_that_keeps_failing_becomes_a_dead_letter(
        broker, db, redis_server):
    good = store(db, [message(1)], created=0)
    # A record whose serializer is not installed (any more) cannot be sent.
    [bad] = store(db, [message(2, serializer='no-such-serializer')],
                  created=0)
    relay = Relay(APP, db)
    first = relay.run_once(force=True)
    assert (first.sent, first.failed, first.dead) == (1, 1, 0)
    assert broker_ids(redis_server) == good
    record = outbox_store.pending_records(db)[bad]
    assert record['attempts'] == 1
    assert 'no-such-serializer' in record['error']
    # Not due before its backoff, unless forced.
    assert relay.run_once().failed == 0
    second = relay.run_once(force=True)
    assert (second.sent, second.failed, second.dead) == (0, 0, 1)
    figures = outbox_store.figures(db)
    assert (figures['pending'], figures['dead']) == (0, 1)
    assert list(outbox_store.dead_letters(db)) == [bad]

    assert retry_dead_letters(db) == [bad]
    assert outbox_store.figures(db)['dead'] == 0
    assert outbox_store.pending_records(db)[bad]['attempts'] == 0
    assert relay.run_once().failed == 1            # due at once
    relay.run_once(force=True)
    assert purge(db) == (1, 0)
    figures = outbox_store.figures(db)
    assert (figures['pending'], figures['dead']) == (0, 0)


def test_abandoned_empty_lanes_are_pruned(broker, db):
    store(db, [message(1)], key='old-lane', created=0)
    store(db, [message(2)], key='busy-lane', created=0)
    with db.transaction() as conn:
        lanes = outbox_store.get_outbox(conn).lanes
        lanes['old-lane'].touched = 0
        lanes['old-lane'].records.clear()
    relay = Relay(APP, db, lane_retention=3600)
    report = relay.run_once()
    assert report.pruned == 1
    with db.transaction() as conn:
        assert list(outbox_store.get_outbox(conn).lanes) == ['busy-lane']


def test_purge_pending_drops_every_record(broker, db):
    store(db, [message(n) for n in range(4)], created=0)
    assert purge(db, pending=True) == (0, 4)
    assert outbox_store.figures(db)['pending'] == 0


def test_relay_timer_delivers_in_the_background(broker, db, redis_server):
    ids = store(db, [message(n) for n in range(3)], created=0)
    timer = RelayTimer(Relay(APP, db), interval=0.1).start()
    try:
        deadline = time.monotonic() + 10
        while len(broker_ids(redis_server)) < 3 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        timer.stop()
    assert sorted(broker_ids(redis_server)) == sorted(ids)
    assert outbox_store.figures(db)['pending'] == 0


def test_relayed_messages_are_flagged_as_possibly_sent_before(
        broker, db, redis_server):
    """The committing process may have published them already: the
    worker looks for their done-markers everywhere."""
    ids = store(db, [message(n) for n in range(2)], created=0)
    assert Relay(APP, db).run_once().sent == 2
    raw = redis_server.client().lrange('celery', 0, -1)
    headers = [json.loads(m)['headers'] for m in reversed(raw)]
    assert [h['id'] for h in headers] == ids
    assert all(h[RESENT_HEADER] is True for h in headers)
