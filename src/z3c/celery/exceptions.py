"""Every exception of z3c.celery, in one place.

The first two are raised by task code to steer what happens after the
task's transaction was aborted; the others are what z3c.celery raises, each
naming what is wrong.
"""
import time

import transaction.interfaces
import ZODB.POSException


class HandleAfterAbort(RuntimeError):
    """Fail the task, then run ``callback(*args, **kw)`` in a new transaction.

    The task's transaction is aborted first.  ``message`` (keyword only) is
    the text of the failure Celery records; it is not passed to the
    callback.
    """

    def __init__(self, callback, *args, message='', **kw):
        if not callable(callback):
            # Rebuilt from a result backend: only the message travelled.
            callback, message = None, str(callback)
        self.callback = callback
        self.cb_args = args
        self.cb_kw = kw
        self.message = message
        super().__init__(message)

    def __call__(self):
        if self.callback is not None:
            self.callback(*self.cb_args, **self.cb_kw)

    def __str__(self):
        return self.message

    def __reduce__(self):
        return (type(self), (self.message,))


class Abort(HandleAfterAbort):
    """End the task successfully, but abort its transaction.

    ``callback`` runs in a new transaction after the abort; ``message`` is
    the task's result.
    """


class UnknownPrincipal(LookupError):
    """The principal a task was queued for does not exist (any more)."""

    def __init__(self, principal_id, task_name=None):
        self.principal_id = principal_id
        self.task_name = task_name
        super().__init__(principal_id, task_name)

    def __str__(self):
        return (f'Task {self.task_name!r} was queued for principal '
                f'{self.principal_id!r}, which the site does not know; '
                'it was not run.')


class ConflictRetriesExceeded(RuntimeError):
    """A task gave up after too many write conflicts."""

    def __init__(self, task_name, retries, error):
        self.task_name = task_name
        self.retries = retries
        self.error = error
        super().__init__(task_name, retries, error)

    def __str__(self):
        return (f'Task {self.task_name!r} gave up after {self.retries} '
                f'retries on write conflicts; last error: {self.error!r}')


def _relstorage_lock_errors():
    """RelStorage's lock errors that are transient but not conflicts.

    Its row-lock errors (``UnableToLockRowsToModifyError``,
    ``UnableToLockRowsToReadCurrentError``, their ``...DeadlockError``
    kinds) derive from ``ConflictError`` and are matched by it.  A commit
    lock that could not be had within ``commit-lock-timeout``
    (``UnableToAcquireCommitLockError``) is a ``StorageError``: it means
    other transactions held the lock, so trying again later is right, as
    for a conflict.  RelStorage is optional.
    """
    try:
        from relstorage.adapters.interfaces import \
            UnableToAcquireCommitLockError
    except ImportError:
        return ()
    return (UnableToAcquireCommitLockError,)


#: What the default conflict policy retries, by type.
CONFLICT_ERRORS = (ZODB.POSException.ConflictError,
                   transaction.interfaces.TransientError,
                   ) + _relstorage_lock_errors()


class InvalidSignature(Exception):
    """A task message was not signed with the configured secret."""

    def __init__(self, task_name, task_id, reason):
        self.task_name = task_name
        self.task_id = task_id
        self.reason = reason
        super().__init__(task_name, task_id, reason)

    def __str__(self):
        return (f'Refused task {self.task_name}[{self.task_id}]: {self.reason}'
                f'; nothing was run (messages must be signed with the '
                f'signing_secret of <celery:config>)')


class AlreadyDone(Exception):
    """The task id is marked done: its effects are already committed."""

    def __init__(self, task_name, task_id, when):
        self.task_name = task_name
        self.task_id = task_id
        self.when = when
        super().__init__(task_name, task_id, when)

    def __str__(self):
        when = time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.when))
        return (f'Task {self.task_name}[{self.task_id}] was already done '
                f'(committed at {when} UTC); skipped')


class ZopeConfError(Exception):
    """A zope.conf that cannot be used; the message names file and cause."""


class WorkerSetupError(Exception):
    """The worker cannot set up the Zope environment; says why."""
