"""The result object ``delay()`` returns."""
import celery.backends.base
import celery.result
import celery.states


class QueuedResult(celery.result.AsyncResult):
    """An `AsyncResult` for a task queued in a transaction.

    Its id is fixed when ``delay()`` returns.  In a worker deployment it
    reads the result backend like any `AsyncResult`; in the in-process modes
    (inline, eager) it holds the outcome once the task ran after commit.
    """

    _outcome = None

    def set_outcome(self, outcome):
        self._outcome = outcome

    def get(self, *args, **kw):
        if self._outcome is not None:
            return self._outcome.get(*args, **kw)
        return super().get(*args, **kw)

    wait = get

    def ready(self):
        if self._outcome is not None:
            return True
        return super().ready()

    @property
    def state(self):
        if self._outcome is not None:
            return self._outcome.state
        if isinstance(self.backend, celery.backends.base.DisabledBackend):
            return celery.states.PENDING   # not run yet, nowhere to ask
        return super().state

    status = state

    @property
    def result(self):
        if self._outcome is not None:
            return self._outcome.result
        return super().result

    info = result

    @property
    def traceback(self):
        if self._outcome is not None:
            return self._outcome.traceback
        return super().traceback
