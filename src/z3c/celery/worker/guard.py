"""The worker's guard: what arrives from the broker is checked first.

Anyone who can write to the broker can put anything into a queue.  Celery
and kombu trust what they read there: a Redis list entry that is not JSON
stops kombu's Redis transport, a body of the wrong shape stops Celery's
request parsing (both "Unrecoverable error": the worker exits), and a
message's embed can set request flags such as ``is_eager``.  Two checks
run before any of that code sees a message:

* `GuardedChannel` (Redis): the envelope of each entry popped from a queue
  list (JSON object, properties, delivery tag, body encoding).  A bad
  entry is kept aside in the Redis list `MALFORMED_KEY` as it was.
* `MessageGuard` (a consumer bootstep) wraps the consumer's task handler:
  protocol 2 headers of the right types, a content type the worker
  accepts, a body ``[args, kwargs, embed]``, a size within
  ``message_size_limit`` and, with ``signing_secret``, a valid signature
  (`z3c.celery.signing.verify_message`).  A refused message is logged
  (task name, id, queue, size, reason), kept aside where the transport
  allows (Redis: `MALFORMED_KEY`) and rejected; a bad signature also
  records the task as failed with `InvalidSignature`, without running its
  errbacks.

In both cases the worker goes on with the next message.  See
docs/worker.rst ("Threat model").
"""
import base64
import binascii
import json
import logging

from celery import bootsteps
from celery.utils.time import maybe_iso8601

from z3c.celery import signing
from z3c.celery.exceptions import InvalidSignature


log = logging.getLogger(__name__)

#: The Redis list where refused messages are kept, newest first (each
#: entry as it was read from its queue).
MALFORMED_KEY = 'z3c.celery.malformed'

#: At most this many refused messages are kept (older ones are dropped).
MALFORMED_KEEP = 1000

#: Bytes of a refused message quoted in the log.
_QUOTE = 120


def _quote(raw):
    if isinstance(raw, str):
        raw = raw.encode('utf-8', 'replace')
    raw = raw or b''
    return repr(raw[:_QUOTE]) + ('...' if len(raw) > _QUOTE else '')


# The envelope of a Redis list entry


def envelope_problem(payload):
    """What is wrong with a decoded Redis entry for kombu, or ``None``."""
    if not isinstance(payload, dict):
        return f'not a JSON object but {type(payload).__name__}'
    properties = payload.get('properties')
    if not isinstance(properties, dict):
        return 'no "properties" object'
    tag = properties.get('delivery_tag')
    if not isinstance(tag, (str, int)) or isinstance(tag, bool):
        return 'no usable "delivery_tag"'
    if not isinstance(properties.get('delivery_info', {}), (dict,
                                                             type(None))):
        return '"delivery_info" is not an object'
    if not isinstance(payload.get('headers', {}), (dict, type(None))):
        return '"headers" is not an object'
    for name in ('content-type', 'content-encoding'):
        if not isinstance(payload.get(name), (str, type(None))):
            return f'"{name}" is not a text'
    body = payload.get('body')
    if body is not None and not isinstance(body, str):
        return '"body" is not a text'
    encoding = properties.get('body_encoding')
    if encoding not in (None, 'base64'):
        return f'unknown body encoding {encoding!r}'
    if body and encoding == 'base64':
        try:
            base64.b64decode(body.encode('ascii'), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError) as e:
            return f'the body is not base64 ({e})'
    return None


def _keep(client, raw):
    try:
        client.pipeline().lpush(MALFORMED_KEY, raw).ltrim(
            MALFORMED_KEY, 0, MALFORMED_KEEP - 1).execute()
        return True
    except Exception:
        log.warning('Could not keep a refused message aside',
                    exc_info=True)
        return False


