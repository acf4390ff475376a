"""Sending side: tasks wait in the transaction and leave after its commit.

``delay()`` puts a `TaskMessage` into the `TaskQueue` of the current
transaction.  The queue is a savepoint-aware data manager, so rolling back
to a savepoint drops the tasks queued after it, and an abort drops them all.
At commit a before-commit hook hands the messages to the `IDispatcher` of
the configured mode (the outbox writes them to the ZODB there, in the same
transaction as the data); an after-commit hook, which runs only once every
data manager voted yes and the storage finished the commit, hands them over
again to be published.
"""
import contextlib
import logging
import threading

import celery.signals
import kombu.serialization
import transaction
import transaction.interfaces
import zope.component
import zope.interface

from z3c.celery import events
from z3c.celery.interfaces import IDispatcher
from z3c.celery.markers import RESENT_HEADER


log = logging.getLogger(__name__)

#: The extended-info key under which a transaction records the ids of the
#: tasks it queued.
TASK_IDS_KEY = 'z3c.celery.task_ids'


class TaskMessage:
    """One queued task: everything needed to publish it (or run it)."""

    __slots__ = ('name', 'args', 'kwargs', 'options', 'task_id',
                 'principal_id', 'result')

    def __init__(self, name, args, kwargs, options, task_id, principal_id):
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.options = options
        self.task_id = task_id
        self.principal_id = principal_id
        self.result = None

    @property
    def message_kwargs(self):
        """The keyword arguments as they travel (with the principal)."""
        if self.principal_id is None:
            return self.kwargs
        return dict(self.kwargs, _principal_id_=self.principal_id)

    def __repr__(self):
        return (f'<TaskMessage {self.name} id={self.task_id} '
                f'principal={self.principal_id!r}>')


class _QueueSavepoint:

    def __init__(self, queue):
        self.queue = queue
        self.length = len(queue.messages)

    def rollback(self):
        del self.queue.messages[self.length:]


@zope.interface.implementer(transaction.interfaces.ISavepointDataManager)
class TaskQueue:
    """The tasks one transaction queued; joined to it as a data manager.

    It writes nothing itself in two-phase commit: its part is to follow
    savepoints and aborts, and to run the dispatcher from the commit hooks.
    """

    def __init__(self, app, txn):
        self.app = app
        self.transaction_manager = getattr(txn, '_manager', None)
        self.messages = []
        self._prepared = None   # messages handed to before_commit so far
        self._dispatcher = None
        txn.join(self)
        txn.addBeforeCommitHook(self._before_commit)
        txn.addAfterCommitHook(self._after_commit)
        self._txn = txn

    def add(self, message):
        if self._prepared is not None:
            # Queued by a before-commit hook that ran after ours.
            self._txn.addBeforeCommitHook(self._before_commit)
        self.messages.append(message)

    # Commit hooks

    def _before_commit(self):
        start = self._prepared or 0
        new = self.messages[start:]
        self._prepared = len(self.messages)
        if not new:
            return
        if self._dispatcher is None:
            self._dispatcher = get_dispatcher(self.app)
        ids = list(self._txn.extension.get(TASK_IDS_KEY, ()))
        ids.extend(m.task_id for m in new)
        self._txn.extension[TASK_IDS_KEY] = ids
        self._dispatcher.before_commit(self.app, self._txn, new)

    def _after_commit(self, status):
        messages, self.messages = self.messages, []
        if not status or not messages:
            return
        self._dispatcher.after_commit(self.app, messages)

    # ISavepointDataManager

    def savepoint(self):
        return _QueueSavepoint(self)

    def abort(self, txn):
        self.messages = []

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        self.messages = []

    def sortKey(self):
        return f'~z3c.celery.queue:{id(self)}'


_QUEUE_KEY = object()


def current_queue(app, create=True):
    """The `TaskQueue` of the current transaction (created on demand)."""
    txn = transaction.get()
    try:
        return txn.data(_QUEUE_KEY)
    except KeyError:
        if not create:
            return None
    queue = TaskQueue(app, txn)
    txn.set_data(_QUEUE_KEY, queue)
    return queue


def queue_message(app, message):
    """Queue *message* in the current transaction."""
    current_queue(app).add(message)
    events.notify(events.TaskQueued, message)


def queued_messages(app=None):
    """The messages queued so far in the current transaction."""
    queue = current_queue(app, create=False)
    return list(queue.messages) if queue is not None else []


# Dispatchers


def get_dispatcher(app):
    """The dispatcher for *app*'s configured mode.

    ``task_always_eager`` (1.x's eager mode) wins; otherwise the
    ``dispatch`` setting names an `IDispatcher` utility.
    """
    mode = 'eager' if app.conf.task_always_eager else app.z3c_setting(
        'dispatch')
    dispatcher = zope.component.queryUtility(IDispatcher, name=mode)
    if dispatcher is None:
        factory = BUILTIN_DISPATCHERS.get(mode)
        if factory is None:
            raise ValueError(
                f'Unknown dispatch mode {mode!r}; choose one of '
                f'{", ".join(sorted(BUILTIN_DISPATCHERS))}')
        dispatcher = factory()
    return dispatcher


class _Counters:
    """Process-wide figures of the sending side."""

    def __init__(self):
        self._lock = threading.Lock()
        self.sent = 0
        self.publish_failures = 0
        # Outbox: tasks left pending at commit for the relay, tasks the
        # relay published, records it moved to the dead letters.
        self.deferred = 0
        self.relayed = 0
        self.dead_letters = 0

    def add(self, name, n):
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


