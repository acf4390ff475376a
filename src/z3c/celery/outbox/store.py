"""The outbox in the ZODB: its records, and every write to them.

Lanes of records, one lane per committing thread, so that concurrent
committers never write the same B-tree bucket; dead letters apart.  A
record never changes once written: what the relays know of it lives in
trees of their own that no committer writes, ``claims`` (task id: until
when a relay publishes it) and ``tries`` (task id: failed attempts, next
try, last error).  A relay writes a lane only to delete the records it
published (or gave up on), which B-trees merge with a committer's inserts
of other keys; while the broker is away it writes no lane at all.  Two
relays that claim one record write the same key of ``claims``, which
never merges: one of them gets the ConflictError and publishes nothing.

Only this module (and `z3c.celery.message` for a record's fields) knows
the layout; the dispatcher and the relay call the functions here.  See
docs/dispatch.rst for the design.
"""
import logging
import os
import socket
import threading
import time

import persistent
import transaction
import ZODB.Connection
import ZODB.POSException
from BTrees.OOBTree import OOBTree

from z3c.celery import database
from z3c.celery.message import make_record
from z3c.celery.message import queue_order


log = logging.getLogger(__name__)

#: The key of the outbox in the ZODB root.
OUTBOX_KEY = 'z3c.celery.outbox'

#: The lane the ``outbox retry`` command puts dead letters back into.
RETRY_LANE = 'dead-letters-retried'

#: A lane's ``touched`` time is refreshed at most this often (seconds), so
#: that an active lane is not written on every commit, yet is never
#: mistaken for an abandoned one (`LANE_RETENTION` is far longer).
TOUCH_INTERVAL = 3600.0

#: Empty lanes untouched for this long (seconds) are removed by the relay.
LANE_RETENTION = 7 * 24 * 3600.0

class Outbox(persistent.Persistent):
    """The outbox of one database."""

    # Written by the relays only (created on first use: outboxes of
    # earlier versions have none).
    claims = None    # task id -> claimed until (time)
    tries = None     # task id -> (attempts, next try, last error)

    def __init__(self):
        self.lanes = OOBTree()
        self.dead = OOBTree()


def _relay_tree(outbox, name):
    tree = getattr(outbox, name)
    if tree is None:
        tree = OOBTree()
        setattr(outbox, name, tree)
    return tree


def _tries(outbox, task_id):
    tries = outbox.tries
    found = tries.get(task_id) if tries is not None else None
    return found if found is not None else (0, 0.0, None)


def with_state(outbox, task_id, record):
    """A copy of *record* with what the relays know of it."""
    attempts, next_try, error = _tries(outbox, task_id)
    copy = dict(record, attempts=attempts, next_try=next_try)
    if error is not None:
        copy['error'] = error
    claims = outbox.claims
    if claims is not None and task_id in claims:
        copy['claimed_until'] = claims[task_id]
    return copy


class Lane(persistent.Persistent):
    """The pending records written by one thread of one process."""

    def __init__(self, key, now=None):
        self.key = key
        self.records = OOBTree()
        self.touched = time.time() if now is None else now

    def __repr__(self):
        return f'<Lane {self.key}>'


def lane_key():
    """The key of the current thread's lane.

    ``threading.get_ident()`` rather than the native id: gevent's
    monkey-patching makes it the greenlet's, so concurrent greenlets of
    one thread get lanes of their own too.
    """
    return f'{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}'


def get_outbox(connection, create=False):
    """The outbox in *connection*'s database (``None`` if there is none)."""
    root = connection.root()
    outbox = root.get(OUTBOX_KEY)
    if outbox is None and create:
        outbox = root[OUTBOX_KEY] = Outbox()
    return outbox


def ensure_outbox(db):
    """Create the outbox of *db* in a transaction of its own if missing.

    Called when a database is opened (and by the relay and the command), so
    that the first transactions which queue tasks do not all write the
    ZODB root, where they would conflict with each other.
    """
    for _ in range(5):
        try:
            with db.transaction() as connection:
                get_outbox(connection, create=True)
            return
        except ZODB.POSException.ConflictError:
            continue


def database_for(app):
    """The database that holds *app*'s outbox, or ``None``."""
    return database.get_database(app.z3c_setting('zodb_database'))


def _closer(connection):
    def close(*args):
        if connection.opened is not None:
            try:
                connection.close()
            except Exception:   # pragma: no cover - should not happen
                log.warning('Closing the outbox connection failed',
                            exc_info=True)
    return close