class GuardedChannel:
    """Mixed into kombu's Redis ``Channel``: refuses bad list entries.

    The same as kombu's reads (``_brpop_read`` for the event loop,
    ``_get`` for polling), except that an entry whose envelope kombu could
    not read is logged, kept in `MALFORMED_KEY` and skipped instead of
    raising out of the transport.
    """

    def _z3c_refuse_entry(self, queue, item, problem):
        with self.conn_or_acquire() as client:
            kept = _keep(client, item)
        log.error('Refused a malformed message from queue %r (%d bytes): '
                  '%s; %s; it starts %s', queue, len(item or b''), problem,
                  f'kept in the Redis list {MALFORMED_KEY!r}' if kept
                  else 'not kept', _quote(item))

    def _z3c_decode(self, queue, item):
        try:
            payload = json.loads(item)
        except (ValueError, TypeError) as e:
            problem = f'not JSON ({e})'
        else:
            problem = envelope_problem(payload)
        if problem is None:
            return payload
        self._z3c_refuse_entry(queue, item, problem)
        return None

    def _brpop_read(self, **options):
        try:
            try:
                dest__item = self.client.parse_response(
                    self.client.connection, 'BRPOP', **options)
            except self.connection_errors:
                # As kombu: disconnect, the next round reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise self._z3c_empty()
            dest, item = dest__item
            if isinstance(dest, bytes):
                dest = dest.decode('utf-8', 'replace')
            dest = dest.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._z3c_decode(dest, item)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, '_flush_brpop_reauth', None)
            if flush is not None:
                flush()

    def _get(self, queue):
        while True:
            with self.conn_or_acquire() as client:
                for pri in self.priority_steps:
                    item = client.rpop(self._q_for_pri(queue, pri))
                    if item:
                        break
                else:
                    raise self._z3c_empty()
            payload = self._z3c_decode(queue, item)
            if payload is not None:
                return payload

    # A lost broker connection.  Celery 5.7 releases it after it collected
    # its transport, which leaves the transport without its client: kombu's
    # channel close could then not put the unacknowledged messages back
    # (AttributeError: "Unrecoverable error", the worker exits), nor could
    # a task that finishes afterwards acknowledge its message.  The close
    # gets the client back for the time it needs it (`guard_transport`
    # keeps it), so that the messages go back at once where the broker
    # can take them, as with earlier Celery versions; the others stay in
    # Redis's unacked set, which every worker restores after the
    # visibility timeout.  Both kinds are named in the log.

    def close(self):
        transport = self.connection
        if self.closed or transport is None or \
                getattr(transport, 'client', True) is not None:
            return super().close()
        qos = self.__dict__.get('_qos')
        # Named again when their tasks finish (the close forgets them).
        self._z3c_unacked = dict(qos._delivered) if qos is not None else {}
        waiting = list(self._z3c_unacked.values())
        client = getattr(transport, '_z3c_client', None)
        if client is None and qos is not None:
            qos.restore_at_shutdown = False
        transport.client = client
        try:
            super().close()
        except Exception:
            _log_unacknowledged('the broker connection was lost and its '
                                'message could not be put back', waiting)
            raise
        finally:
            transport.client = None
        if client is None:
            _log_unacknowledged('the broker connection was lost', waiting)

    def basic_ack(self, delivery_tag, multiple=False):
        if self._z3c_lost(delivery_tag, 'acknowledged'):
            return
        super().basic_ack(delivery_tag, multiple=multiple)

    def basic_reject(self, delivery_tag, requeue=False):
        if self._z3c_lost(delivery_tag, 'rejected'):
            return
        super().basic_reject(delivery_tag, requeue=requeue)

    def _z3c_lost(self, delivery_tag, what):
        # kombu cannot acknowledge on a closed channel (AttributeError).
        if not self.closed and self.connection is not None:
            return False
        qos = self.__dict__.get('_qos')
        message = qos._delivered.pop(delivery_tag, None) if qos else None
        message = self.__dict__.get('_z3c_unacked', {}).pop(
            delivery_tag, message)
        log.warning('Message %s (%s) was not %s: the broker connection it '
                    'came on was lost; the broker delivers it again (its '
                    'done-marker keeps a committed task from running twice)',
                    delivery_tag, _task_of(message), what)
        return True

    @staticmethod
    def _z3c_empty():
        from queue import Empty
        return Empty()


def _task_of(message):
    headers = getattr(message, 'headers', None) or {}
    return f'task {headers.get("task")}[{headers.get("id")}]'


def _log_unacknowledged(why, messages):
    for message in messages:
        log.warning('%s: %s; the broker delivers it again after the '
                    'visibility timeout (its done-marker keeps a committed '
                    'task from running twice)', _task_of(message), why)


_guarded_classes = {}


def guarded_channel_class(cls):
    """*cls* (a kombu Redis ``Channel`` class) with `GuardedChannel`."""
    if issubclass(cls, GuardedChannel):
        return cls
    found = _guarded_classes.get(cls)
    if found is None:
        found = _guarded_classes[cls] = type(
            f'Guarded{cls.__name__}', (GuardedChannel, cls), {})
    return found


def guard_transport(connection):
    """Guard the Redis channels of *connection* (its transport's and the
    ones already open).  Other transports are left as they are: their
    client libraries parse the frames, and a bad message body is refused
    by `MessageGuard`."""
    transport = connection.transport
    cls = getattr(transport, 'Channel', None)
    if cls is None or not hasattr(cls, '_brpop_read') or \
            not hasattr(cls, 'conn_or_acquire'):
        return False
    transport.Channel = guarded_channel_class(cls)
    # kombu drops the transport's client when the connection is collected
    # after a loss; the close of its channels still needs it.
    transport._z3c_client = connection
    for channel in list(getattr(transport, 'channels', ()) or ()):
        if not isinstance(channel, GuardedChannel) and \
                hasattr(channel, '_brpop_read'):
            channel.__class__ = guarded_channel_class(type(channel))
            handlers = getattr(channel, 'handlers', None)
            if isinstance(handlers, dict) and 'BRPOP' in handlers:
                handlers['BRPOP'] = channel._brpop_read
    return True


# The message


_TEXT = (str,)
_OPTIONAL_TEXT = (str, type(None))