counters = _Counters()


class Unsent(list):
    """The messages `publish` could not send.

    ``error`` is the exception that stopped publishing; ``culprit`` the
    message being handed to the producer when it was raised (``None`` when
    the flush of a batch, i.e. the broker round trip, failed).
    """

    error = None
    culprit = None


#: Messages per broker round trip where the transport batches (kombu's
#: ``Producer.batch``: one Redis pipeline instead of one LPUSH each).
PUBLISH_CHUNK = 500


def _batch(producer):
    batch = getattr(producer, 'batch', None)   # kombu >= 5.7
    return batch(max_size=PUBLISH_CHUNK * 4) if batch is not None \
        else contextlib.nullcontext()


def _result_cls(message):
    """What ``send_task`` should make the message's result object of.

    The result ``delay()`` returned, when there is one: a result backend
    that pushes results (Redis) subscribes to the task's result when it is
    sent, until the result object is dropped.  With a result object of its
    own that ``send_task`` would make and we would drop at once, the
    subscription would end right away, and a caller waiting on the result
    of ``delay()`` would have to subscribe again.
    """
    result = message.result
    if result is None:
        return None
    return lambda task_id: result


class _Publishing(threading.local):
    active = False


_publishing = _Publishing()


@celery.signals.before_task_publish.connect(weak=False)
def _flag_publish_retries(headers=None, retry_policy=None, **kw):
    """Flag a message whose publishing kombu tries again.

    The first attempt may have reached the broker although it reported an
    error (a connection lost before the reply): the worker must then look
    for the done-marker of the second copy everywhere.  kombu calls the
    retry policy's ``errback`` before each new attempt, which prepares
    the message again from these same headers.  Only for `publish`.
    """
    if not _publishing.active or headers is None or retry_policy is None:
        return
    theirs = retry_policy.get('errback')

    def errback(exc, interval):
        headers[RESENT_HEADER] = True
        if theirs is not None:
            theirs(exc, interval)
    errback.z3c = True
    retry_policy['errback'] = errback


def _forget_errback(producer):
    # kombu also copies the retry policy into the connection's transport
    # options, which outlive this publish.
    options = getattr(getattr(producer, 'connection', None),
                      'transport_options', None)
    if options and getattr(options.get('errback'), 'z3c', False):
        del options['errback']


def publish(app, messages, producer=None, **send_options):
    """Publish *messages* through one producer; return those not sent.

    The result is an `Unsent` list (empty when all left) whose ``error``
    is the exception that stopped publishing.  *send_options* override
    the messages' own options (e.g. a retry policy).

    Messages go in chunks of `PUBLISH_CHUNK`, each flushed in one round
    trip where the transport can (Redis); a chunk counts as sent only once
    its flush succeeded, so a chunk that failed half-way is reported
    unsent although part of it may have arrived (the outbox then resends
    it under the same task ids, which the worker's done-markers make
    harmless).  Stops at the first failure: the broker is then most
    probably away and trying the remaining messages would only multiply
    the wait.
    """
    unsent = Unsent(messages)
    if not messages:
        return unsent
    sent = 0
    current = None
    _publishing.active = True
    try:
        with app.producer_or_acquire(producer) as producer:
            for start in range(0, len(messages), PUBLISH_CHUNK):
                chunk = messages[start:start + PUBLISH_CHUNK]
                with _batch(producer):
                    for message in chunk:
                        current = message
                        options = message.options
                        if send_options:
                            options = dict(options, **send_options)
                        app.send_task(
                            message.name, message.args,
                            message.message_kwargs,
                            task_id=message.task_id, producer=producer,
                            result_cls=_result_cls(message), **options)
                    current = None
                sent += len(chunk)
                for message in chunk:
                    events.notify(events.TaskSent, message)
    except Exception as error:
        unsent.error = error
        unsent.culprit = current
        log.debug('Publishing failed after %d of %d message(s)',
                  sent, len(messages), exc_info=True)
    finally:
        _publishing.active = False
        _forget_errback(producer)
    counters.add('sent', sent)
    del unsent[:sent]
    return unsent


@zope.interface.implementer(IDispatcher)
class AfterCommitDispatcher:
    """Publish right after commit; nothing is written to the ZODB.

    Guarantees: a task leaves only after its transaction committed, and
    never for an aborted one.  If the broker cannot be reached then, the
    task is lost: the failure is logged at ERROR with every task id and
    counted in ``z3c.celery.dispatch.counters.publish_failures``.
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
                ', '.join(f'{m.name}[{m.task_id}]' for m in unsent),
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
            outcome = task.apply(
                args, kwargs, task_id=message.task_id, throw=False,
                **_apply_options(message.options))
            events.notify(events.TaskSent, message)
            if message.result is not None:
                message.result.set_outcome(outcome)
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


_outbox = []


def _outbox_dispatcher():
    # Lazy (outbox imports this module) and one per process, as the
    # registered utility would be: it remembers a recent broker failure.
    if not _outbox:
        from z3c.celery.outbox import OutboxDispatcher
        _outbox.append(OutboxDispatcher())
    return _outbox[0]


BUILTIN_DISPATCHERS = {
    'outbox': _outbox_dispatcher,
    'after-commit': AfterCommitDispatcher,
    'inline': InlineDispatcher,
    'eager': EagerDispatcher,
}
