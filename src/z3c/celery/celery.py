"""1.x names: ``from z3c.celery.celery import ...`` keeps working."""
import zope.authentication.interfaces
import zope.component
import zope.security.management
from celery.exceptions import Retry

from z3c.celery import CELERY
from z3c.celery.control import Abort
from z3c.celery.control import HandleAfterAbort
from z3c.celery.loader import ZopeLoader
from z3c.celery.runner import Participation
from z3c.celery.session import celery_session
from z3c.celery.task import TransactionAwareTask


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


__all__ = ['CELERY', 'TransactionAwareTask', 'HandleAfterAbort', 'Abort',
           'Retry', 'ZopeLoader', 'celery_session', 'get_principal',
           'login_principal']
