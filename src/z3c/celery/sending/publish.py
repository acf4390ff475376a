"""Publishing: the one way messages go to the broker.

`publish` hands messages to ``app.send_task`` in chunks through one
producer and reports what did not leave; dispatchers and the outbox relay
both use it.  `counters` are the process's figures of the sending side.
"""
import contextlib
import logging
import threading

import celery.signals
import kombu.exceptions
import zope.event

from z3c.celery import events
from z3c.celery.message import RESENT_HEADER
from z3c.celery.message import commit_token


log = logging.getLogger(__name__)

#: Publish options that give up after one immediate reconnect.  For
#: messages kept elsewhere (the outbox): waiting for the broker would only
#: slow the commit down; the relay sends them later.
FAST_FAIL = {
    'retry': True,
    'retry_policy': {'max_retries': 1, 'interval_start': 0,
                     'interval_step': 0, 'interval_max': 0},
}


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


class _Unkept:
    """What ``send_task`` returns for a message whose result nobody keeps
    (a real result object would be made and dropped at once)."""

    parent = ignored = None


_UNKEPT = _Unkept()


def _result_cls(message, placeholder):
    """What ``send_task`` should make the message's result object of.

    The result ``delay()`` returned while its caller keeps it; else, with
    *placeholder*, a placeholder (`publish` does not return results); else
    Celery's own (in a running task, Celery adds it to the task's
    children).
    """
    result = message.result
    if result is None:
        return _unkept if placeholder else None
    return lambda task_id: result


def _unkept(task_id):
    return _UNKEPT


class _Publishing(threading.local):
    active = False


_publishing = _Publishing()


def _no_subscription_at_publish(app):
    """Keep the result backend out of `publish`.

    Celery's ``send_task`` has a result backend that pushes results
    (Redis) subscribe to the task's result before the message leaves; with
    that backend away, its reconnect loop (20 tries, 1 s apart) held a
    commit up to 20 s, although the message itself is kept in the outbox.
    Messages that `publish` sends subscribe when somebody asks for their
    result instead (``AsyncResult.get()`` subscribes, then reads what was
    stored meanwhile), so publishing needs the broker only.  Installed
    once on the app's backend; other sends (not through `publish`) keep
    Celery's behaviour.
    """
    backend = app.backend
    on_task_call = getattr(backend, 'on_task_call', None)
    if on_task_call is None or getattr(on_task_call, 'z3c', False):
        return

    def on_task_call_outside_publish(producer, task_id):
        if _publishing.active:
            return None
        return on_task_call(producer, task_id)
    on_task_call_outside_publish.z3c = True
    backend.on_task_call = on_task_call_outside_publish


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


#: Argument types whose ``repr`` is what Celery's ``saferepr`` makes of
#: them (when short enough).
_PLAIN = frozenset([int, float, bool, str, type(None)])

#: Celery's limit of ``argsrepr`` and ``kwargsrepr`` (characters).
_REPR_MAX = 1024


def _plain_repr(value, items):
    """``repr(value)`` if *items* are all plain and short, else ``None``."""
    for item in items:
        kind = type(item)
        if kind not in _PLAIN or (kind is str and len(item) > 100):
            return None
    text = repr(value)
    return text if len(text) <= _REPR_MAX else None


class _Options:
    """The options `publish` hands ``send_task`` for each message.

    Two costs of Celery's per message are paid once here: kombu declares
    a message's queue before each publish (a no-op after the first, but
    one that copies the queue and its exchange each time: a sixth of the
    time of a large batch), so where routing depends on the message's
    options only (no ``task_routes``), the first message to a destination
    declares it and the others pass ``declare=()``; and Celery's
    ``saferepr`` of the arguments (for logs and monitors) is, for short
    arguments of plain types, their ``repr``, which is what it would
    make of them.
    """

    def __init__(self, app):
        self.enabled = not app.conf.task_routes
        self.seen = set()

    def options(self, message, send_options):
        options = message.options
        extra = dict(send_options) if send_options else {}
        if 'argsrepr' not in options:
            args, kwargs = message.args, message.message_kwargs
            argsrepr = _plain_repr(args, args)
            kwargsrepr = argsrepr is not None and _plain_repr(
                kwargs, [k for item in kwargs.items() for k in item])
            if kwargsrepr:
                extra['argsrepr'] = argsrepr
                extra['kwargsrepr'] = kwargsrepr
        if self.enabled and 'declare' not in options:
            destination = (message.name, options.get('queue'),
                           options.get('exchange'),
                           options.get('routing_key'))
            if destination in self.seen:
                extra['declare'] = ()
            else:
                self.seen.add(destination)
        return dict(options, **extra) if extra else options


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
    _no_subscription_at_publish(app)
    per_message = _Options(app)
    # What is the same for every message of the call, looked up once.
    constant = {'_z3c_token': commit_token(app),
                '_z3c_secret': app.z3c_setting('signing_secret')}
    notify_sent = events.listeners()(events.TaskSent)
    placeholder = app.current_worker_task is None
    _publishing.active = True
    try:
        with app.producer_or_acquire(producer) as producer:
            for start in range(0, len(messages), PUBLISH_CHUNK):
                chunk = messages[start:start + PUBLISH_CHUNK]
                with _batch(producer):
                    for message in chunk:
                        current = message
                        options = per_message.options(message, send_options)
                        app.send_task_now(
                            message.name, message.args,
                            message.message_kwargs,
                            task_id=message.task_id, producer=producer,
                            result_cls=_result_cls(message, placeholder),
                            **constant, **options)
                    current = None
                sent += len(chunk)
                if notify_sent:
                    for message in chunk:
                        zope.event.notify(events.TaskSent(message))
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


_BROKER_ERRORS = tuple(filter(None, (
    kombu.exceptions.OperationalError,
    getattr(kombu.exceptions, 'BatchPublishError', None),  # kombu >= 5.7
    OSError,
)))


def is_broker_error(app, error):
    """Is *error* the broker being unreachable (not a bad message)?"""
    if isinstance(error, _BROKER_ERRORS):
        return True
    try:
        errors = app.connection_for_write().connection_errors
    except Exception:   # pragma: no cover - broken transport
        return False
    return isinstance(error, tuple(errors))
