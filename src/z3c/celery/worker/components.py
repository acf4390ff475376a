"""The default components the runner looks up, and the principal helpers.

See `z3c.celery.interfaces` for what each is asked; docs/components.rst.
"""
import logging
import random

import zope.authentication.interfaces
import zope.component
import zope.interface
import zope.security.interfaces
import zope.security.management

from z3c.celery.exceptions import CONFLICT_ERRORS
from z3c.celery.exceptions import HandleAfterAbort
from z3c.celery.exceptions import UnknownPrincipal
from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.interfaces import IConflictPolicy
from z3c.celery.interfaces import IPrincipalResolver
from z3c.celery.worker.connection import abort


log = logging.getLogger(__name__)


@zope.interface.implementer(IPrincipalResolver)
class AuthenticationPrincipalResolver:
    """Look the principal up in the site's ``IAuthentication`` utility."""

    def resolve(self, task, principal_id):
        if principal_id is None:
            return None
        auth = zope.component.queryUtility(
            zope.authentication.interfaces.IAuthentication)
        if auth is None:
            raise UnknownPrincipal(principal_id, task.name)
        try:
            return auth.getPrincipal(principal_id)
        except zope.authentication.interfaces.PrincipalLookupError:
            raise UnknownPrincipal(principal_id, task.name) from None


@zope.interface.implementer(zope.security.interfaces.IParticipation)
class Participation:
    """The participation of the principal a task runs as."""

    interaction = None

    def __init__(self, principal):
        self.principal = principal


def current_principal_id():
    """The id of the principal of the current interaction, or ``None``."""
    interaction = zope.security.management.queryInteraction()
    if interaction is None:
        return None
    for participation in interaction.participations:
        principal = getattr(participation, 'principal', None)
        if principal is not None:
            return principal.id
    return None


def get_principal(principal_id):
    """The principal *principal_id* from the site's ``IAuthentication``.

    Raises ``ComponentLookupError`` without an ``IAuthentication`` utility
    and ``PrincipalLookupError`` for an unknown id, as 1.x did.
    """
    auth = zope.component.getUtility(
        zope.authentication.interfaces.IAuthentication)
    return auth.getPrincipal(principal_id)


def login_principal(principal, task_name=None):
    """Start an interaction for *principal* (ending the current one).

    *task_name* is accepted for 1.x callers and not used: a task's
    transaction records its name in the extended info instead.
    """
    zope.security.management.endInteraction()
    zope.security.management.newInteraction(Participation(principal))


@zope.interface.implementer(IConflictPolicy)
class BackoffConflictPolicy:
    """Retry conflicts with exponential backoff and ("equal") jitter.

    The n-th retry waits a random time between half and all of
    ``min(cap, base * 2**n)``; ``base`` and ``cap`` are the settings
    ``conflict_backoff_base`` and ``conflict_backoff_cap``.  The limit is
    the task's ``max_retries`` (``None``: no limit).
    """

    def __init__(self, base=None, cap=None, random=random.random):
        self.base = base
        self.cap = cap
        self.random = random

    def is_conflict(self, error):
        return isinstance(error, CONFLICT_ERRORS)

    def countdown(self, task, error, retries):
        limit = task.max_retries
        if limit is not None and retries >= limit:
            return None
        app = task.app
        base = self.base if self.base is not None else float(
            app.z3c_setting('conflict_backoff_base'))
        cap = self.cap if self.cap is not None else float(
            app.z3c_setting('conflict_backoff_cap'))
        ceiling = min(cap, base * 2 ** retries)
        return ceiling / 2 + self.random() * ceiling / 2


@zope.interface.implementer(IAfterAbortHandler)
class AfterAbortHandler:
    """Run a `HandleAfterAbort` / `Abort` callback in a new transaction.

    Other errors have nothing to run; they are logged by Celery with the
    task's failure.
    """

    def __call__(self, task, error, manager, policy):
        if not isinstance(error, HandleAfterAbort):
            return
        run_in_transaction(manager, policy, task, error)


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
            abort(manager)
            if not policy.is_conflict(error) or \
                    policy.countdown(task, error, retries) is None:
                raise
            retries += 1
