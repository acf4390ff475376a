"""What a task's run sends besides its own work: follow-ups.

Celery sends a task's link callbacks and the next step of its chain after
the task function returned, and a chord's callback or a failed task's
errbacks later still, while it stores the result.  In a Zope worker the
task's transaction is over by then.  So the runner queues the link
callbacks and the chain's next step in the task's own transaction
(`queue`): they leave only if it commits, through the site's dispatch,
as the task's principal.  What Celery sends after the run (a chord's
callback, errbacks) is queued in a transaction of the run's own, begun
when the run ends and committed when Celery is done with it
(``task_postrun``): a `Window`.  See docs/canvas.rst.
"""
import logging
import threading

import celery.signals
import transaction
import transaction.interfaces
import zope.security.management
import zope.testing.cleanup
from celery._state import get_current_task
from celery.canvas import group
from celery.canvas import signature
from zope.security.management import endInteraction
from zope.security.management import newInteraction
from zope.security.management import queryInteraction

from z3c.celery.message import describe
from z3c.celery.sending import queue as task_queue
from z3c.celery.worker.components import Participation


log = logging.getLogger(__name__)


def pending(request):
    """Whether *request* has follow-ups for a successful run."""
    return bool(request.callbacks or request.chain)


def queue(task, request, retval):
    """Queue *request*'s link callbacks and next chain step, with *retval*.

    In the current transaction: the task's.  As Celery's tracer sends
    them: several callbacks as one group (groups among them apart), the
    chain's next step with the rest of the chain.
    """
    app = task.app
    options = {
        'parent_id': request.id,
        'root_id': request.root_id or request.id,
        'priority': (request.delivery_info or {}).get('priority')
        if app.conf.task_inherit_parent_priority else None,
    }
    callbacks = request.callbacks
    if callbacks and len(callbacks) > 1:
        sigs = [signature(callback, app=app) for callback in callbacks]
        for sig in sigs:
            if isinstance(sig, group):
                sig.apply_async((retval,), **options)
        singles = [sig for sig in sigs if not isinstance(sig, group)]
        if singles:
            group(singles, app=app).apply_async((retval,), **options)
    elif callbacks:
        signature(callbacks[0], app=app).apply_async((retval,), **options)
    chain = request.chain
    if chain:
        signature(chain[-1], app=app).apply_async(
            (retval,), chain=chain[:-1], **options)


def sent(request):
    """The run committed its follow-ups: Celery must not send them again."""
    request.callbacks = None
    request.chain = None


class _Unresolved:
    """Stands for a principal the site did not know: follow-ups keep the id
    (and fail alike), they never run as somebody else."""

    def __init__(self, principal_id):
        self.id = principal_id


class Window:
    """The transaction of what Celery sends after a run, until it is done.

    Opened when the runner returns (or raises): the thread's transaction
    manager becomes one of the window's, in the task's interaction.
    Closed at ``task_postrun``: committed (so the follow-ups leave through
    the site's dispatch), then the thread's manager and interaction are
    what they were.
    """

    def __init__(self, task, request, principal, principal_id):
        self.app = task.app
        self.name = task.name
        self.task_id = request.id
        self.principal_id = principal_id
        self.manager = transaction.TransactionManager()
        self.manager.begin()
        if principal is None and principal_id is not None:
            principal = _Unresolved(principal_id)
        thread_manager = transaction.manager
        self._saved_manager = thread_manager.manager
        self._saved_interaction = queryInteraction()
        thread_manager.manager = self.manager
        endInteraction()
        if principal is None:
            newInteraction()
        else:
            newInteraction(Participation(principal))

    def close(self):
        try:
            self._commit()
        finally:
            transaction.manager.manager = self._saved_manager
            endInteraction()
            if self._saved_interaction is not None:
                zope.security.management.thread_local.interaction = \
                    self._saved_interaction

    def _commit(self, attempts=5):
        manager = self.manager
        messages = task_queue.queued_messages(manager=manager)
        if not messages:
            manager.abort()
            return
        for attempt in range(attempts):
            try:
                manager.commit()
                return
            except Exception as error:
                manager.abort()
                if attempt + 1 < attempts and \
                        isinstance(error, transaction.interfaces.
                                   TransientError):
                    # The outbox's own write conflicted: queue again.
                    manager.begin()
                    for message in messages:
                        task_queue.queue_message(self.app, message,
                                                 manager=manager)
                    continue
                log.error(
                    'The follow-up task(s) of %s[%s] could not be sent '
                    '(%s: %s); they are LOST: %s', self.name, self.task_id,
                    type(error).__name__, error, describe(messages))
                return


class _Windows(threading.local):

    def __init__(self):
        self.open = []


_windows = _Windows()


def current_window():
    """The window open in this thread, or ``None``."""
    stack = _windows.open
    return stack[-1] if stack else None


def open_window(task, request, principal, principal_id):
    """Begin the window of the run of *request* (see `Window`).

    Only in Celery's tracer, which ends it at ``task_postrun``: not for a
    run called otherwise (tests call the runner by hand).
    """
    if get_current_task() is task:
        _windows.open.append(Window(task, request, principal, principal_id))


def _forget_windows():
    while _windows.open:
        _windows.open.pop().close()


zope.testing.cleanup.addCleanUp(_forget_windows)


@celery.signals.task_postrun.connect(weak=False)
def _close_window(task_id=None, **kw):
    stack = _windows.open
    while stack and stack[-1].task_id == task_id:
        stack.pop().close()
        return
