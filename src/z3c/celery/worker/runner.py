"""The generic runner: one task run in the Zope environment.

For each run the runner looks the components up (a utility named after
the task wins over the unnamed default), resolves the principal, takes a
ZODB connection with a transaction manager of its own (a worker thread
keeps one, see `z3c.celery.worker.connection`), sets the root site,
begins a transaction, runs the task and commits.  Conflicts go to the
`IConflictPolicy`, other errors to the `IAfterAbortHandler`.  See
docs/worker.rst.
"""
import logging

import celery.exceptions
import transaction
import zope.component
import zope.event
import zope.interface
import zope.security.management
from celery.app.task import Context
from celery.utils import uuid
from zope.component.hooks import getSite
from zope.component.hooks import setSite
from zope.security.management import endInteraction
from zope.security.management import newInteraction
from zope.security.management import queryInteraction

from z3c.celery import database
from z3c.celery import events
from z3c.celery import signing
from z3c.celery.exceptions import Abort
from z3c.celery.exceptions import AlreadyDone
from z3c.celery.exceptions import ConflictRetriesExceeded
from z3c.celery.exceptions import HandleAfterAbort
from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.interfaces import IConflictPolicy
from z3c.celery.interfaces import IPrincipalResolver
from z3c.celery.message import BROKER_RETRIES_HEADER
from z3c.celery.message import TID_HEADER
from z3c.celery.sending.publish import is_broker_error
from z3c.celery.worker import components
from z3c.celery.worker import follow_ups
from z3c.celery.worker import markers
from z3c.celery.worker.components import Participation
from z3c.celery.worker.components import current_principal_id
from z3c.celery.worker.connection import abort as _abort
from z3c.celery.worker.connection import catch_up
from z3c.celery.worker.connection import close as _close
from z3c.celery.worker.connection import idle as _idle
from z3c.celery.worker.connection import raise_known_conflict
from z3c.celery.worker.connection import sync_with_storage
from z3c.celery.worker.connection import thread_seat


log = logging.getLogger(__name__)


def lookup(interface, task_name):
    """The component for *task_name*: named after the task, else default."""
    site_manager = zope.component.getSiteManager()
    component = site_manager.queryUtility(interface, task_name)
    if component is None:
        component = site_manager.queryUtility(interface)
    if component is None:
        component = _FALLBACKS[interface]()
    return component


#: The settings a run reads.
_SETTINGS = ('signing_secret', 'zodb_database', 'done_markers',
             'done_marker_retention')


def run(task, args, kwargs):
    """Entry point from ``TransactionAwareTask.__call__``."""
    request = task.request
    in_process = signing.is_in_process()
    if not request.called_directly:
        settings = task.app.z3c_settings(*_SETTINGS)
        secret = settings[0]
        if secret and not in_process:
            # First of all: a message refused for its signature runs
            # nothing.  In-process runs (inline, eager) did not travel
            # through a broker; that is known from how the run started,
            # never from the request (a message's embed can set
            # ``is_eager``).  The worker's consumer checked the message
            # already (`z3c.celery.worker.guard`); this is the check
            # of the run itself.
            signing.verify(secret, task.name, request, args, kwargs)
    principal_id = kwargs.pop('_principal_id_', None)
    if principal_id is None and in_process:
        # Run in-process by a running task (Task.replace, an errback
        # after a failure): as its principal.
        principal_id = current_principal_id()
    # 1.x messages still in a queue after the upgrade carry these too.
    kwargs.pop('_task_id_', None)
    kwargs.pop('_run_asynchronously_', None)
    if request.called_directly:
        window = follow_ups.current_window()
        if window is None:
            return run_directly(task, args, kwargs)
        # Celery calls an errback ``(request, exc, traceback)`` of a failed
        # task in the worker, after the run: it runs as a task of its own,
        # here, as the failed task's principal.
        request = Context(id=uuid(), is_eager=True, called_directly=False,
                          retries=0, delivery_info={}, headers={})
        settings = task.app.z3c_settings(*_SETTINGS)
        return Runner(task, args, kwargs, window.principal_id, request,
                      settings, in_process=True).run()
    runner = Runner(task, args, kwargs, principal_id, request, settings,
                    in_process)
    try:
        outcome = runner.run()
    finally:
        # What Celery sends from now on (a chord's callback, errbacks)
        # goes in a transaction of its own, as the task's principal.
        follow_ups.open_window(task, request, runner.principal,
                               principal_id)
    if outcome.__class__ is _Retrying:
        # Raised here rather than deep in the runner: Celery copies and
        # formats every frame of a retry's traceback (for its RETRY
        # state), which for the runner's frames cost more than a run.
        raise outcome.retry
    return outcome


