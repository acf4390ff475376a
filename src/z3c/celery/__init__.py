"""Celery integration for Zope/ZODB applications, configured through ZCML.

``CELERY`` is the application; tasks defined with ``CELERY.task`` (also
``z3c.celery.task``), ``celery.shared_task`` or ``<celery:task>`` are queued
in the current transaction and sent when it commits.
"""
from z3c.celery.app import ZopeCelery


CELERY = ZopeCelery('z3c.celery')
# Tasks made with ``celery.shared_task`` are proxies that look the task up
# in the *current* app: make that ours (in every thread), so that they are
# queued in the transaction like in 1.x.  A worker started with
# ``celery -A z3c.celery.CELERY`` does the same.
CELERY.set_default()

#: 1.x name: the task decorator of ``CELERY``.
task = CELERY.task

# ``celery worker --zope-conf/--logging-ini`` and the bootstep that runs
# tasks in the Zope environment (z3c.celery.worker).
from z3c.celery import worker as _worker  # noqa: E402

_worker.install(CELERY)
# The outbox relay runs in every worker (z3c.celery.relay); named, so that
# importing the package does not import the relay.
CELERY.steps['worker'].add('z3c.celery.relay:OutboxRelayStep')

# Loading the submodule z3c.celery.task set the package attribute ``task``
# to that module, hiding the 1.x decorator: load it now and bind the
# decorator again, for good.
__import__('z3c.celery.task')
task = CELERY.task  # noqa: F811

__all__ = ['CELERY', 'task', 'ZopeCelery']
