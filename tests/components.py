"""Replacement components the tests register in ZCML."""
import zope.authentication.interfaces
import zope.component
import zope.interface

from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.interfaces import IConflictPolicy
from z3c.celery.interfaces import IPrincipalResolver
from z3c.celery.worker.components import run_in_transaction


@zope.interface.implementer(IPrincipalResolver)
class AlwaysBob:
    """Runs every task as zope.bob, whoever queued it."""

    def resolve(self, task, principal_id):
        auth = zope.component.getUtility(
            zope.authentication.interfaces.IAuthentication)
        return auth.getPrincipal('zope.bob')


@zope.interface.implementer(IConflictPolicy)
class NeverRetry:
    """Gives up at the first conflict."""

    def is_conflict(self, error):
        from z3c.celery.exceptions import CONFLICT_ERRORS
        return isinstance(error, CONFLICT_ERRORS)

    def countdown(self, task, error, retries):
        return None


@zope.interface.implementer(IAfterAbortHandler)
class RecordFailure:
    """Writes the failed task's name and error into ``data``."""

    def __call__(self, task, error, manager, policy):
        from tests.tasks import data

        def write():
            data()['failure'] = (task.name, str(error))
        run_in_transaction(manager, policy, task, write)
