"""The durable outbox: queued tasks stored in the ZODB with the data.

Dispatch mode ``outbox`` writes a record of every task a transaction queued
into the ZODB *in that same transaction*, publishes the tasks right after
the commit and then deletes their records in a short transaction of its
own.  If the broker cannot be reached, or the process dies between commit
and publish, the records stay: the relay (:mod:`z3c.celery.relay`)
publishes them later under the same task ids.

Layout (under the ZODB root key `OUTBOX_KEY`)::

    Outbox
      lanes:  OOBTree  lane key -> Lane
                                     records: OOBTree  task id -> record
      dead:   OOBTree  task id -> record (dead letters)

There is no shared counter.  Every (process, thread) writes into a lane of
its own, keyed by host name, process id and thread id, so concurrent
committers never touch the same BTree bucket; a new lane is one insert of a
distinct key into ``lanes``, which BTrees' conflict resolution merges.  The
relay changes or deletes records of other lanes only when they are overdue
(a broker outage or a dead process), and those writes also merge with the
owner's inserts.

Which database holds the outbox: the one named by the ``zodb_database``
setting (``environment.get_database(name)``: the main one by default).
The records are written through the connection of that database which is
already joined to the committing transaction; failing that, through the
connection of that database in the same multi-database group as a joined
connection; failing that, through a connection opened for this commit
with the transaction's own manager and closed when the transaction ends.
A transaction therefore never has two connections of one database.
"""
import logging
import os
import socket
import threading
import time

import kombu.exceptions
import persistent
import transaction
import zope.interface
import ZODB.Connection
import ZODB.POSException
from BTrees.OOBTree import OOBTree

from z3c.celery import dispatch
from z3c.celery import environment
from z3c.celery.interfaces import IDispatcher


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

#: Publish options of the outbox: one immediate reconnect, then give up.
#: The records are safe in the ZODB, so waiting for the broker would only
#: slow the commit down; the relay sends them later.
FAST_FAIL = {
    'retry': True,
    'retry_policy': {'max_retries': 1, 'interval_start': 0,
                     'interval_step': 0, 'interval_max': 0},
}


class Outbox(persistent.Persistent):
    """The outbox of one database."""

    def __init__(self):
        self.lanes = OOBTree()
        self.dead = OOBTree()


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



def make_record(message, now, seq=0):
    """The stored form of a `dispatch.TaskMessage` (a plain dict).

    *seq* is the message's place among those of its transaction: with
    ``created`` it keeps the order in which they were queued.
    """
    return {
        'name': message.name,
        'args': tuple(message.args),
        'kwargs': dict(message.kwargs),
        'options': dict(message.options),
        'principal_id': message.principal_id,
        'created': now,
        'seq': seq,
        'attempts': 0,
        'next_try': 0.0,
    }


def message_of(task_id, record):
    """The `dispatch.TaskMessage` a record stands for."""
    return dispatch.TaskMessage(
        record['name'], tuple(record['args']), dict(record['kwargs']),
        dict(record['options']), task_id, record['principal_id'])


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
    return environment.get_database(app.z3c_setting('zodb_database'))


