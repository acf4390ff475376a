"""The dispatchers that keep no copy: after-commit, inline and eager.

Each is an `IDispatcher` (see `z3c.celery.interfaces`); the durable one is
`z3c.celery.outbox.dispatcher.OutboxDispatcher`.  See docs/dispatch.rst.
"""
import logging

import kombu.serialization
import zope.interface
from billiard.einfo import ExceptionInfo
from billiard.einfo import ExceptionWithTraceback
from celery.app.trace import build_tracer
from celery.exceptions import Retry
from celery.result import EagerResult
from celery.states import SUCCESS
from celery.utils.functional import maybe_list
from celery.utils.nodenames import gethostname

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
            task = app.tasks.get(message.name)
            if task is None:
                log.error('Task %s[%s] is not registered in this process; '
                          'it cannot run inline and is LOST',
                          message.name, message.task_id)
                continue
            if self.roundtrip:
                args, kwargs = _roundtrip(app, message)
            else:
                args, kwargs = message.args, message.message_kwargs
            with signing.in_process():
                outcome = apply_in_process(task, args, kwargs, message)
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


def apply_in_process(task, args, kwargs, message):
    """Run *task* here, as a worker would run *message*; an `EagerResult`.

    What ``task.apply()`` does, with the parts of the message a worker's
    request has and ``apply()`` leaves out: the chain to go on with, the
    parent and root ids, the retries so far.
    """
    options = message.options
    request = {
        'id': message.task_id,
        'task': task.name,
        'parent_id': options.get('parent_id'),
        'root_id': options.get('root_id') or message.task_id,
        'retries': options.get('retries') or 0,
        'is_eager': True,
        'loglevel': 0,
        'hostname': gethostname(),
        'callbacks': maybe_list(options.get('link')),
        'errbacks': maybe_list(options.get('link_error')),
        'chain': options.get('chain'),
        'chord': options.get('chord'),
        'group': options.get('group_id'),
        'group_index': options.get('group_index'),
        'replaced_task_nesting': options.get('replaced_task_nesting', 0),
        'headers': options.get('headers'),
        'ignore_result': options.get('ignore_result', task.ignore_result),
        'delivery_info': {'is_eager': True,
                          'priority': options.get('priority')},
    }
    tracer = build_tracer(task.name, task, eager=True, propagate=False,
                          app=task._get_app())
    traced = tracer(message.task_id, args, kwargs, request)
    retval, traceback = traced.retval, None
    if isinstance(retval, ExceptionInfo):
        retval, traceback = retval.exception, retval.traceback
        if isinstance(retval, ExceptionWithTraceback):
            retval = retval.exc
    if isinstance(retval, Retry) and retval.sig is not None:
        # The task asked for a retry (Task.retry): run it now, as apply().
        return retval.sig.apply(retries=request['retries'] + 1)
    state = SUCCESS if traced.info is None else traced.info.state
    return EagerResult(message.task_id, retval, state, traceback=traceback,
                       name=task.name)
