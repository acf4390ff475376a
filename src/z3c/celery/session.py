"""1.x name: ``celery_session``, the tasks queued in the current transaction.

In 1.x the session was a thread-local list of calls that a data manager
sent while the transaction voted.  In 2.x the tasks wait in the
transaction's `z3c.celery.sending.queue.TaskQueue`; ``celery_session`` is a view
on it, so ``len(celery_session)`` still tells how many tasks the current
transaction will send when it commits.
"""
import transaction

from z3c.celery.sending import queue


class CelerySession:
    """The tasks queued so far in the current thread's transaction.

    ``len()`` counts them; iterating yields their
    `z3c.celery.message.TaskMessage` objects (``name``, ``args``,
    ``kwargs``, ``task_id``, ``principal_id``, ``options``) in the order
    they were queued.  Tasks dropped by a savepoint rollback are not
    counted any more.
    """

    def __len__(self):
        return len(queue.queued_messages())

    def __iter__(self):
        return iter(queue.queued_messages())

    @property
    def tasks(self):
        """The queued messages, as a list (1.x kept call tuples here)."""
        return queue.queued_messages()

    def reset(self):
        """Drop the tasks queued in the current transaction.

        The rest of the transaction is left alone; ``transaction.abort()``
        drops the tasks together with everything else.
        """
        current = queue.current_queue(None, create=False)
        if current is not None:
            del current.messages[:]

    def __repr__(self):
        return (f'<CelerySession: {len(self)} task(s) queued in '
                f'{transaction.get()!r}>')


#: The session of the current thread's transaction.
celery_session = CelerySession()