def write_records(txn, db, messages, key=None, now=None):
    """Store *messages* in the lane *key* of *db*'s outbox, within *txn*.

    Returns ``(lane key, connection written through, fresh)``; *fresh*
    is true when the lane held no record before: the lane then holds the
    records of *messages* only (only this thread adds to it), and
    `remove_records` can empty it without reading it.
    """
    key = key or lane_key()
    now = time.time() if now is None else now
    connection, opened = database.connection_for(txn, db)
    if opened:
        close = _closer(connection)
        txn.addAfterCommitHook(close)
        txn.addAfterAbortHook(close)
    outbox = get_outbox(connection, create=True)
    lane = outbox.lanes.get(key)
    if lane is None:
        lane = outbox.lanes[key] = Lane(key, now)
    elif now - lane.touched > TOUCH_INTERVAL:
        lane.touched = now
    records = lane.records
    fresh = not records
    for seq, message in enumerate(messages):
        records[message.task_id] = make_record(message, now, seq)
    return key, connection, fresh


def remove_records(db, key, task_ids, attempts=5, whole_lane=False):
    """Delete the records *task_ids* of lane *key* (they were sent).

    Runs in a short transaction of its own (own transaction manager and
    connection), retried on conflicts.  Returns true on success; on failure
    the records stay and the relay sends them once more (same task ids).
    With *whole_lane* (the lane holds these records only, see
    `write_records`), the lane is emptied without reading its records.
    """
    task_ids = set(task_ids)
    manager = transaction.TransactionManager()
    connection = db.open(transaction_manager=manager)
    try:
        for _ in range(attempts):
            txn = manager.begin()
            txn.note(f'z3c.celery outbox: {len(task_ids)} task(s) sent')
            try:
                outbox = get_outbox(connection)
                lane = outbox.lanes.get(key) if outbox is not None else None
                if lane is not None:
                    records = lane.records
                    if whole_lane:
                        records.clear()
                    elif len(records) == len(task_ids) and all(
                            task_id in records for task_id in task_ids):
                        # All of the lane: one write instead of one per
                        # bucket.  Safe, as only this thread adds here.
                        records.clear()
                    else:
                        for task_id in task_ids:
                            records.pop(task_id, None)
                manager.commit()
                return True
            except ZODB.POSException.ConflictError:
                manager.abort()
                continue
            except Exception:
                manager.abort()
                log.warning('Could not delete %d sent outbox record(s); the '
                            'relay will send them again', len(task_ids),
                            exc_info=True)
                return False
        log.warning('Could not delete %d sent outbox record(s) after %d '
                    'conflicts; the relay will send them again',
                    len(task_ids), attempts)
        return False
    finally:
        connection.close()


def figures(db, now=None):
    """Outbox figures of *db*: pending, oldest age, dead letters, lanes."""
    now = time.time() if now is None else now
    with db.transaction() as connection:
        outbox = get_outbox(connection)
        if outbox is None:
            return {'pending': 0, 'oldest_age': None, 'dead': 0,
                    'lanes': 0}
        pending = 0
        oldest = None
        lanes = 0
        for lane in outbox.lanes.values():
            lanes += 1
            for record in lane.records.values():
                pending += 1
                if oldest is None or record['created'] < oldest:
                    oldest = record['created']
        return {
            'pending': pending,
            'oldest_age': None if oldest is None else max(0.0, now - oldest),
            'dead': len(outbox.dead),
            'lanes': lanes,
        }


def pending_records(db):
    """``{task id: record}`` of every pending record of *db* (a copy)."""
    with db.transaction() as connection:
        outbox = get_outbox(connection)
        if outbox is None:
            return {}
        return {task_id: with_state(outbox, task_id, record)
                for lane in outbox.lanes.values()
                for task_id, record in lane.records.items()}


def dead_letters(db):
    """``{task id: record}`` of the dead letters of *db* (a copy)."""
    with db.transaction() as connection:
        outbox = get_outbox(connection)
        if outbox is None:
            return {}
        return {task_id: dict(record)
                for task_id, record in outbox.dead.items()}


# What the relay writes.  Every write below runs in a transaction of the
# caller (the relay's own connection), which retries on conflicts.


def due_records(outbox, now, cutoff, force, lane_retention):
    """The records a relay may publish now, and the abandoned lanes.

    Returns ``(due, abandoned)``: *due* is a list of ``(lane key, task
    id)`` in the order the tasks were queued; records claimed by a relay
    until after *now* are not due, nor (unless *force*) records created
    after *cutoff* or whose next try is still to come.  *abandoned* are
    the keys of empty lanes untouched for *lane_retention* seconds.
    """
    due = []
    abandoned = []
    claims = outbox.claims or {}
    tries = outbox.tries or {}
    for key, lane in outbox.lanes.items():
        records = lane.records
        if not records:
            if key != RETRY_LANE and lane.touched < now - lane_retention:
                abandoned.append(key)
            continue
        for task_id, record in records.items():
            if claims.get(task_id, 0.0) > now:
                continue
            if not force:
                if record['created'] > cutoff:
                    continue
                state = tries.get(task_id)
                if state is not None and state[1] > now:
                    continue
            due.append((queue_order(record), key, task_id))
    due.sort(key=lambda item: item[0])
    return [(key, task_id) for _, key, task_id in due], abandoned


