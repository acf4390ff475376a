"""Celery integration for Zope/ZODB applications, configured through ZCML.

``CELERY`` is the application; tasks defined with ``CELERY.task`` (also
``z3c.celery.task``), ``celery.shared_task`` or ``<celery:task>`` are queued
in the current transaction and sent when it commits.
"""
from z3c.celery.app import ZopeCelery


CELERY = ZopeCelery('z3c.celery')

#: 1.x name: the task decorator of ``CELERY``.
task = CELERY.task

# ``celery worker --zope-conf/--logging-ini`` and the bootstep that runs
# tasks in the Zope environment (z3c.celery.worker).
from z3c.celery import worker as _worker  # noqa: E402

_worker.install(CELERY)

__all__ = ['CELERY', 'task', 'ZopeCelery']
