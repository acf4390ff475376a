"""The example site's component override (see ``site.zcml``)."""
import zope.interface
from exampleapp import data
from exampleapp import principal_id

from z3c.celery.exceptions import HandleAfterAbort
from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.worker.components import run_in_transaction


@zope.interface.implementer(IAfterAbortHandler)
class AuditingAfterAbort:
    """Do what the default handler does, and write an audit record.

    Registered for one task with ``<celery:task after_abort="...">``.  In
    one new transaction: run the `HandleAfterAbort` callback, if the task
    raised one, and record task name, principal and error under the task
    id in ``audit``.  A conflict in that transaction is retried by the
    task's conflict policy.
    """

    def __call__(self, task, error, manager, policy):
        def handle():
            if isinstance(error, HandleAfterAbort):
                error()
            data().audit[task.request.id] = (
                task.name, principal_id(), str(error))
        run_in_transaction(manager, policy, task, handle)
