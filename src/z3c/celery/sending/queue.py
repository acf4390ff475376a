"""The tasks a transaction queued, and the commit hooks that send them.

``delay()`` puts a `z3c.celery.message.TaskMessage` into the `TaskQueue`
of the current transaction, a savepoint-aware data manager: a savepoint
rollback drops what was queued after it, an abort drops everything.  At
commit the app's dispatcher (`z3c.celery.app.ZopeCelery.dispatcher`) gets
the messages twice: before the commit (the outbox stores them there) and
after it succeeded (to publish).  See docs/dispatch.rst.
"""
import transaction
import transaction.interfaces
import zope.interface

from z3c.celery import events
from z3c.celery.message import record_task_ids


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
        if not status or not messages:
            return
        self._dispatcher.after_commit(self.app, messages)

    # ISavepointDataManager

    def savepoint(self):
        return _QueueSavepoint(self)

    def abort(self, txn):
        self.messages = []

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        self.messages = []

    def sortKey(self):
        return f'~z3c.celery.queue:{id(self)}'


_QUEUE_KEY = object()


def current_queue(app, create=True):
    """The `TaskQueue` of the current transaction (created on demand)."""
    txn = transaction.get()
    try:
        return txn.data(_QUEUE_KEY)
    except KeyError:
        if not create:
            return None
    queue = TaskQueue(app, txn)
    txn.set_data(_QUEUE_KEY, queue)
    return queue


def queue_message(app, message):
    """Queue *message* in the current transaction."""
    current_queue(app).add(message)
    events.notify(events.TaskQueued, message)


def queued_messages(app=None):
    """The messages queued so far in the current transaction."""
    queue = current_queue(app, create=False)
    return list(queue.messages) if queue is not None else []
