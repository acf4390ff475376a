"""The worker's ZODB connection, and every use of ZODB internals.

A worker thread keeps one connection from task to task (`Seat`); before a
task it may catch up with the sender's commit (`catch_up`); before the
commit it may fail a conflict the storage already reported
(`raise_known_conflict`).  These read attributes ZODB does not publish,
so they live here together, to be checked on a ZODB upgrade.  See
docs/worker.rst.
"""
import contextlib
import logging
import threading

import transaction
import ZODB.POSException
import zope.testing.cleanup
from ZODB.mvccadapter import MVCCAdapterInstance


log = logging.getLogger(__name__)


class Seat(threading.local):
    """The ZODB connection a worker thread keeps from one task to the next.

    Opening and closing a connection for every task costs more than a
    no-op task itself; a worker's thread (the one of a prefork child,
    each of the ``threads`` pool) runs one task at a time, so it keeps one
    connection, with a transaction manager of its own, as long as the
    database is the same and the connection is left idle (no transaction
    joined).  Each task still begins its own transaction, which brings
    the connection up to date.  In-process runs (inline, eager) open a
    connection per run instead.
    """

    def __init__(self):
        self.db = self.connection = self.manager = None

    def take(self, db):
        """The connection and transaction manager for a task on *db*."""
        if self.db is not db or self.connection is None or \
                self.connection.opened is None:
            self.release()
            manager = transaction.TransactionManager()
            self.connection = db.open(transaction_manager=manager)
            self.manager = manager
            self.db = db
        return self.connection, self.manager

    def forget(self):
        """Drop the connection without closing it (the caller does)."""
        self.db = self.connection = self.manager = None

    def release(self):
        """Close the connection kept, if any."""
        connection = self.connection
        self.forget()
        if connection is not None and connection.opened is not None:
            # Its database may be closed already: then there is nothing
            # left to give the connection back to.
            with contextlib.suppress(Exception):
                connection.close()


#: The seat of the current thread.
thread_seat = Seat()
zope.testing.cleanup.addCleanUp(lambda: thread_seat.release())


def release_connection():
    """Close the connection this thread keeps for tasks (if any).

    Called before the worker closes its databases.
    """
    thread_seat.release()


def idle(connection):
    # What ``Connection.close`` insists on: joined to no transaction.
    return connection._needs_to_join and not connection._registered_objects


def raise_known_conflict(connection):
    """Raise the conflict that committing would hit, before committing.

    The storage (ZEO, FileStorage, MappingStorage) hands each connection
    the ids of objects that other transactions changed since this one
    began.  An object this transaction changed, or read as current, that
    is among them fails the vote: it is cheaper to fail now, without the
    round trip of a vote, the abort of a half-done commit and the stack
    that `transaction` records for every failed commit.  Objects that
    resolve conflicts themselves (``_p_resolveConflict``: B-tree buckets,
    ``Length``) are left to the commit, which may well succeed.  Only a
    shortcut: when the storage keeps no such set (RelStorage, which is
    its own MVCC storage), or a change is reported later, the commit
    finds the conflict as before.
    """
    storage = connection._storage
    if storage.__class__ is not MVCCAdapterInstance:
        return          # an IMVCCStorage of its own (RelStorage)
    changed = storage._invalidations
    start = storage._start
    if not changed or start is None or storage._ltid < start:
        # Nothing reported, or only what was committed before this
        # transaction began (reported a moment after it began).
        return
    for obj in connection._registered_objects:
        oid = obj._p_oid
        if oid in changed and \
                getattr(obj, '_p_resolveConflict', None) is None:
            raise ZODB.POSException.ConflictError(
                object=obj,
                message='changed by another transaction since this one '
                        'began (found before the commit)')
    for oid in connection._readCurrent:
        if oid in changed:
            raise ZODB.POSException.ReadConflictError(
                oid=oid,
                message='read as current, but changed by another '
                        'transaction since this one began (found before '
                        'the commit)')


def close(connection, manager):
    try:
        connection.close()
    except Exception:
        # Still joined to a transaction whose abort failed: drop it.
        log.warning('Closing the ZODB connection failed; forcing it',
                    exc_info=True)
        with contextlib.suppress(Exception):
            manager.free(manager.get())
        with contextlib.suppress(Exception):
            connection._registered_objects = []
            connection.close()


def catch_up(db, token):
    """Make *db* see the transaction *token* names, if it has not yet.

    A ZEO client learns of other clients' commits from invalidations that
    travel apart from the task message, so the message may come first.
    Then one round trip to the server (``ping``) makes the client wait
    for the invalidations sent before; otherwise nothing is done, and a
    task costs no round trip (as ``server-sync true`` in zope.conf would
    cost for every transaction).  Storages without ``ping`` are left
    alone (RelStorage polls at each transaction start; a FileStorage has
    one process).
    """
    if not token or db is None:
        return False
    storage = db.storage
    ping = getattr(storage, 'ping', None)
    if ping is None:
        return False
    try:
        wanted = bytes.fromhex(token)
        if storage.lastTransaction() >= wanted:
            return False
        ping()
    except Exception:
        log.debug('Could not catch up with transaction %s', token,
                  exc_info=True)
        return False
    return True


def abort(manager):
    """Abort *manager*'s transaction; a failure is logged, not raised."""
    try:
        manager.abort()
    except Exception:
        log.exception('Aborting the transaction failed')


def sync_with_storage(db):
    """Let *db*'s next transaction see every commit the storage knows of.

    Before a task runs again after a conflict: ZEO tells its clients of
    other clients' commits apart from its answers, so the news of the
    commit that conflicted may still be on its way, and the attempt
    would read the stale state and conflict again.  One round trip to the
    server (``ping``) makes the client wait for what was sent before.
    Other storages (FileStorage, RelStorage, which polls at every
    transaction start) need nothing.
    """
    ping = getattr(db.storage, 'ping', None)
    if ping is None:
        return
    try:
        ping()
    except Exception:
        log.debug('Could not ping the storage of %r', db, exc_info=True)
