"""Task functions of the worker tests' site (registered in tasks.zcml)."""
import logging
import os
import time

import transaction
import zope.component.hooks
import zope.security.management
from ZODB.POSException import ConflictError

from tests.tasks import data
from tests.tasks import principal_id


log = logging.getLogger('tests.site')


def whoami(key):
    """Who the task runs as, in which site, and what it reads at *key*."""
    site = zope.component.hooks.getSite()
    return {'principal': principal_id(),
            'site': type(site).__name__ if site is not None else None,
            'value': data().get(key)}


def record_and_pause(key, flag_dir, seconds):
    """Add 1 at *key*; after the commit, flag it and pause *seconds*.

    The pause falls between the commit and the acknowledgement of the
    message, where a test kills the worker.  The flag file (named after
    *key*) tells the test that the commit happened.
    """
    d = data()
    d[key] = d.get(key, 0) + 1

    def after_commit(status):
        if status:
            with open(os.path.join(flag_dir, key), 'w') as f:
                f.write(str(os.getpid()))
            time.sleep(seconds)
    transaction.get().addAfterCommitHook(after_commit)
    return d[key]


def retry_once(self, key):
    """Ask Celery for a retry (``self.retry``) once, then record *key*."""
    data()[key] = 'first attempt'     # rolled back with the retry
    if not self.request.retries:
        raise self.retry(countdown=0)
    data()[key] = (principal_id(), self.request.retries)
    return self.request.retries


def conflict_once(self, key):
    """A write conflict on the first attempt, then record who ran it."""
    data()[key + '-dirty'] = True    # rolled back with the conflict
    if not self.request.retries:
        raise ConflictError(f'simulated conflict for {key}')
    data()[key] = (principal_id(), self.request.retries)
    return self.request.retries


def log_line(message):
    log.warning('%s', message)
    return message


def sleep(seconds):
    time.sleep(seconds)


def put(key, value):
    data()[key] = value


def slow_increment(key, seconds):
    """Add 1 at *key*, taking *seconds* (so that tasks are in flight)."""
    time.sleep(seconds)
    d = data()
    d[key] = d.get(key, 0) + 1
    return d[key]


def touch(key):
    """Read only: no ZODB write, so no done-marker."""
    return data().get(key)


def log_event(event):
    """Subscriber: the z3c.celery events show in the worker log."""
    log.warning('EVENT %s %s[%s] principal=%s', type(event).__name__,
                event.task_name, event.task_id, event.principal_id)


# The canvas and the other ways of sending (tests/site/canvas.py)


def _count(tag, value):
    d = data()
    runs = d.get(tag, (0, None, None))[0]
    d[tag] = (runs + 1, principal_id(), value)


def step(value, tag):
    """A canvas step: count a run under *tag* (as whom, with what value);
    returns ``value + 1``."""
    _count(tag, value)
    return value + 1


def mark(tag):
    """A one-argument step (for ``map``)."""
    _count(tag, None)
    return tag


def total(values, tag):
    """A chord's callback: the sum of its header's results."""
    _count(tag, sorted(values))
    return sum(values)


def failing_step(value, tag):
    """Count a run that is then rolled back: it fails."""
    _count(tag, value)
    raise ValueError(f'{tag} failed')


def note_failure(task_id, tag):
    """An errback that takes the failed task's id (sent as a task)."""
    _count(tag, task_id)


def queue_step(tag):
    """A running task that queues a step; it writes nothing itself."""
    from tests.site import canvas
    canvas.step().delay(1, tag)


def replace_by_step(self, tag):
    """Replaced by ``step(1, tag)``."""
    from tests.site import canvas
    return self.replace(canvas.step().s(1, tag))


def retry_then_step(self, tag):
    """Ask for a retry once, then be a step."""
    if not self.request.retries:
        raise self.retry(countdown=0)
    return step(1, tag)


def send_inside(self, way, tag, conflicts=0, fail=False):
    """Send by *way* (see tests/site/canvas.py) from inside a task; then
    hit a write conflict *conflicts* times, or fail.  What an aborted
    attempt sent must not leave."""
    from tests.site import canvas
    canvas.WAYS[way](tag)
    if self.request.retries < conflicts:
        data()[tag + '.dirty'] = True
        raise ConflictError(f'conflict in {tag}')
    if fail:
        raise ValueError(f'{tag}: failed after sending')
    return way


def tick(key):
    """A periodic task: append who it runs as (or None) at *key*."""
    interaction = zope.security.management.queryInteraction()
    who = interaction.participations[0].principal.id \
        if interaction is not None and interaction.participations else None
    d = data()
    d[key] = d.get(key, ()) + (who,)
    return who