def message_problem(message, size_limit):
    """What is wrong with a task *message* (kombu), or ``None``.

    Decodes the body (kombu caches it: the request uses the same).
    """
    headers = message.headers
    if not isinstance(headers, dict):
        return 'the headers are not a mapping'
    if 'task' not in headers:
        return ('unknown protocol (no "task" header: only task protocol '
                '2 is accepted)')
    for name, types in (('task', _TEXT), ('id', _TEXT),
                        ('shadow', _OPTIONAL_TEXT),
                        ('root_id', _OPTIONAL_TEXT),
                        ('parent_id', _OPTIONAL_TEXT),
                        ('group', _OPTIONAL_TEXT)):
        if not isinstance(headers.get(name), types) or \
                (types is _TEXT and not headers.get(name)):
            return f'header {name!r} is not a text: {headers.get(name)!r}'
    retries = headers.get('retries', 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or \
            retries < 0:
        return f'header "retries" is not a count: {retries!r}'
    timelimit = headers.get('timelimit')
    if timelimit is not None and not (
            isinstance(timelimit, (list, tuple)) and len(timelimit) == 2
            and all(v is None or (isinstance(v, (int, float))
                                  and not isinstance(v, bool))
                    for v in timelimit)):
        return f'header "timelimit" is not [hard, soft]: {timelimit!r}'
    for name in ('eta', 'expires'):
        value = headers.get(name)
        if value is None:
            continue
        try:
            maybe_iso8601(value)
        except (AttributeError, ValueError, TypeError) as e:
            return f'header {name!r} is not a time: {value!r} ({e})'
    body = message.body
    size = len(body or b'')
    if size_limit and size > size_limit:
        return (f'the body has {size} bytes, more than message_size_limit '
                f'({size_limit})')
    try:
        payload = message.payload
    except Exception as e:
        return (f'the body cannot be decoded as '
                f'{message.content_type!r} ({type(e).__name__}: {e})')
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        return (f'the body is not [args, kwargs, embed] but '
                f'{type(payload).__name__}')
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) \
            or not isinstance(embed, (dict, type(None))):
        return 'the body is not [args, kwargs, embed]'
    if any(not isinstance(k, str) for k in kwargs):
        return 'the keyword arguments have keys that are not texts'
    return None


class MessageGuard(bootsteps.StartStopStep):
    """Consumer bootstep: checks every task message before Celery does.

    See the module's documentation.  Started after the consumer's task
    step (the channel is open then) and on each restart of the consumer
    (a reconnect opens a new connection).
    """

    label = 'MessageGuard'
    requires = ('celery.worker.consumer.tasks:Tasks',)

    def start(self, c):
        app = c.app
        guard_transport(c.connection)
        if getattr(c, '_z3c_guarded', False):
            return
        c._z3c_guarded = True
        original = c.create_task_handler

        def create_task_handler(*args, **kw):
            return self.wrap(c, original(*args, **kw), app)
        c.create_task_handler = create_task_handler

    def wrap(self, c, handler, app):
        errors = c.connection_errors

        def on_task_received(message):
            secret, limit = app.z3c_settings('signing_secret',
                                             'message_size_limit')
            problem = message_problem(message, limit)
            if problem is not None:
                return refuse(message, problem, errors)
            if secret:
                try:
                    signing.verify_message(secret, message.headers,
                                           message.payload)
                except InvalidSignature as error:
                    return refuse(message, error.reason, errors,
                                  error=error, app=app)
            return handler(message)
        return on_task_received


def _raw_of(message):
    raw = getattr(message, '_raw', None)   # kombu's virtual transports
    if raw is None:
        return None
    try:
        return json.dumps(raw)
    except (TypeError, ValueError):
        return None


def refuse(message, reason, errors, error=None, app=None):
    """Log, keep aside, (record the failure of) and reject *message*."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    name, task_id = headers.get('task'), headers.get('id')
    info = message.delivery_info or {}
    queue = info.get('routing_key')
    kept = False
    channel = message.channel
    raw = _raw_of(message)
    if raw is not None and hasattr(channel, 'conn_or_acquire') and \
            error is None:
        with channel.conn_or_acquire() as client:
            kept = _keep(client, raw)
    log.error('Refused task %s[%s] from queue %r (%d bytes, %s, delivery '
              'tag %s): %s; nothing was run; %s', name, task_id, queue,
              len(message.body or b''), message.content_type,
              message.delivery_tag, reason,
              f'kept in the Redis list {MALFORMED_KEY!r}' if kept else
              'rejected')
    if error is not None and isinstance(task_id, str) and app is not None:
        # Visible to who waits for the result; no errbacks run (the
        # message's own, which nobody signed).
        try:
            app.backend.mark_as_failure(task_id, error,
                                        call_errbacks=False)
        except Exception:
            log.warning('Could not record the refusal of task %s[%s]',
                        name, task_id, exc_info=True)
    message.reject_log_error(log, errors, requeue=False)
