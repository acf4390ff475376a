"""Signed task messages: a worker runs only what a holder of the secret sent.

With ``signing_secret`` set, every message carries an HMAC-SHA256 (header
`HEADER`) over a canonical JSON text of the task name, id and arguments
(the principal id included), and a worker refuses a message without a
valid one: nothing runs, the task fails with `InvalidSignature`.  See
docs/worker.rst for what it covers and the threat model.
"""
import base64
import datetime
import decimal
import hashlib
import hmac
import json
import logging
import pickle
import uuid

from z3c.celery.exceptions import InvalidSignature
from z3c.celery.message import SIGNATURE_HEADER as HEADER


log = logging.getLogger(__name__)

_VERSION = 'v1'


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


def signature(secret, task_name, task_id, args, kwargs):
    """The signature of one message (a text, ``v1:`` + hex digest)."""
    payload = canonical([_VERSION, task_name, task_id, list(args or ()),
                         dict(kwargs or {})])
    digest = hmac.new(_key(secret), payload.encode('ascii'),
                      hashlib.sha256).hexdigest()
    return f'{_VERSION}:{digest}'


def sign_options(secret, task_name, task_id, args, kwargs, options):
    """Put the signature into the ``headers`` of *options* (a new dict)."""
    headers = dict(options.get('headers') or {})
    headers[HEADER] = signature(secret, task_name, task_id, args, kwargs)
    options['headers'] = headers
    return options


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
    ``_principal_id_``).
    """
    task_id = request.id
    received = received_signature(request)
    if not received:
        error = InvalidSignature(task_name, task_id, 'the message is not '
                                 'signed')
    else:
        expected = signature(secret, task_name, task_id, args, kwargs)
        if hmac.compare_digest(str(received), expected):
            return
        error = InvalidSignature(task_name, task_id, 'the signature does not '
                                 'match the message')
    log.error('%s', error)
    raise error
