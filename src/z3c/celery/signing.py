"""Signed task messages: a worker runs only what a holder of the secret sent.

With ``signing_secret`` set, every message carries an HMAC-SHA256 (header
`HEADER`) over a canonical JSON text of everything that decides what runs,
when and as whom: the task name and id, the arguments (the principal id
included), the times (``eta``, ``expires``: absolute, as the message
carries them), the retry count, the follow-ups (``callbacks``,
``errbacks``, ``chain``, ``chord``, ``group``) and the other headers in
`COVERED_HEADERS`.  The signature is computed from the message as it is
published (`sign_headers`, from Celery's ``before_task_publish``), and a
worker checks it on the message as it arrived, before Celery builds a
request from it (`verify_message`) and again before a run
(`verify`).  A message without a valid one runs nothing and fails with
`InvalidSignature`.

Whether a run is in-process (inline and eager modes: it did not travel
through a broker) is known only from `in_process`, which the in-process
dispatchers set around the run; a message cannot set it.  See
docs/worker.rst for the threat model.
"""
import base64
import datetime
import decimal
import hashlib
import hmac
import json
import logging
import pickle
import threading
import uuid

import celery.signals

from z3c.celery.exceptions import InvalidSignature
from z3c.celery.message import SIGNATURE_HEADER as HEADER


log = logging.getLogger(__name__)

_VERSION = 'v2'


def _canonical_value(value):
    if isinstance(value, (datetime.datetime, datetime.date,
                          datetime.time)):
        return {'__datetime__': value.isoformat()}
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return {f'__{type(value).__name__}__': str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {'__bytes__': base64.b64encode(value).decode('ascii')}
    if isinstance(value, (set, frozenset)):
        return {'__set__': sorted(canonical(v) for v in value)}
    return {'__pickle__': base64.b64encode(
        pickle.dumps(value, protocol=4)).decode('ascii')}


def _key_text(key):
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)   # what a JSON transport makes of it
    return canonical(key)


