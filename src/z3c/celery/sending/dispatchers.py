"""The dispatchers that keep no copy: after-commit, inline and eager.

Each is an `IDispatcher` (see `z3c.celery.interfaces`); the durable one is
`z3c.celery.outbox.dispatcher.OutboxDispatcher`.  See docs/dispatch.rst.
"""
import logging

import kombu.serialization
import zope.interface

from z3c.celery import events
from z3c.celery import signing
from z3c.celery.interfaces import IDispatcher
from z3c.celery.message import describe
from z3c.celery.sending.publish import counters
from z3c.celery.sending.publish import publish


log = logging.getLogger(__name__)


@zope.interface.implementer(IDispatcher)
class AfterCommitDispatcher:
    """Publish right after commit; nothing is written to the ZODB.

    Guarantees: a task leaves only after its transaction committed, and
    never for an aborted one.  If the broker cannot be reached then, the
    task is lost: the failure is logged at ERROR with every task id and
    counted in ``z3c.celery.sending.publish.counters.publish_failures``.
    """

    def before_commit(self, app, txn, messages):
        pass

    def after_commit(self, app, messages):
        unsent = publish(app, messages)
        if unsent:
            counters.add('publish_failures', len(unsent))
            log.error(
                'Could not publish %d task(s) after commit; they are LOST '
                '(dispatch mode "after-commit" keeps no copy; use "outbox" '
                'to have them relayed): %s', len(unsent),
                describe(unsent),
                exc_info=unsent.error)


def _roundtrip(app, message):
    """Pass the arguments through the serializer, as the broker would."""
    serializer = message.options.get('serializer') or \
        app.conf.task_serializer
    content_type, encoding, data = kombu.serialization.dumps(
        (message.args, message.message_kwargs), serializer)
    args, kwargs = kombu.serialization.loads(
        data, content_type, encoding, accept=[content_type])
    return args, kwargs


@zope.interface.implementer(IDispatcher)
class InlineDispatcher:
    """Run each task in this process right after commit (test mode).

    Each task runs through the same runner as in a worker: its own
    transaction and ZODB connection, its principal, conflict retries; its
    arguments pass through the serializer first.  The result (or error) is
    kept in the `AsyncResult` that ``delay()`` returned.
    """

    roundtrip = True

    def before_commit(self, app, txn, messages):
        pass

    def after_commit(self, app, messages):
        for message in messages:
            task = app.tasks[message.name]
            if self.roundtrip:
                args, kwargs = _roundtrip(app, message)
            else:
                args, kwargs = message.args, message.message_kwargs
            with signing.in_process():
                outcome = task.apply(
                    args, kwargs, task_id=message.task_id, throw=False,
                    **_apply_options(message.options))
            events.notify(events.TaskSent, message)
            result = message.result
            if result is not None:
                result.set_outcome(outcome)
            if outcome.failed():
                log.error('Task %s[%s] failed (run inline): %r',
                          message.name, message.task_id, outcome.result)


class EagerDispatcher(InlineDispatcher):
    """1.x's ``task_always_eager``: run in-process after commit.

    Unlike 1.x, the task runs after the commit, not inside ``delay()``.
    """

    roundtrip = False


_APPLY_OPTIONS = frozenset(['link', 'link_error', 'headers', 'retries'])


def _apply_options(options):
    return {k: v for k, v in options.items() if k in _APPLY_OPTIONS}
