"""1.x import path of the task class (`z3c.celery.app`)."""
from z3c.celery.app import TransactionAwareTask  # noqa: F401
