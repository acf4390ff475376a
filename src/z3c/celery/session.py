"""1.x name: ``celery_session``, the tasks queued in the current transaction.

In 1.x the session was a thread-local list of calls that a data manager
sent while the transaction voted.  In 2.x the tasks wait in the
transaction's `z3c.celery.dispatch.TaskQueue`; ``celery_session`` is a view
on it, so ``len(celery_session)`` still tells how many tasks the current
transaction will send when it commits.
"""
import transaction

from z3c.celery import dispatch


class CelerySession:
    """The tasks queued so far in the current thread's transaction.

    ``len()`` counts them; iterating yields their
    `z3c.celery.dispatch.TaskMessage` objects (``name``, ``args``,
    ``kwargs``, ``task_id``, ``principal_id``, ``options``) in the order
    they were queued.  Tasks dropped by a savepoint rollback are not
    counted any more.
    """

    def __len__(self):
        return len(dispatch.queued_messages())

    def __iter__(self):
        return iter(dispatch.queued_messages())

    @property
    def tasks(self):
        """The queued messages, as a list (1.x kept call tuples here)."""
        return dispatch.queued_messages()

    def reset(self):
        """Drop the tasks queued in the current transaction.

        The rest of the transaction is left alone; ``transaction.abort()``
        drops the tasks together with everything else.
        """
        queue = dispatch.current_queue(None, create=False)
        if queue is not None:
            del queue.messages[:]

    def __repr__(self):
        return (f'<CelerySession: {len(self)} task(s) queued in '
                f'{transaction.get()!r}>')


#: The session of the current thread's transaction.
celery_session = CelerySession()