def connection_for(txn, db):
    """A connection of *db* to write through in *txn*; see module doc.

    Returns ``(connection, opened)``; *opened* is true when the connection
    was opened here and must be closed after the transaction.
    """
    for resource in getattr(txn, '_resources', ()):
        if not isinstance(resource, ZODB.Connection.Connection):
            continue
        if resource.db() is db:
            return resource, False
        name = getattr(db, 'database_name', None)
        if resource.db().databases.get(name) is db:
            # A sibling of the multi-database group: opened (or reused)
            # with the same transaction manager, closed with its primary.
            return resource.get_connection(name), False
    manager = getattr(txn, '_manager', None) or transaction.manager
    return db.open(transaction_manager=manager), True


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

    Returns ``(lane key, connection written through)``.
    """
    key = key or lane_key()
    now = time.time() if now is None else now
    connection, opened = connection_for(txn, db)
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
    for seq, message in enumerate(messages):
        records[message.task_id] = make_record(message, now, seq)
    return key, connection


def remove_records(db, key, task_ids, attempts=5):
    """Delete the records *task_ids* of lane *key* (they were sent).

    Runs in a short transaction of its own (own transaction manager and
    connection), retried on conflicts.  Returns true on success; on failure
    the records stay and the relay sends them once more (same task ids).
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
                    if len(records) == len(task_ids) and all(
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


_BROKER_ERRORS = tuple(filter(None, (
    kombu.exceptions.OperationalError,
    getattr(kombu.exceptions, 'BatchPublishError', None),  # kombu >= 5.7
    OSError,
)))


def is_broker_error(app, error):
    """Is *error* the broker being unreachable (not a bad message)?"""
    if isinstance(error, _BROKER_ERRORS):
        return True
    try:
        errors = app.connection_for_write().connection_errors
    except Exception:   # pragma: no cover - broken transport
        return False
    return isinstance(error, tuple(errors))


class _State(threading.local):
    target = None      # (db, lane key, connection) of the records written
    fallback = False   # no database: behave as "after-commit"


@zope.interface.implementer(IDispatcher)
class OutboxDispatcher:
    """Store the tasks in the ZODB with the data; publish after commit.

    Guarantees: a task leaves only after its transaction committed and
    never for an aborted one; once the commit succeeded the task is not
    lost: if publishing fails (broker away, timeout) or the process dies
    before publishing, its record stays in the outbox and the relay
    publishes it later with the same task id.  A task may therefore arrive
    twice (a resend after a lost acknowledgement); the worker's done-markers
    make the second delivery a no-op.

    After a failed publish the dispatcher does not try the broker again for
    ``outbox_relay_interval`` seconds: commits meanwhile only store their
    records, so a broker outage costs the web process no waiting.
    """

    def __init__(self):
        self._state = _State()
        self._hold_until = 0.0
        self._warned = False

    # IDispatcher

    def before_commit(self, app, txn, messages):
        state = self._state
        state.target = None
        state.fallback = False
        db = database_for(app)
        if db is None:
            self._no_database(app)
            state.fallback = True
            return
        key, connection = write_records(txn, db, messages)
        state.target = (db, key, connection)

    def after_commit(self, app, messages):
        state = self._state
        target, state.target = state.target, None
        if state.fallback:
            state.fallback = False
            dispatch.AfterCommitDispatcher().after_commit(app, messages)
            return
        if target is None:   # pragma: no cover - before_commit not run
            log.error('Outbox records of %d task(s) were not written; '
                      'publishing without a copy', len(messages))
            dispatch.AfterCommitDispatcher().after_commit(app, messages)
            return
        db, key, connection = target
        if time.monotonic() < self._hold_until:
            dispatch.counters.add('deferred', len(messages))
            log.info('Broker unavailable a moment ago: %d task(s) wait in '
                     'the outbox for the relay: %s', len(messages),
                     _ids(messages))
            return
        unsent = dispatch.publish(app, messages, **FAST_FAIL)
        if unsent:
            self._hold_until = time.monotonic() + float(
                app.z3c_setting('outbox_relay_interval') or 5.0)
            dispatch.counters.add('deferred', len(unsent))
            log.warning(
                'Could not publish %d task(s) after commit (%s); they stay '
                'in the outbox and the relay will send them: %s',
                len(unsent), unsent.error, _ids(unsent))
        if len(unsent) < len(messages):
            unsent_ids = {m.task_id for m in unsent}
            if remove_records(db, key, [m.task_id for m in messages
                                        if m.task_id not in unsent_ids]):
                _refresh(connection)

    def _no_database(self, app):
        name = app.z3c_setting('zodb_database')
        if app.conf.get('dispatch') is not None or name:
            raise LookupError(
                f'dispatch mode "outbox" stores tasks in the ZODB, but this '
                f'process has no database named {name!r} (no '
                f'IDatabase utility of that name, nothing set with '
                f'z3c.celery.environment.set_database()); open the '
                f'database first, set zodb_database, or choose '
                f'dispatch="after-commit"')
        if not self._warned:
            self._warned = True
            log.warning(
                'This process has no ZODB database: the default dispatch '
                'mode "outbox" falls back to "after-commit" (tasks are '
                'published after commit but not stored; a broker failure '
                'loses them)')


def _refresh(connection):
    """Let *connection* see the deletion just committed by another one.

    The committing connection synchronised at the end of its transaction
    (``afterCompletion``), before the deletion; a caller who starts the
    next transaction without ``begin()`` (as scripts do) would otherwise
    write the lane from a stale view and get a ConflictError.  This is
    what ``afterCompletion`` itself calls.
    """
    if connection.opened is not None:
        try:
            connection.newTransaction(None, False)
        except Exception:   # pragma: no cover - only an optimisation
            log.debug('Could not refresh %r', connection, exc_info=True)


def _ids(messages):
    return ', '.join(f'{m.name}[{m.task_id}]' for m in messages)


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
        return {task_id: dict(record)
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


def _on_database_opened(event):
    """Subscriber: create the outbox when zope.app.appsetup opens a db."""
    try:
        ensure_outbox(event.database)
    except Exception:   # pragma: no cover - a read-only storage, say
        log.warning('Could not create the z3c.celery outbox', exc_info=True)
