"""Contracts between z3c.celery and the components a site plugs into it.

The generic runner (:mod:`z3c.celery.worker.runner`) looks each component
up when a task runs, never at start-up, so a site changes behaviour in ZCML:

* a utility named after the task (``<celery:task conflict_policy="...">`` or
  ``<utility name="my.task" provides="...">``) wins over
* the unnamed utility, which ``configure.zcml`` registers and
  ``overrides.zcml`` may replace for the whole site.
"""
import zope.interface
import zope.schema

# Named in the contracts below; defined with the other exceptions.
from z3c.celery.exceptions import CONFLICT_ERRORS  # noqa: F401
from z3c.celery.exceptions import ConflictRetriesExceeded  # noqa: F401
from z3c.celery.exceptions import UnknownPrincipal  # noqa: F401


class ITask(zope.interface.Interface):
    """A Celery task that runs in the Zope environment.

    Registered as a named utility; the name is the Celery task name.  The
    object is the Celery task itself (a :class:`celery.app.task.Task`), so
    ``getUtility(ITask, name).delay(...)`` queues it.
    """

    name = zope.schema.ASCIILine(title='The Celery task name')

    def delay(*args, **kw):
        """Queue the task for the end of the current transaction.

        Returns a :class:`celery.result.AsyncResult` whose id is fixed now.
        Nothing is sent if the transaction aborts or rolls back to a
        savepoint taken before the call.
        """

    def apply_async(args=None, kwargs=None, task_id=None, **options):
        """Like `delay`, with Celery's execution options."""


class IPrincipalResolver(zope.interface.Interface):
    """Decides who a task runs as.

    Called by the runner in the worker (or in-process, inline mode) before
    the task's transaction begins, with the principal id recorded when the
    task was queued (the principal of the interaction then, or the
    ``_principal_id_`` keyword).
    """

    def resolve(task, principal_id):
        """Return the principal the task runs as.

        *principal_id* may be ``None`` when the task was queued outside any
        interaction; the resolver then returns ``None`` and the task runs
        in an interaction without participations.

        An id that cannot be resolved must raise
        :class:`UnknownPrincipal`; a resolver never substitutes another
        principal.  Whatever it raises makes the task fail without running.
        """


class IConflictPolicy(zope.interface.Interface):
    """Decides what happens when a task meets a write conflict.

    Called by the runner after the task's transaction was aborted because
    the task body or the commit raised a conflict (see `is_conflict`).
    """

    def is_conflict(error):
        """Return true if *error* is a conflict that this policy handles.

        The default treats :class:`ZODB.POSException.ConflictError`,
        :class:`transaction.interfaces.TransientError` and RelStorage's
        ``UnableToAcquireCommitLockError`` as conflicts (RelStorage's
        row-lock errors are ``ConflictError`` subclasses).
        """

    def countdown(task, error, retries):
        """Return the seconds to wait before the next attempt, or ``None``.

        Asked when `in_process` said no.  *retries* is the number of
        times a conflict sent the task back to the broker so far (0 the
        first time; the retries in the process do not count here: the
        runner bounds all retries by the task's ``max_retries`` itself).
        ``None`` means give up: the runner then fails the task with
        :class:`ConflictRetriesExceeded`.  The worker does not sleep: the
        message goes back to the broker with this countdown.
        """

    def in_process(task, error, attempts):
        """Return true to run the task again at once, in this process.

        Asked while the task's ``max_retries`` allows another retry.
        *attempts* is how many times this delivery of the message ran
        again in the process so far.  The runner aborts, begins a new transaction
        (which sees the other transactions' changes) and runs the task
        again, without sleeping and without a broker round trip, as
        Zope's publisher retries a request.  False sends the task back to
        the broker with the countdown.  (A policy without this method
        always goes back to the broker.)
        """


class IAfterAbortHandler(zope.interface.Interface):
    """Runs after a failed task's transaction was aborted.

    Called by the runner for every error that is not a conflict the policy
    retries, after ``abort()``, with the interaction and site of the task
    still in place.  Conflicts raised inside the handler's own transaction
    are retried under the task's `IConflictPolicy` (immediately: the worker
    never sleeps); other errors it raises are logged and the task fails with
    its original error.
    """

    def __call__(task, error, manager, policy):
        """Handle *error*, raised by *task*, after the abort.

        *manager* is the task's transaction manager (begin a new
        transaction with it, never with another one); *policy* is the
        task's `IConflictPolicy`, for conflicts in that transaction.
        """


class IDispatcher(zope.interface.Interface):
    """Moves the tasks a transaction queued to the broker.

    The sending side calls it from the transaction's commit; which one is
    used is chosen by ``<celery:config dispatch="...">`` (utility named
    after the mode).
    """

    def before_commit(app, transaction, messages):
        """Called from a before-commit hook with the queued
        :class:`z3c.celery.message.TaskMessage` objects.

        May write to the ZODB through a connection joined to *transaction*
        (the outbox does); must not publish anything.
        """

    def after_commit(app, messages):
        """Publish *messages*; called only once the commit is final.

        Must not raise: the data is committed already.  A failure is logged
        at ERROR with the task ids and counted (or kept for a relay).
        """


class ITaskEvent(zope.interface.Interface):
    """Something happened to a task (see the concrete events)."""

    task_name = zope.schema.ASCIILine(title='Celery task name')
    task_id = zope.schema.ASCIILine(title='Task id')


class ITaskQueuedEvent(ITaskEvent):
    """A task was queued in a transaction (not sent yet)."""


class ITaskSentEvent(ITaskEvent):
    """A task message left for the broker after commit."""


class ITaskStartedEvent(ITaskEvent):
    """The runner is about to run a task (transaction begun)."""


class ITaskRetriedEvent(ITaskEvent):
    """A task will be retried after a conflict."""


class ITaskSucceededEvent(ITaskEvent):
    """A task's transaction committed."""


class ITaskFailedEvent(ITaskEvent):
    """A task failed (its transaction was aborted)."""
