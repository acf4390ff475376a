"""Exceptions a task raises to steer what happens after its abort."""


class HandleAfterAbort(RuntimeError):
    """Fail the task, then run ``callback(*args, **kw)`` in a new transaction.

    The task's transaction is aborted first.  ``message`` (keyword only) is
    the text of the failure Celery records; it is not passed to the
    callback.
    """

    def __init__(self, callback, *args, message='', **kw):
        if not callable(callback):
            # Rebuilt from a result backend: only the message travelled.
            callback, message = None, str(callback)
        self.callback = callback
        self.cb_args = args
        self.cb_kw = kw
        self.message = message
        super().__init__(message)

    def __call__(self):
        if self.callback is not None:
            self.callback(*self.cb_args, **self.cb_kw)

    def __str__(self):
        return self.message

    def __reduce__(self):
        return (type(self), (self.message,))


class Abort(HandleAfterAbort):
    """End the task successfully, but abort its transaction.

    ``callback`` runs in a new transaction after the abort; ``message`` is
    the task's result.
    """
