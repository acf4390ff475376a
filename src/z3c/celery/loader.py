"""1.x import path of the loader (`z3c.celery.app`)."""
from z3c.celery.app import ZopeLoader  # noqa: F401
