"""Task functions the tests register through ZCML (and workers import)."""
import zope.component.hooks
import zope.security.management
from BTrees.OOBTree import OOBTree
from ZODB.POSException import ConflictError

from z3c.celery.exceptions import Abort
from z3c.celery.exceptions import HandleAfterAbort


def data():
    """The ``data`` mapping in the root of the task's ZODB connection."""
    site = zope.component.hooks.getSite()
    return site._p_jar.root()['data']


def principal_id():
    interaction = zope.security.management.getInteraction()
    return interaction.participations[0].principal.id


def record(key, value):
    """Write ``(value, principal id)`` under *key*."""
    data()[key] = (value, principal_id())
    return value


def read(key):
    return data().get(key)


def bound_record(self, key):
    data()[key] = self.request.id
    return self.request.id


def increment(key):
    d = data()
    d[key] = d.get(key, 0) + 1


_conflicts = {}


def conflict_then_record(key, times):
    """Raise ConflictError *times* times (per key), then record."""
    seen = _conflicts.get(key, 0)
    if seen < times:
        _conflicts[key] = seen + 1
        data()[key + '-dirty'] = seen   # must be rolled back
        raise ConflictError(f'simulated conflict {seen + 1}')
    data()[key] = ('done', seen)


def fail(key):
    data()[key] = 'dirty'
    raise ValueError(f'task failed for {key}')


def _after(key, value):
    data()[key] = value


def fail_with_handler(key):
    data()[key] = 'dirty'
    raise HandleAfterAbort(_after, key, 'handled', message=f'failed: {key}')


def abort_with_handler(key):
    data()[key] = 'dirty'
    raise Abort(_after, key, 'aborted', message=f'aborted: {key}')


def noop():
    return None


def make_tree():
    return OOBTree()
SITE = "not callable"


def add(x, y):
    """Record ``x + y`` (and the principal) under ``add-x-y``; return it."""
    data()[f'add-{x}-{y}'] = (x + y, principal_id())
    return x + y


def queue_add(x, y):
    """Queue ``t.add(x, y)`` from inside a task; write nothing else."""
    from z3c.celery.interfaces import ITask
    zope.component.getUtility(ITask, 't.add').delay(x, y)


def replace_with_add(self, x, y):
    """Replace this task by ``t.add(x, y)`` (Celery's Task.replace)."""
    from z3c.celery.interfaces import ITask
    add_task = zope.component.getUtility(ITask, 't.add')
    return self.replace(add_task.s(x, y))


def errback(request, exc, traceback):
    """A link_error errback (new style): record who failed and as whom."""
    data()[f'errback-{request.id}'] = (str(exc), principal_id())


def add_after_conflicts(x, y, times):
    """Raise ConflictError *times* times (per x, y), then `add`."""
    key = f'{x}+{y}'
    seen = _conflicts.get(key, 0)
    if seen < times:
        _conflicts[key] = seen + 1
        raise ConflictError(f'simulated conflict {seen + 1}')
    return add(x, y)
