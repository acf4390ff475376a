"""Dispatch mode ``outbox``: tasks stored with the data, published after.

Before the commit the dispatcher writes a record of each task into the
outbox (`z3c.celery.outbox.store`), in the committing transaction; after
the commit it publishes them and deletes their records.  What it could not
publish stays for the relay (`z3c.celery.outbox.relay`).  See
docs/dispatch.rst.
"""
import logging
import threading
import time

import zope.interface

from z3c.celery.interfaces import IDispatcher
from z3c.celery.message import describe
from z3c.celery.outbox import store
from z3c.celery.sending.dispatchers import AfterCommitDispatcher
from z3c.celery.sending.publish import FAST_FAIL
from z3c.celery.sending.publish import counters
from z3c.celery.sending.publish import publish


log = logging.getLogger(__name__)


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
        db = store.database_for(app)
        if db is None:
            self._no_database(app)
            state.fallback = True
            return
        key, connection, fresh = store.write_records(txn, db, messages)
        state.target = (db, key, connection, fresh)

    def after_commit(self, app, messages):
        state = self._state
        target, state.target = state.target, None
        if state.fallback:
            state.fallback = False
            AfterCommitDispatcher().after_commit(app, messages)
            return
        if target is None:   # pragma: no cover - before_commit not run
            log.error('Outbox records of %d task(s) were not written; '
                      'publishing without a copy', len(messages))
            AfterCommitDispatcher().after_commit(app, messages)
            return
        db, key, connection, fresh = target
        if time.monotonic() < self._hold_until:
            counters.add('deferred', len(messages))
            log.info('Broker unavailable a moment ago: %d task(s) wait in '
                     'the outbox for the relay: %s', len(messages),
                     describe(messages))
            return
        unsent = publish(app, messages, **FAST_FAIL)
        if unsent:
            self._hold_until = time.monotonic() + float(
                app.z3c_setting('outbox_relay_interval') or 5.0)
            counters.add('deferred', len(unsent))
            log.warning(
                'Could not publish %d task(s) after commit (%s); they stay '
                'in the outbox and the relay will send them: %s',
                len(unsent), unsent.error, describe(unsent))
        if len(unsent) < len(messages):
            unsent_ids = {m.task_id for m in unsent}
            if store.remove_records(db, key, [m.task_id for m in messages
                                        if m.task_id not in unsent_ids],
                                    whole_lane=fresh and not unsent):
                _refresh(connection)

    def _no_database(self, app):
        name = app.z3c_setting('zodb_database')
        if app.conf.get('dispatch') is not None or name:
            raise LookupError(
                f'dispatch mode "outbox" stores tasks in the ZODB, but this '
                f'process has no database named {name!r} (no '
                f'IDatabase utility of that name, nothing set with '
                f'z3c.celery.database.set_database()); open the '
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


def on_database_opened(event):
    """Subscriber: create the outbox when zope.app.appsetup opens a db."""
    try:
        store.ensure_outbox(event.database)
    except Exception:   # pragma: no cover - a read-only storage, say
        log.warning('Could not create the z3c.celery outbox', exc_info=True)
