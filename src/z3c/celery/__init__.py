"""Celery integration for Zope/ZODB applications, configured through ZCML.

``CELERY`` is the application; tasks defined with ``CELERY.task`` (also
``z3c.celery.task``), ``celery.shared_task`` or ``<celery:task>`` are queued
in the current transaction and sent when it commits.
"""
from z3c.celery.app import ZopeCelery


CELERY = ZopeCelery('z3c.celery')

#: 1.x name: the task decorator of ``CELERY``.
task = CELERY.task

__all__ = ['CELERY', 'task', 'ZopeCelery']