def run_directly(task, args, kwargs):
    """``my_task(...)``: the function, in the caller's transaction.

    As in 1.x, the control-flow exceptions still work: ``Abort`` aborts
    the caller's transaction, runs its callback and returns its message;
    ``HandleAfterAbort`` runs its callback and is raised again (the caller
    decides what becomes of its transaction).
    """
    try:
        return task.run(*args, **kwargs)
    except Abort as abort:
        transaction.abort()
        abort()
        return abort.message
    except HandleAfterAbort as handle:
        handle()
        raise


class _Retrying:
    """A run that ends in Celery's `Retry` (raised by `run`)."""

    __slots__ = ('retry',)

    def __init__(self, retry):
        self.retry = retry


class Runner:
    """One execution of one task message."""

    #: The principal the task runs as, once resolved.
    principal = None

    def __init__(self, task, args, kwargs, principal_id, request, settings,
                 in_process=False):
        self.task = task
        self.in_process = in_process
        self.args = args
        self.kwargs = kwargs
        self.principal_id = principal_id
        self.name = task.name
        self.request = request
        (self.secret, self.database_name, self.done_markers,
         self.retention) = settings

    def run(self):
        task = self.task
        resolver = lookup(IPrincipalResolver, self.name)
        principal = self.principal = resolver.resolve(
            task, self.principal_id)
        db = database.get_database(self.database_name)
        seat = None
        if db is None:
            connection = None
            manager = transaction.TransactionManager()
        else:
            # See what the sender had committed when it sent this.
            catch_up(db, getattr(self.request, TID_HEADER, None))
            if self.in_process:
                # In-process (inline, eager): a connection for this run.
                manager = transaction.TransactionManager()
                connection = db.open(transaction_manager=manager)
            else:
                seat = thread_seat
                connection, manager = seat.take(db)
        # Inline rather than in context managers: this runs for every task.
        thread_manager = transaction.manager
        saved_manager = thread_manager.manager
        saved_site = getSite()
        saved_interaction = queryInteraction()
        try:
            thread_manager.manager = manager
            setSite(database.root_site(connection))
            endInteraction()
            if principal is None:
                newInteraction()
            else:
                newInteraction(Participation(principal))
            try:
                return self._attempts(manager, connection)
            finally:
                endInteraction()
                setSite(saved_site)
                thread_manager.manager = saved_manager
        finally:
            if connection is not None:
                if not _idle(connection):
                    # Left by a BaseException (a timeout of gevent, say),
                    # which the attempts let through.
                    _abort(manager)
                if seat is None:
                    _close(connection, manager)
                elif not _idle(connection):
                    # Still joined: never reuse this connection.
                    seat.forget()
                    _close(connection, manager)
            if saved_interaction is not None:
                # In-process modes run inside the caller's interaction.
                zope.security.management.thread_local.interaction = \
                    saved_interaction

    def _attempts(self, manager, connection):
        policy = None     # looked up when needed: most runs never need it
        retries = self.request.retries or 0
        in_process = 0    # attempts run again here, in this delivery
        while True:
            try:
                return self._attempt(manager, connection)
            except AlreadyDone as done:
                _abort(manager)
                done.task_id = self.request.id
                # Its follow-ups left with the run that committed.
                follow_ups.sent(self.request)
                return markers.skip(self.task, done)
            except celery.exceptions.Ignore:
                raise       # committed, see _attempt
            except Exception as error:
                _abort(manager)
                if policy is None:
                    policy = lookup(IConflictPolicy, self.name)
                if not policy.is_conflict(error):
                    self._after_abort(manager, policy, error)
                    if isinstance(error, Abort):
                        return error.message
                    self._notify(events.TaskFailed, error=error)
                    raise
                # max_retries bounds all retries, in the process or not.
                limit = self.task.max_retries
                exhausted = limit is not None and retries >= limit
                again = countdown = None
                if not exhausted:
                    again = getattr(policy, 'in_process', _never)(
                        self.task, error, in_process)
                    countdown = 0.0 if again else policy.countdown(
                        self.task, error, self._broker_retries())
                    # In-process runs (inline, eager) run again here, at
                    # once, where a worker would after the countdown.
                    again = again or (countdown is not None and
                                      self.in_process)
                if exhausted or countdown is None:
                    exceeded = ConflictRetriesExceeded(
                        self.name, retries, error)
                    self._after_abort(manager, policy, exceeded)
                    self._notify(events.TaskFailed, error=exceeded)
                    raise exceeded from error
                self._notify(events.TaskRetried, error=error,
                             countdown=countdown, retries=retries,
                             attempt=retries + 2, in_process=bool(again))
                if again:
                    log.info('Task %s[%s] hit a conflict (%s); attempt %d '
                             'at once, in this process', self.name,
                             self.request.id, error, retries + 2)
                    retries += 1
                    in_process += 1
                    self.request.retries = retries
                    if connection is not None:
                        sync_with_storage(connection.db())
                    continue
                log.info('Task %s[%s] hit a conflict (%s); retry %d in '
                         '%.2fs', self.name, self.request.id, error,
                         retries + 1, countdown)
                return _Retrying(self._retry(countdown, error))

    def _retry(self, countdown, error):
        """Send the task again through the broker, to run in *countdown*.

        Returns Celery's `Retry` for the caller to raise.

        When the broker cannot take the new message (it is away), Celery
        would drop the one being run; it is requeued instead, so that it
        comes back once the broker does.
        """
        headers = dict(self.request.headers or {}, **{
            BROKER_RETRIES_HEADER: self._broker_retries() + 1})
        try:
            retry = self.task.retry(
                countdown=countdown, exc=error, throw=False,
                headers=headers)
        except celery.exceptions.Reject as reject:
            if not is_broker_error(self.task.app, reject.reason):
                raise
            log.warning('Could not send the retry of task %s[%s] (%r); '
                        'requeueing its message', self.name,
                        self.request.id, reject.reason)
            raise celery.exceptions.Reject(
                reject.reason, requeue=True) from error
        return retry

    def _broker_retries(self):
        """How often a conflict sent this task back to the broker."""
        return int(getattr(self.request, BROKER_RETRIES_HEADER, 0) or 0)

    def _attempt(self, manager, connection):
        txn = manager.begin()
        txn.user = self.principal_id or ''
        txn.setExtendedInfo('task_name', self.name)
        if self.request.id:
            txn.setExtendedInfo('task_id', self.request.id)
        mark = self._done_marker(connection)
        self._notify(events.TaskStarted)
        ignore = None
        try:
            result = self.task.run(*self.args, **self.kwargs)
        except celery.exceptions.Ignore as error:
            # The run is done and wants no state stored: Task.replace()
            # raises it after queueing the task that replaces this one,
            # which must leave.  So the transaction commits.
            ignore, result = error, None
        else:
            if follow_ups.pending(self.request):
                follow_ups.queue(self.task, self.request, result)
        if mark is not None:
            markers.mark_at_commit(txn, connection, self._marker_id(),
                                   self.retention, shared=mark)
        if connection is None:
            manager.commit()
        else:
            raise_known_conflict(connection)
            # The next task's ``begin`` looks for other transactions'
            # changes; the connection need not look right after this
            # commit too (what it does for code that goes on without
            # ``begin``, as a task after its own ``commit()``).
            connection.explicit_transactions = True
            try:
                manager.commit()
            finally:
                connection.explicit_transactions = False
        if ignore is not None:
            raise ignore
        follow_ups.sent(self.request)
        self._notify(events.TaskSucceeded, result=result)
        return result

    def _done_marker(self, connection):
        """Skip a task already done; how a run that writes is marked.

        Returns ``None`` when this run takes no done-marker, else whether
        it marks in the shared partition (see `markers`).  A run that may
        repeat an earlier delivery looks in every partition now, so that
        a redelivered task whose run committed does not run again.  A
        first delivery looks in the shared partition when it marks, at
        commit (`markers.mark_done`): its id is found there only when
        another copy of its message ran first (a relay's resend, say),
        which is rare, and a task that writes nothing does not look.
        """
        if connection is None or not self.request.id or \
                not self.done_markers:
            return None
        repeated = markers.maybe_repeated(self.task, self.request,
                                          self.secret)
        # A retry of this run is flagged alike (see the task's retry).
        self.request.z3c_repeated = repeated
        if repeated:
            when = markers.done_at(connection, self._marker_id(),
                                   self.retention)
            if when is not None:
                raise AlreadyDone(self.name, self.request.id, when)
        return repeated

    def _marker_id(self):
        """The done-marker's key: the task id, and for a task that
        replaces another (``Task.replace``: it keeps the id) how many
        replacements deep it is."""
        nesting = getattr(self.request, 'replaced_task_nesting', 0)
        if nesting:
            return f'{self.request.id}/replaced/{nesting}'
        return self.request.id

    def _after_abort(self, manager, policy, error):
        handler = lookup(IAfterAbortHandler, self.name)
        try:
            handler(self.task, error, manager=manager, policy=policy)
        except Exception:
            log.exception('After-abort handler of task %s[%s] failed',
                          self.name, self.request.id)

    _listened = None

    def _notify(self, event_class, **info):
        listened = self._listened
        if listened is None:
            # Once per run: the site (and its registries) stay the same.
            listened = self._listened = events.listeners()
        if listened(event_class):
            zope.event.notify(event_class(self.name, self.request.id,
                                          self.principal_id, **info))


def _never(task, error, attempts):
    return False


#: Used when the site did not load our configure.zcml (a 1.x setup).
_FALLBACKS = {
    IPrincipalResolver: components.AuthenticationPrincipalResolver,
    IConflictPolicy: components.BackoffConflictPolicy,
    IAfterAbortHandler: components.AfterAbortHandler,
}
