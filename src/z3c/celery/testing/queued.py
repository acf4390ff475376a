"""What a test sees of tasks: queued, sent, run, waiting in the outbox."""
import collections

import zope.event

from z3c.celery import events
from z3c.celery.message import message_of
from z3c.celery.message import queue_order
from z3c.celery.outbox import store
from z3c.celery.sending.queue import queued_messages


QueuedTask = collections.namedtuple(
    'QueuedTask',
    ['name', 'args', 'kwargs', 'task_id', 'principal_id', 'options'])
QueuedTask.__doc__ = 'One task queued in a transaction, as a test sees it.'


def _as_queued(message):
    return QueuedTask(message.name, tuple(message.args),
                      dict(message.kwargs), message.task_id,
                      message.principal_id, dict(message.options))


def queued_tasks():
    """The tasks queued so far in the current transaction (`QueuedTask`)."""
    return [_as_queued(m) for m in queued_messages()]


def queued_task_names():
    """The names of the tasks queued in the current transaction."""
    return [m.name for m in queued_messages()]


class TaskRecorder:
    """Record the task events of this process while it is active.

    ``queued`` and ``sent`` are lists of `QueuedTask`: what transactions
    queued, and what left at commit (published, or run in-process in the
    inline and eager modes).  ``started``, ``succeeded``, ``failed`` and
    ``retried`` hold the events of tasks that ran in this process.  Use as
    a context manager, or call `start` and `stop`.
    """

    def __init__(self):
        self.queued = []
        self.sent = []
        self.started = []
        self.succeeded = []
        self.failed = []
        self.retried = []

    def __call__(self, event):
        if isinstance(event, events.TaskQueued):
            self.queued.append(_as_queued(event.message))
        elif isinstance(event, events.TaskSent):
            self.sent.append(_as_queued(event.message))
        elif isinstance(event, events.TaskStarted):
            self.started.append(event)
        elif isinstance(event, events.TaskSucceeded):
            self.succeeded.append(event)
        elif isinstance(event, events.TaskFailed):
            self.failed.append(event)
        elif isinstance(event, events.TaskRetried):
            self.retried.append(event)

    @property
    def sent_names(self):
        return [task.name for task in self.sent]

    def start(self):
        zope.event.subscribers.append(self)
        return self

    def stop(self):
        if self in zope.event.subscribers:
            zope.event.subscribers.remove(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _in_queue_order(records):
    ordered = sorted(records.items(), key=lambda item: queue_order(item[1]))
    return [_as_queued(message_of(task_id, record))
            for task_id, record in ordered]


def outbox_tasks(db):
    """The tasks waiting in the outbox of *db*, oldest first (`QueuedTask`).

    With dispatch mode ``outbox`` a task waits there from the commit of
    the transaction that queued it until it was published.
    """
    return _in_queue_order(store.pending_records(db))


def outbox_dead_letters(db):
    """The tasks the relay gave up on (`QueuedTask`), oldest first."""
    return _in_queue_order(store.dead_letters(db))


def outbox_figures(db):
    """``pending``, ``oldest_age`` (seconds), ``dead`` and ``lanes``."""
    return store.figures(db)
