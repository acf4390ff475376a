"""Events fired through ``zope.event`` along a task's life."""
import zope.interface

from z3c.celery import interfaces


class _TaskEvent:

    def __init__(self, task_name, task_id, principal_id=None, **info):
        self.task_name = task_name
        self.task_id = task_id
        self.principal_id = principal_id
        self.info = info

    def __repr__(self):
        return f'<{type(self).__name__} {self.task_name}[{self.task_id}]>'


class _MessageEvent(_TaskEvent):

    def __init__(self, message):
        super().__init__(message.name, message.task_id, message.principal_id)
        self.message = message


@zope.interface.implementer(interfaces.ITaskQueuedEvent)
class TaskQueued(_MessageEvent):
    """See `ITaskQueuedEvent`."""


@zope.interface.implementer(interfaces.ITaskSentEvent)
class TaskSent(_MessageEvent):
    """See `ITaskSentEvent`."""


@zope.interface.implementer(interfaces.ITaskStartedEvent)
class TaskStarted(_TaskEvent):
    """See `ITaskStartedEvent`."""


@zope.interface.implementer(interfaces.ITaskRetriedEvent)
class TaskRetried(_TaskEvent):
    """See `ITaskRetriedEvent`; ``info`` has ``error`` and ``countdown``."""


@zope.interface.implementer(interfaces.ITaskSucceededEvent)
class TaskSucceeded(_TaskEvent):
    """See `ITaskSucceededEvent`; ``info`` has ``result``."""


@zope.interface.implementer(interfaces.ITaskFailedEvent)
class TaskFailed(_TaskEvent):
    """See `ITaskFailedEvent`; ``info`` has ``error``."""
