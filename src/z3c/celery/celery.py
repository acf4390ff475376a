"""1.x import path of the names 1.x users import (a thin module)."""
from celery.exceptions import Retry

from z3c.celery import CELERY
from z3c.celery.app import TransactionAwareTask
from z3c.celery.app import ZopeLoader
from z3c.celery.exceptions import Abort
from z3c.celery.exceptions import HandleAfterAbort
from z3c.celery.session import celery_session
from z3c.celery.worker.components import get_principal
from z3c.celery.worker.components import login_principal


__all__ = ['CELERY', 'TransactionAwareTask', 'HandleAfterAbort', 'Abort',
           'Retry', 'ZopeLoader', 'celery_session', 'get_principal',
           'login_principal']
