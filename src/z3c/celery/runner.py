"""Worker side: run one task in the Zope environment.

For each run the runner looks the components up (a utility named after
the task wins over the unnamed default), resolves the principal, takes a
ZODB connection with a transaction manager of its own (a worker thread
keeps one from task to task, see `Seat`; in-process runs open one), sets
the root site, begins a transaction, runs the task and commits.
Conflicts go to the `IConflictPolicy`, other errors to the
`IAfterAbortHandler`.  The interaction ends whatever happens; what is
left of a transaction is aborted, and a connection still joined to one is
closed, never kept.
"""
import contextlib
import logging
import threading

import celery.exceptions
import kombu.exceptions
import transaction
import ZODB.POSException
import zope.component
import zope.event
import zope.interface
import zope.security.interfaces
import zope.security.management
import zope.testing.cleanup
from ZODB.mvccadapter import MVCCAdapterInstance
from zope.component.hooks import getSite
from zope.component.hooks import setSite
from zope.security.management import endInteraction
from zope.security.management import newInteraction
from zope.security.management import queryInteraction

from z3c.celery import environment
from z3c.celery import events
from z3c.celery import markers
from z3c.celery import signing
from z3c.celery.control import Abort
from z3c.celery.control import HandleAfterAbort
from z3c.celery.worker import TID_HEADER
from z3c.celery.worker import catch_up
from z3c.celery.interfaces import ConflictRetriesExceeded
from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.interfaces import IConflictPolicy
from z3c.celery.interfaces import IPrincipalResolver


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


@zope.interface.implementer(zope.security.interfaces.IParticipation)
class Participation:
    """The participation of the principal a task runs as."""

    interaction = None

    def __init__(self, principal):
        self.principal = principal


#: The settings a run reads.
_SETTINGS = ('signing_secret', 'zodb_database', 'done_markers',
             'done_marker_retention')