def claim(outbox, due, until, now):
    """Claim the records *due* (``(lane key, task id)``) until *until*.

    Looks again, in the claiming transaction, whether each record is still
    there and unclaimed at *now* (another relay may have claimed or sent
    it since the caller looked).  Returns ``(lane key, task id, record)``
    of those claimed.  Writes ``claims`` only: two relays that claim the
    same record conflict there, and the second publishes nothing.
    """
    claims = _relay_tree(outbox, 'claims')
    claimed = []
    for key, task_id in due:
        lane = outbox.lanes.get(key)
        record = lane.records.get(task_id) if lane is not None else None
        if record is None or claims.get(task_id, 0.0) > now:
            continue
        claims[task_id] = until
        claimed.append((key, task_id, record))
    return claimed


def _forget(outbox, task_id):
    for tree in (outbox.claims, outbox.tries):
        if tree is not None:
            tree.pop(task_id, None)


def remove_sent(outbox, key, task_id):
    """Delete the record of a task that was published."""
    lane = outbox.lanes.get(key)
    if lane is not None:
        lane.records.pop(task_id, None)
    _forget(outbox, task_id)


def release(outbox, key, task_id):
    """End the claim on a record that could not be published yet."""
    claims = outbox.claims
    if claims is not None:
        claims.pop(task_id, None)


def record_failure(outbox, key, task_id, error, now, max_attempts,
                   delay):
    """Count a failed publish of a record; returns whether it died.

    After *max_attempts* failures the record moves to the dead letters;
    before, it is due again after ``delay(attempts)`` seconds.
    """
    lane = outbox.lanes.get(key)
    record = lane.records.get(task_id) if lane is not None else None
    if record is None:
        _forget(outbox, task_id)
        return False
    attempts = _tries(outbox, task_id)[0] + 1
    text = f'{type(error).__name__}: {error}'
    if attempts >= max_attempts:
        del lane.records[task_id]
        _forget(outbox, task_id)
        outbox.dead[task_id] = dict(record, attempts=attempts, error=text,
                                    died=now, lane=lane.key)
        return True
    release(outbox, key, task_id)
    _relay_tree(outbox, 'tries')[task_id] = (
        attempts, now + delay(attempts), text)
    return False


def prune_lanes(outbox, keys):
    """Remove the lanes *keys* that are still empty; return how many."""
    pruned = 0
    for key in keys:
        lane = outbox.lanes.get(key)
        if lane is None or lane.records:
            continue
        del outbox.lanes[key]
        # Written so that an owner writing into the lane right now (it
        # refreshes ``touched`` on its first write after so long)
        # conflicts instead of writing into a detached lane.
        lane.touched = -1.0
        pruned += 1
    return pruned


def retry_dead_letters(db, task_ids=None):
    """Put dead letters (all, or *task_ids*) back into the outbox.

    They go into the lane `RETRY_LANE` with no attempts counted and are due
    at once.  Returns the task ids moved.
    """
    with db.transaction(note='z3c.celery outbox: retry dead letters') as c:
        outbox = get_outbox(c)
        if outbox is None:
            return []
        ids = list(outbox.dead.keys()) if task_ids is None else [
            task_id for task_id in task_ids if task_id in outbox.dead]
        if not ids:
            return []
        lane = outbox.lanes.get(RETRY_LANE)
        if lane is None:
            lane = outbox.lanes[RETRY_LANE] = Lane(RETRY_LANE)
        for task_id in ids:
            record = dict(outbox.dead.pop(task_id))
            for name in ('died', 'lane', 'claimed_until', 'attempts',
                         'next_try', 'error'):
                record.pop(name, None)
            _forget(outbox, task_id)
            lane.records[task_id] = record
        return ids


def purge(db, pending=False):
    """Delete the dead letters (and with *pending* every pending record).

    Returns ``(dead letters deleted, pending records deleted)``.
    """
    with db.transaction(note='z3c.celery outbox: purge') as c:
        outbox = get_outbox(c)
        if outbox is None:
            return 0, 0
        dead = len(outbox.dead)
        outbox.dead.clear()
        removed = 0
        if pending:
            for lane in outbox.lanes.values():
                removed += len(lane.records)
                lane.records.clear()
            for tree in (outbox.claims, outbox.tries):
                if tree is not None:
                    tree.clear()
        return dead, removed
