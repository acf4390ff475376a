"""1.x names: ``from z3c.celery.celery import ...`` keeps working."""
import zope.security.management
from celery.exceptions import Retry

from z3c.celery.components import AuthenticationPrincipalResolver
from z3c.celery.control import Abort
from z3c.celery.control import HandleAfterAbort
from z3c.celery.runner import Participation
from z3c.celery.task import TransactionAwareTask


def get_principal(principal_id):
    """The principal *principal_id* from the site's ``IAuthentication``."""
    resolver = AuthenticationPrincipalResolver()

    class _Unnamed:
        name = None

    return resolver.resolve(_Unnamed, principal_id)


def login_principal(principal):
    """Start an interaction for *principal* (ending the current one)."""
    zope.security.management.endInteraction()
    zope.security.management.newInteraction(Participation(principal))


__all__ = ['TransactionAwareTask', 'HandleAfterAbort', 'Abort', 'Retry',
           'get_principal', 'login_principal']
