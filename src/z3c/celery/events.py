"""Events fired through ``zope.event`` along a task's life."""
import threading

import zope.component
import zope.component.event
import zope.event
import zope.interface

from z3c.celery import interfaces


class _Answers(threading.local):
    """What `listened` found for the registries as they were.

    One per thread: each worker thread has a ZODB connection of its own,
    so its own copy of a persistent site's registries.
    """

    registry = None
    generations = None
    by_class = {}


_answers = _Answers()


def listened(event_class):
    """Whether an event of *event_class* may reach anybody now.

    True unless the only ``zope.event`` subscriber is zope.component's
    dispatcher and the current site manager (with its bases) has no
    handler for the event's interfaces.  The answer is kept until a
    registry of the site manager's chain changes (their generation
    counters tell), so that a run of tasks nobody listens to does not pay
    for two component look-ups each.
    """
    return listeners()(event_class)


def listeners():
    """`listened` for the registries as they are now, to ask again.

    The registries are looked at once: a task run asks for several event
    classes in a row, under one site.
    """
    subscribers = zope.event.subscribers
    if not subscribers:
        return _nobody
    if len(subscribers) > 1 or \
            subscribers[0] is not zope.component.event.dispatch:
        return _anybody
    registry = zope.component.getSiteManager().adapters
    try:
        generations = [r._generation for r in registry.ro]
    except AttributeError:      # not a zope.interface adapter registry
        return _anybody
    answers = _answers
    if answers.registry is not registry or \
            answers.generations != generations:
        answers.registry = registry
        answers.generations = generations
        answers.by_class = {}
    by_class = answers.by_class

    def answer(event_class):
        known = by_class.get(event_class)
        if known is None:
            known = by_class[event_class] = bool(registry.subscriptions(
                [zope.interface.implementedBy(event_class)], None))
        return known
    return answer


def _nobody(event_class):
    return False


def _anybody(event_class):
    return True


def notify(event_class, *args, **kw):
    """Create and send an event of *event_class* if anybody may get it."""
    if listened(event_class):
        zope.event.notify(event_class(*args, **kw))


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
    """See `ITaskRetriedEvent`; ``info`` has ``error``, ``countdown``,
    ``retries`` (made before), ``attempt`` (the number of the attempt to
    come, the first run being 1) and ``in_process`` (it runs again at
    once in this process, not through the broker)."""


@zope.interface.implementer(interfaces.ITaskSucceededEvent)
class TaskSucceeded(_TaskEvent):
    """See `ITaskSucceededEvent`; ``info`` has ``result``."""


@zope.interface.implementer(interfaces.ITaskFailedEvent)
class TaskFailed(_TaskEvent):
    """See `ITaskFailedEvent`; ``info`` has ``error``."""
