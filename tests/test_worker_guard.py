"""A real worker (prefork, ZEO, Redis, signing on) against what an attacker
writes into its queue: forged and tampered messages (issue 15, part 1) and
malformed ones (part 5).  Each is refused visibly, runs nothing, and the
worker goes on: a genuine task runs afterwards.
"""
import base64
import datetime
import json
import uuid

import pytest
import transaction

import z3c.celery
from z3c.celery.exceptions import InvalidSignature
from z3c.celery.signing import HEADER

from tests import workers
# The site, its worker (prefork, signing on) and this process as a web
# process of it: the same as the worker tests', one of each per module.
from tests.test_worker import client  # noqa: F401 (fixture)
from tests.test_worker import site  # noqa: F401 (fixture)
from tests.test_worker import task
from tests.test_worker import worker  # noqa: F401 (fixture)


#: Where the worker keeps refused messages (z3c.celery.worker.guard).
MALFORMED_KEY = 'z3c.celery.malformed'


def push(redis, envelope, queue='celery'):
    raw = envelope if isinstance(envelope, (bytes, str)) else \
        json.dumps(envelope)
    redis.client().lpush(queue, raw)


def envelope_of(args, kwargs, headers, embed=None, task_id=None):
    """A protocol 2 message as kombu's Redis transport stores it."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps([args, kwargs, dict(
        {'callbacks': None, 'errbacks': None, 'chain': None,
         'chord': None}, **(embed or {}))])
    return {
        'body': base64.b64encode(body.encode()).decode(),
        'content-encoding': 'utf-8',
        'content-type': 'application/json',
        'headers': dict({
            'lang': 'py', 'task': 't.record', 'id': task_id,
            'shadow': None, 'eta': None, 'expires': None, 'group': None,
            'group_index': None, 'retries': 0, 'timelimit': [None, None],
            'root_id': task_id, 'parent_id': None, 'argsrepr': '',
            'kwargsrepr': '', 'origin': 'attacker@somewhere',
            'ignore_result': False}, **headers),
        'properties': {
            'correlation_id': task_id, 'reply_to': str(uuid.uuid4()),
            'delivery_mode': 2,
            'delivery_info': {'exchange': '', 'routing_key': 'celery'},
            'priority': 0, 'body_encoding': 'base64',
            'delivery_tag': str(uuid.uuid4())},
    }


def capture(redis, key, **options):
    """A genuine signed message of ``t.record(key, 1)``, as sent by the
    site, taken from a queue no worker reads (what an eavesdropper on the
    broker has)."""
    queue = f'captured-{uuid.uuid4().hex[:8]}'
    task('t.record').apply_async((key, 1), queue=queue, **options)
    transaction.commit()
    raw = workers.wait_for(lambda: redis.client().rpop(queue), 10,
                           message='captured message')
    envelope = json.loads(raw)
    body = json.loads(base64.b64decode(envelope['body']))
    assert envelope['headers'][HEADER]
    return envelope, body


def repack(envelope, body=None, **headers):
    envelope = json.loads(json.dumps(envelope))
    if body is not None:
        envelope['body'] = base64.b64encode(
            json.dumps(body).encode()).decode()
    envelope['headers'].update(headers)
    envelope['properties']['delivery_info']['routing_key'] = 'celery'
    envelope['properties']['delivery_tag'] = str(uuid.uuid4())
    return envelope


def refused(worker, result, reason):
    with pytest.raises(InvalidSignature, match=reason):
        workers.result_of(result, 30)
    worker.wait_for_log(
        rf'Refused task t\.record\[{result.id}\].*{reason}')


def genuine_task_runs(zodb, key):
    result = task('t.record').delay(key, 1)
    transaction.commit()
    assert workers.result_of(result, 30) == 1
    assert key in workers.read_data(zodb)


def later(seconds):
    return (datetime.datetime.now(datetime.timezone.utc)
            + datetime.timedelta(seconds=seconds)).isoformat()


def test_forged_and_tampered_messages_run_nothing(
        client, redis, zodb, worker):
    app = z3c.celery.CELERY
    results = {}
    # Unsigned.
    env = envelope_of(['f-unsigned', 1], {'_principal_id_': 'zope.bob'}, {})
    push(redis, env)
    results['f-unsigned'] = (env['headers']['id'], 'not signed')
    # Unsigned, claiming to be an in-process run.
    env = envelope_of(['f-eager', 1], {'_principal_id_': 'zope.bob'}, {},
                      embed={'is_eager': True})
    push(redis, env)
    results['f-eager'] = (env['headers']['id'], 'not signed')
    # Signed by the site, arguments changed.
    env, body = capture(redis, 'c-args')
    body[0] = ['f-args', 1]
    push(redis, repack(env, body))
    results['f-args'] = (env['headers']['id'], 'does not match')
    # Signed, a callback added (it would be sent, and signed, by the
    # worker), or an errback (the refusal must not call it either).
    for part in ('callbacks', 'errbacks'):
        env, body = capture(redis, f'c-{part}')
        body[2][part] = [dict(task('t.record').s(f'f-{part}', 1),
                              kwargs={'_principal_id_': 'zope.bob'})]
        push(redis, repack(env, body))
        results[f'c-{part}'] = (env['headers']['id'], 'does not match')
    # Signed for in an hour: made due now.
    env, body = capture(redis, 'c-eta', countdown=3600)
    push(redis, repack(env, eta=None))
    results['c-eta'] = (env['headers']['id'], 'does not match')
    # Signed to expire soon: made to live longer.
    env, body = capture(redis, 'c-expires', expires=3600)
    push(redis, repack(env, expires=later(7200)))
    results['c-expires'] = (env['headers']['id'], 'does not match')
    # Replayed under a new id.
    env, body = capture(redis, 'c-replay')
    new_id = str(uuid.uuid4())
    push(redis, repack(env, id=new_id, root_id=new_id))
    results['c-replay'] = (new_id, 'does not match')

    for key, (task_id, reason) in results.items():
        refused(worker, app.AsyncResult(task_id), reason)
    genuine_task_runs(zodb, 'after-forgeries')
    data = workers.read_data(zodb)
    assert not [key for key in data if key.startswith(('f-', 'c-'))]
    assert worker.ping()


def test_a_genuine_message_with_times_and_callbacks_runs(
        client, zodb, worker):
    """What the signature covers still verifies after the trip: times
    made absolute by Celery, a callback in the body.  (Whether the worker
    then sends the callback is issue 14's.)"""
    result = task('t.record').apply_async(
        ('g-timed', 1), countdown=1, expires=3600,
        link=task('t.record').si('g-linked', 2))
    transaction.commit()
    assert workers.result_of(result, 30) == 1
    assert 'g-timed' in workers.read_data(zodb)


def malformed_messages():
    good = envelope_of(['m-good-shape', 1], {}, {})
    body_b64 = good['body']

    def variant(**changes):
        env = json.loads(json.dumps(good))
        env['headers']['id'] = str(uuid.uuid4())
        env['properties']['delivery_tag'] = str(uuid.uuid4())
        for key, value in changes.items():
            if key == 'headers' and value is None:
                del env['headers']
            elif key == 'headers':
                env['headers'].update(value)
            elif key == 'drop_headers':
                for name in value:
                    env['headers'].pop(name, None)
            elif key == 'body_json':
                env['body'] = base64.b64encode(
                    json.dumps(value).encode()).decode()
            else:
                env[key] = value
        return env

    raw = json.dumps(good)
    return {
        'garbage bytes': b'\x00\xff\xfe garbage \x81 not json',
        'json, not an object': json.dumps('just a string'),
        'no properties': json.dumps({'body': body_b64, 'headers': {}}),
        'body not base64': variant(body='%%% not base64 %%%'),
        'body a json string': variant(body_json='a string'),
        'body a short list': variant(body_json=[['m-short', 1], {}]),
        'wrong content type': variant(**{'content-type':
                                         'application/x-nonsense'}),
        'pickle not accepted': variant(**{'content-type':
                                          'application/x-python-serialize'}),
        'no headers': variant(headers=None, drop_headers=()),
        'task header a list': variant(headers={'task': ['t.record']}),
        'id header a number': variant(headers={'id': 17}),
        'unknown protocol': variant(drop_headers=('task', 'id')),
        'eta not a time': variant(headers={'eta': 'next tuesday'}),
        'timelimit nonsense': variant(headers={'timelimit': 'forever'}),
        'truncated envelope': raw[:len(raw) // 2],
        'truncated body': variant(body=body_b64[:len(body_b64) // 2]),
        '10 MB': variant(body_json=[['m-huge', 'x' * (10 * 1024 * 1024)],
                                    {}, {}]),
    }


def test_malformed_messages_are_refused_and_kept(
        client, redis, zodb, worker):
    before = redis.client().llen(MALFORMED_KEY)
    kinds = malformed_messages()
    for kind, message in kinds.items():
        push(redis, message)
    # After all of them, a genuine task still runs in the same worker.
    genuine_task_runs(zodb, 'after-poison')
    assert worker.ping()
    log = worker.log()
    assert 'Unrecoverable error' not in log
    assert log.count('Refused') >= len(kinds)
    # Each is kept for inspection (as it was read).
    kept = redis.client().llen(MALFORMED_KEY) - before
    assert kept == len(kinds)
    data = workers.read_data(zodb)
    assert not [key for key in data if key.startswith('m-')]