def _normalize(value):
    if isinstance(value, dict):
        return {_key_text(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def canonical(value):
    """*value* as a canonical JSON text.

    Tuples and lists are alike, mapping keys are text as after a JSON
    transport, and keys are sorted: what a worker receives through any
    serializer gives the same text as what was sent.
    """
    return json.dumps(_normalize(value), sort_keys=True,
                      separators=(',', ':'), ensure_ascii=True,
                      default=_canonical_value)


def _key(secret):
    return secret.encode('utf-8') if isinstance(secret, str) else secret


#: The headers a signature covers (besides ``task`` and ``id``): each
#: changes what runs, when, as whom or how often.  ``z3c_tid`` is the
#: commit token (what the worker waits to see).  Not covered: what only
#: describes a message (``argsrepr``, ``origin``), and `RESENT_HEADER`,
#: which kombu may add when it publishes again and which only makes a
#: worker look harder for a done-marker.
COVERED_HEADERS = ('shadow', 'eta', 'expires', 'group', 'group_index',
                   'retries', 'timelimit', 'root_id', 'parent_id',
                   'ignore_result', 'replaced_task_nesting', 'stamps',
                   'stamped_headers', 'z3c_tid')

#: The parts of a message body's third item (Celery's "embed") covered:
#: the tasks that run after this one.
COVERED_EMBED = ('callbacks', 'errbacks', 'chain', 'chord')


#: Fields whose zero (or false) value means what a missing one means
#: (Celery's defaults of a task request).
_ZERO_IS_UNSET = frozenset(['retries', 'replaced_task_nesting',
                            'ignore_result'])


def _unset(name, value):
    # A field that means "not set" signs like a missing one, so that a
    # message and the request Celery builds from it (with its defaults)
    # give the same text; a JSON transport makes ``(None, None)`` a list.
    if value is None or (isinstance(value, (list, tuple, dict))
                         and not any(v is not None for v in value)):
        return True
    return name in _ZERO_IS_UNSET and value == 0


def covered_fields(source):
    """The covered fields of a message, from *source*.

    *source* maps names to values: the headers and the embed of a message
    (`verify_message`, `sign_headers`) or a task request's attributes
    (`verify`).
    """
    fields = {}
    for name in COVERED_HEADERS + COVERED_EMBED:
        value = source(name)
        if not _unset(name, value):
            fields[name] = value
    return fields


def signature(secret, task_name, task_id, args, kwargs, fields=None):
    """The signature of one message (a text, ``v2:`` + hex digest).

    *fields* are its `covered_fields` (none given: none set).
    """
    payload = canonical([_VERSION, task_name, task_id, list(args or ()),
                         dict(kwargs or {}), dict(fields or {})])
    digest = hmac.new(_key(secret), payload.encode('ascii'),
                      hashlib.sha256).hexdigest()
    return f'{_VERSION}:{digest}'


# Signing: at publish time, from the message as Celery built it.

class _Signing(threading.local):
    secret = None


_signing = _Signing()


class signing_with:
    """Sign the messages this thread publishes meanwhile with *secret*.

    ``ZopeCelery.send_task`` wraps Celery's ``send_task`` in it; the
    signature itself is computed by `sign_headers` from Celery's
    ``before_task_publish`` signal, on the headers and body that go out.
    """

    def __init__(self, secret):
        self.secret = secret

    def __enter__(self):
        self.saved, _signing.secret = _signing.secret, self.secret
        return self

    def __exit__(self, *exc):
        _signing.secret = self.saved


def _body_parts(body):
    """``(args, kwargs, embed)`` of a protocol 2 body, or raise ValueError."""
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        raise ValueError('the body is not [args, kwargs, embed]')
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) \
            or not isinstance(embed, (dict, type(None))):
        raise ValueError('the body is not [args, kwargs, embed]')
    return args, kwargs, embed or {}


def message_signature(secret, headers, body):
    """The signature of a protocol 2 message (*headers*, decoded *body*)."""
    args, kwargs, embed = _body_parts(body)

    def source(name):
        if name in COVERED_EMBED:
            return embed.get(name)
        return headers.get(name)
    return signature(secret, headers.get('task'), headers.get('id'), args,
                     kwargs, covered_fields(source))


@celery.signals.before_task_publish.connect(weak=False)
def sign_headers(headers=None, body=None, **kw):
    """``before_task_publish`` receiver: sign the message going out."""
    secret = _signing.secret
    if not secret or headers is None:
        return
    headers[HEADER] = message_signature(secret, headers, body)


# Checking: in the worker's consumer, before a request is built from the
# message, and in the runner, before the task runs.


def _refuse(task_name, task_id, reason):
    error = InvalidSignature(task_name, task_id, reason)
    log.error('%s', error)
    return error


def _check(secret, task_name, task_id, received, expected_of):
    if not received:
        raise _refuse(task_name, task_id, 'the message is not signed')
    received = str(received)
    if not received.startswith(f'{_VERSION}:'):
        raise _refuse(task_name, task_id,
                      f'the signature is of an unknown version '
                      f'({received.partition(":")[0]!r}, expected '
                      f'{_VERSION!r}: messages signed before z3c.celery '
                      f'2.0 covered too little and must be sent again)')
    if not hmac.compare_digest(received, expected_of()):
        raise _refuse(task_name, task_id,
                      'the signature does not match the message')


def verify_message(secret, headers, body):
    """Raise `InvalidSignature` unless a protocol 2 message is signed.

    *headers* are the message's headers, *body* its decoded body.
    """
    headers = headers if isinstance(headers, dict) else {}
    name, task_id = headers.get('task'), headers.get('id')
    try:
        _body_parts(body)
    except ValueError as e:
        raise _refuse(name, task_id, str(e)) from None
    _check(secret, name, task_id, headers.get(HEADER),
           lambda: message_signature(secret, headers, body))


def received_signature(request):
    """The signature a task request arrived with, or ``None``."""
    value = getattr(request, HEADER, None)
    if value is None:
        headers = getattr(request, 'headers', None) or {}
        value = headers.get(HEADER)
    return value


def verify(secret, task_name, request, args, kwargs):
    """Raise `InvalidSignature` unless *request* is signed with *secret*.

    *args* and *kwargs* are the arguments as they arrived (with
    ``_principal_id_``); the other covered fields are read from the
    request, where Celery put the message's headers and embed.
    """
    task_id = request.id

    def expected():
        return signature(
            secret, task_name, task_id, args, kwargs,
            covered_fields(lambda name: getattr(request, name, None)))
    _check(secret, task_name, task_id, received_signature(request),
           expected)


# In-process runs


class _InProcess(threading.local):
    active = False


_in_process = _InProcess()


class in_process:
    """Context: the runs started meanwhile by this thread are in-process.

    The in-process dispatchers (inline, eager) run each task inside it:
    those runs did not travel through a broker, so no signature is
    checked and the runner gives them a connection of their own.  Never
    inferred from a message (Celery's ``request.is_eager`` can be set by
    a message's embed).
    """

    def __enter__(self):
        self.saved, _in_process.active = _in_process.active, True
        return self

    def __exit__(self, *exc):
        _in_process.active = self.saved


def is_in_process():
    """Whether the current run was started in-process (see `in_process`)."""
    return _in_process.active
