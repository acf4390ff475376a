"""The tasks a transaction queued, and the commit hooks that send them.

``delay()`` puts a `z3c.celery.message.TaskMessage` into the `TaskQueue`
of the current transaction, a savepoint-aware data manager: a savepoint
rollback drops what was queued after it, an abort drops everything.  At
commit the app's dispatcher (`z3c.celery.app.ZopeCelery.dispatcher`) gets
the messages twice: before the commit (the outbox stores them there) and
after it succeeded (to publish).  See docs/dispatch.rst.
"""
import contextlib
import contextvars
import logging
import weakref

import transaction
import transaction.interfaces
import zope.interface
from zope.component.hooks import getSite
from zope.security.management import queryInteraction

from z3c.celery import database
from z3c.celery import events
from z3c.celery.message import describe
from z3c.celery.message import record_task_ids


log = logging.getLogger(__name__)


class _QueueSavepoint:

    def __init__(self, queue):
        self.queue = queue
        self.length = len(queue.messages)

    def rollback(self):
        del self.queue.messages[self.length:]


@zope.interface.implementer(transaction.interfaces.ISavepointDataManager)
class TaskQueue:
    """The tasks one transaction queued; joined to it as a data manager.

    It writes nothing itself in two-phase commit: its part is to follow
    savepoints and aborts, and to run the dispatcher from the commit hooks.
    """

    def __init__(self, app, txn):
        self.app = app
        self.transaction_manager = getattr(txn, '_manager', None)
        self.messages = []
        # Warns if the transaction goes away, or the process ends, with
        # tasks neither sent nor aborted (a script that never commits).
        self._unsent = _Unsent(self.messages)
        weakref.finalize(self, self._unsent.warn)
        self._prepared = None   # messages handed to before_commit so far
        self._dispatcher = None
        txn.join(self)
        txn.addBeforeCommitHook(self._before_commit)
        txn.addAfterCommitHook(self._after_commit)
        self._txn = txn

    def add(self, message):
        if self._prepared is not None:
            # Queued by a before-commit hook that ran after ours.
            self._txn.addBeforeCommitHook(self._before_commit)
        self.messages.append(message)

    # Commit hooks

    def _before_commit(self):
        start = self._prepared or 0
        new = self.messages[start:]
        self._prepared = len(self.messages)
        if not new:
            return
        if self._dispatcher is None:
            self._dispatcher = self.app.dispatcher()
        record_task_ids(self._txn.extension, [m.task_id for m in new])
        self._dispatcher.before_commit(self.app, self._txn, new)

    def _after_commit(self, status):
        messages, self.messages = self.messages, []
        self._unsent.messages = self.messages
        if not status or not messages:
            return
        self._dispatcher.after_commit(self.app, messages)

    # ISavepointDataManager

    def savepoint(self):
        return _QueueSavepoint(self)

    def abort(self, txn):
        self._drop()

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        self._drop()

    def _drop(self):
        if self.messages:
            log.info('Transaction aborted: %d queued task(s) dropped, not '
                     'sent: %s', len(self.messages), describe(self.messages))
        self.messages = []
        self._unsent.messages = self.messages

    def sortKey(self):
        return f'~z3c.celery.queue:{id(self)}'


class _Unsent:
    """The messages of a queue, for a warning if they are never sent."""

    def __init__(self, messages):
        self.messages = messages

    def warn(self):
        if self.messages:
            log.warning(
                'A transaction that queued %d task(s) ended without commit '
                'or abort (dropped, or still open when the process '
                'exited); they were NOT sent (commit the transaction, or '
                'send with app.send_task_now()): %s', len(self.messages),
                describe(self.messages))
            self.messages = []


# Which transaction: the thread's, or one given for the current context.

_manager = contextvars.ContextVar('z3c.celery transaction manager',
                                  default=None)


def set_transaction_manager(manager):
    """Queue tasks in *manager*'s transactions in the current context.

    For code where several units of work share a thread, each with a
    transaction of its own: asyncio tasks (each has its own context).
    ``None`` goes back to the thread's ``transaction.manager``.  Returns
    a token for `reset_transaction_manager`.
    """
    return _manager.set(manager)


def reset_transaction_manager(token):
    """Undo the `set_transaction_manager` that returned *token*."""
    _manager.reset(token)


@contextlib.contextmanager
def transaction_manager(manager):
    """Within the block, queue tasks in *manager*'s transactions."""
    token = _manager.set(manager)
    try:
        yield manager
    finally:
        _manager.reset(token)


def current_transaction(manager=None):
    """The transaction tasks are queued in now."""
    return (manager or _manager.get() or transaction.manager).get()


_QUEUE_KEY = object()


def current_queue(app, create=True, manager=None):
    """The `TaskQueue` of the current transaction (created on demand)."""
    txn = current_transaction(manager)
    try:
        return txn.data(_QUEUE_KEY)
    except KeyError:
        if not create:
            return None
    queue = TaskQueue(app, txn)
    txn.set_data(_QUEUE_KEY, queue)
    return queue


def queue_message(app, message, manager=None):
    """Queue *message* in the current transaction (or *manager*'s)."""
    current_queue(app, manager=manager).add(message)
    events.notify(events.TaskQueued, message)


def queued_messages(app=None, manager=None):
    """The messages queued so far in the current transaction."""
    queue = current_queue(app, create=False, manager=manager)
    return list(queue.messages) if queue is not None else []


def in_zope_context():
    """Whether ``send_task`` here belongs to a transaction (see
    docs/canvas.rst): tasks were queued in it already, a transaction
    manager was given for this context, or there is an interaction, a
    local site, or a ZODB connection bound to the transaction's manager
    (a request, a running task, a script that opened the database)."""
    if _manager.get() is not None or queryInteraction() is not None or \
            getSite() is not None:
        return True
    txn = current_transaction()
    try:
        txn.data(_QUEUE_KEY)
    except KeyError:
        return database.bound_to_zodb(txn)
    return True