def run(task, args, kwargs):
    """Entry point from ``TransactionAwareTask.__call__``."""
    request = task.request
    if not request.called_directly:
        settings = task.app.z3c_settings(*_SETTINGS)
        secret = settings[0]
        if secret and not request.is_eager:
            # First of all: a message refused for its signature runs
            # nothing.  (In-process runs did not travel through a broker.)
            signing.verify(secret, task.name, request, args, kwargs)
    principal_id = kwargs.pop('_principal_id_', None)
    # 1.x messages still in a queue after the upgrade carry these too.
    kwargs.pop('_task_id_', None)
    kwargs.pop('_run_asynchronously_', None)
    if request.called_directly:
        return run_directly(task, args, kwargs)
    outcome = Runner(task, args, kwargs, principal_id, request,
                     settings).run()
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

    def __init__(self, task, args, kwargs, principal_id, request, settings):
        self.task = task
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
        principal = resolver.resolve(task, self.principal_id)
        db = environment.get_database(self.database_name)
        seat = None
        if db is None:
            connection = None
            manager = transaction.TransactionManager()
        else:
            # See what the sender had committed when it sent this.
            catch_up(db, getattr(self.request, TID_HEADER, None))
            if self.request.is_eager:
                # In-process (inline, eager): a connection for this run.
                manager = transaction.TransactionManager()
                connection = db.open(transaction_manager=manager)
            else:
                seat = _seat
                connection, manager = seat.take(db)
        # Inline rather than in context managers: this runs for every task.
        thread_manager = transaction.manager
        saved_manager = thread_manager.manager
        saved_site = getSite()
        saved_interaction = queryInteraction()
        try:
            thread_manager.manager = manager
            setSite(environment.root_site(connection))
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
        while True:
            try:
                return self._attempt(manager, connection)
            except markers.AlreadyDone as done:
                _abort(manager)
                return markers.skip(self.task, done)
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
                countdown = policy.countdown(self.task, error, retries)
                if countdown is None:
                    self._notify(events.TaskFailed, error=error)
                    raise ConflictRetriesExceeded(
                        self.name, retries, error) from error
                self._notify(events.TaskRetried, error=error,
                             countdown=countdown, retries=retries)
                log.info('Task %s[%s] hit a conflict (%s); retry %d in '
                         '%.2fs', self.name, self.request.id, error,
                         retries + 1, countdown)
                if self.request.is_eager:
                    # In-process: run again at once, like a worker would
                    # after the countdown, without anybody sleeping.
                    retries += 1
                    continue
                return _Retrying(self._retry(countdown, error))

    def _retry(self, countdown, error):
        """Send the task again through the broker, to run in *countdown*.

        Returns Celery's `Retry` for the caller to raise.

        When the broker cannot take the new message (it is away), Celery
        would drop the one being run; it is requeued instead, so that it
        comes back once the broker does.
        """
        try:
            retry = self.task.retry(
                countdown=countdown, exc=error, throw=False)
        except celery.exceptions.Reject as reject:
            if not _is_connection_error(self.task.app, reject.reason):
                raise
            log.warning('Could not send the retry of task %s[%s] (%r); '
                        'requeueing its message', self.name,
                        self.request.id, reject.reason)
            raise celery.exceptions.Reject(
                reject.reason, requeue=True) from error
        return retry

    def _attempt(self, manager, connection):
        txn = manager.begin()
        txn.user = self.principal_id or ''
        txn.setExtendedInfo('task_name', self.name)
        if self.request.id:
            txn.setExtendedInfo('task_id', self.request.id)
        mark = self._done_marker(connection)
        self._notify(events.TaskStarted)
        result = self.task.run(*self.args, **self.kwargs)
        if mark is not None:
            markers.mark_at_commit(txn, connection, self.request.id,
                                   self.retention, shared=mark)
        if connection is None:
            manager.commit()
        else:
            _raise_known_conflict(connection)
            # The next task's ``begin`` looks for other transactions'
            # changes; the connection need not look right after this
            # commit too (what it does for code that goes on without
            # ``begin``, as a task after its own ``commit()``).
            connection.explicit_transactions = True
            try:
                manager.commit()
            finally:
                connection.explicit_transactions = False
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
            when = markers.done_at(connection, self.request.id,
                                   self.retention)
            if when is not None:
                raise markers.AlreadyDone(self.name, self.request.id, when)
        return repeated

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


def run_in_transaction(manager, policy, task, func):
    """Run *func* in a new transaction, retrying conflicts at once.

    Used for after-abort callbacks: the policy decides whether to try
    again, its countdown is not waited for (the worker never sleeps).
    """
    retries = 0
    while True:
        manager.begin()
        try:
            func()
            manager.commit()
            return
        except Exception as error:
            _abort(manager)
            if not policy.is_conflict(error) or \
                    policy.countdown(task, error, retries) is None:
                raise
            retries += 1


def _is_connection_error(app, error):
    errors = (OSError, kombu.exceptions.OperationalError)
    try:
        errors += tuple(app.connection_for_write().connection_errors)
    except Exception:
        pass
    return isinstance(error, errors)


def _abort(manager):
    try:
        manager.abort()
    except Exception:
        log.exception('Aborting the transaction failed')


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


_seat = Seat()
zope.testing.cleanup.addCleanUp(lambda: _seat.release())


def release_connection():
    """Close the connection this thread keeps for tasks (if any).

    Called before the worker closes its databases.
    """
    _seat.release()


def _idle(connection):
    # What ``Connection.close`` insists on: joined to no transaction.
    return connection._needs_to_join and not connection._registered_objects


def _raise_known_conflict(connection):
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


def _close(connection, manager):
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


def _fallbacks():
    from z3c.celery import components
    return {
        IPrincipalResolver: components.AuthenticationPrincipalResolver,
        IConflictPolicy: components.BackoffConflictPolicy,
        IAfterAbortHandler: components.AfterAbortHandler,
    }


class _LazyFallbacks(dict):

    def __missing__(self, key):
        self.update(_fallbacks())
        return self[key]


#: Used when the site did not load our configure.zcml (a 1.x setup).
_FALLBACKS = _LazyFallbacks()
