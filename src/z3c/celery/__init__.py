"""Celery integration for Zope/ZODB applications, configured through ZCML.

``CELERY`` is the application; tasks defined with ``CELERY.task`` (also
``z3c.celery.task``), ``celery.shared_task`` or ``<celery:task>`` are
queued in the current transaction and sent when it commits.

Where things are (docs/design.rst tells the path of one task):

* ``app`` (the app, its task class, its loader), ``settings``,
  ``interfaces`` and ``exceptions`` (the contracts), ``message`` (what
  travels with a task), ``signing``, ``database``, ``events``, ``logging``;
  ``meta.zcml``, ``metadirectives``, ``metaconfigure`` and
  ``configure.zcml`` (the ZCML layer);
* ``sending/`` (queued in the transaction, sent at commit), ``outbox/``
  (the durable outbox and its relay), ``worker/`` (where a task runs),
  ``testing/`` (test support for users: fixtures, layers, a worker
  process, servers).

1.x import paths, kept as thin modules over the above: ``celery``,
``session``, ``loader``, ``layer``, ``conftest``, ``task``, ``testing``
(now a package), ``logging`` (unchanged).
"""
from z3c.celery.app import ZopeCelery


CELERY = ZopeCelery('z3c.celery')
# Tasks made with ``celery.shared_task`` are proxies that look the task up
# in the *current* app: make that ours (in every thread), so that they are
# queued in the transaction like in 1.x.  A worker started with
# ``celery -A z3c.celery.CELERY`` does the same.
CELERY.set_default()

# 1.x had both the decorator ``z3c.celery.task`` and the module
# ``z3c.celery.task``: importing a submodule sets the package attribute of
# its name, so the module is imported first and the decorator bound last.
from z3c.celery import task as _task_module  # noqa: E402,F401


#: 1.x name: the task decorator of ``CELERY``.
task = CELERY.task

__all__ = ['CELERY', 'task', 'ZopeCelery']
