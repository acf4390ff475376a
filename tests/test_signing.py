"""Message signing: what is signed, what breaks a signature, who signs.

The end-to-end refusal of forged messages by a real worker is in
test_worker.py; here the parts, in-process.
"""
import datetime
import decimal
import uuid

import kombu.serialization
import pytest
import transaction
import zope.component
from zope.configuration.exceptions import ConfigurationError

import z3c.celery
from z3c.celery.exceptions import InvalidSignature
from z3c.celery.interfaces import ITask
from z3c.celery.signing import HEADER
from z3c.celery.signing import message_signature
from z3c.celery.signing import signature
from z3c.celery.signing import verify
from z3c.celery.signing import verify_message


SECRET = 'sixteen chars or more'


class Request:
    """The parts of a task request the check reads."""

    def __init__(self, task_id, sig=None):
        self.id = task_id
        if sig is not None:
            setattr(self, HEADER, sig)


def roundtrip(value, serializer):
    content_type, encoding, data = kombu.serialization.dumps(
        value, serializer)
    return kombu.serialization.loads(data, content_type, encoding,
                                     accept=[content_type])


ARGS = (1, 'two', (3, 4), [5.5, None, True], {'z': 1, 'a': [2]},
        {2: 'int key', 10: 'another'})
KWARGS = {'when': datetime.datetime(2024, 1, 2, 3, 4, 5),
          'amount': decimal.Decimal('1.50'), 'uid': uuid.UUID(int=7),
          '_principal_id_': 'zope.alice'}


@pytest.mark.parametrize('serializer', ['json', 'pickle'])
def test_signature_survives_the_serializer(serializer):
    sent = signature(SECRET, 't.x', 'id-1', ARGS, KWARGS)
    args, kwargs = roundtrip((ARGS, KWARGS), serializer)
    assert signature(SECRET, 't.x', 'id-1', args, kwargs) == sent


def test_keyword_order_does_not_matter():
    assert signature(SECRET, 't', 'i', (), {'a': 1, 'b': 2}) == \
        signature(SECRET, 't', 'i', (), {'b': 2, 'a': 1})


@pytest.mark.parametrize('change', [
    dict(secret='another secret of enough length'),
    dict(task_name='t.other'),
    dict(task_id='id-2'),
    dict(args=(1, 'two')),
    dict(kwargs=dict(KWARGS, _principal_id_='zope.admin')),
    dict(kwargs={k: v for k, v in KWARGS.items()
                 if k != '_principal_id_'}),
])
def test_any_change_breaks_the_signature(change):
    original = dict(secret=SECRET, task_name='t.x', task_id='id-1',
                    args=ARGS, kwargs=KWARGS)
    changed = dict(original, **change)
    assert signature(**original) != signature(**changed)


def test_verify_accepts_a_good_signature():
    sig = signature(SECRET, 't.x', 'id-1', ARGS, KWARGS)
    verify(SECRET, 't.x', Request('id-1', sig), ARGS, KWARGS)


def test_verify_refuses_unsigned_and_forged(caplog):
    with pytest.raises(InvalidSignature) as unsigned:
        verify(SECRET, 't.x', Request('id-1'), ARGS, KWARGS)
    assert str(unsigned.value) == (
        'Refused task t.x[id-1]: the message is not signed; nothing was '
        'run (messages must be signed with the signing_secret of '
        '<celery:config>)')
    forged = signature('not the secret at all....', 't.x', 'id-1', ARGS,
                       KWARGS)
    with pytest.raises(InvalidSignature, match='does not match'):
        verify(SECRET, 't.x', Request('id-1', forged), ARGS, KWARGS)
    assert [r.levelname for r in caplog.records] == ['ERROR', 'ERROR']


def test_invalid_signature_survives_the_result_backend():
    error = InvalidSignature('t.x', 'id-1', 'the message is not signed')
    rebuilt = type(error)(*error.args)
    assert str(rebuilt) == str(error)


CONFIG = f'''
  <celery:config broker_url="memory://signing" dispatch="after-commit"
                 signing_secret="{SECRET}" />
  <celery:task name="t.record" handler="tests.tasks.record" />
'''


def sent_messages(app):
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue('celery')
        try:
            while True:
                try:
                    message = queue.get(timeout=0.2)
                except queue.Empty:
                    return
                message.ack()
                yield message
        finally:
            queue.close()


def test_sent_messages_carry_a_valid_signature(load_zcml, login):
    load_zcml(CONFIG)
    login('zope.bob')
    app = z3c.celery.CELERY
    result = zope.component.getUtility(ITask, 't.record').delay('k', 1)
    transaction.commit()
    # In a transaction send_task is queued like delay(); at once:
    other = app.send_task_now('by.name', ('x',), {'y': 1})
    [first, second] = list(sent_messages(app))
    args, kwargs, _ = first.decode()
    assert kwargs['_principal_id_'] == 'zope.bob'
    assert first.headers['id'] == result.id
    verify_message(SECRET, first.headers, first.decode())
    assert second.headers['id'] == other.id
    verify_message(SECRET, second.headers, second.decode())


def message_parts(**headers):
    body = [[1, 'two'], {'_principal_id_': 'zope.alice'},
            {'callbacks': None, 'errbacks': None, 'chain': None,
             'chord': None}]
    return dict({'task': 't.x', 'id': 'id-1', 'eta': None,
                 'expires': None, 'retries': 0, 'group': None,
                 'timelimit': [None, None], 'root_id': 'id-1',
                 'parent_id': None, 'ignore_result': False}, **headers), body


CALLBACK = {'task': 't.other', 'args': ['x'], 'kwargs': {},
            'options': {}, 'subtask_type': None, 'immutable': True}


@pytest.mark.parametrize('change', [
    ('header', 'eta', '2030-01-01T00:00:00+00:00'),
    ('header', 'expires', '2030-01-01T00:00:00+00:00'),
    ('header', 'retries', 3),
    ('header', 'group', 'a-group'),
    ('header', 'timelimit', [1, None]),
    ('header', 'id', 'id-2'),
    ('header', 'task', 't.other'),
    ('header', 'root_id', 'id-0'),
    ('header', 'shadow', 'harmless.looking'),
    ('embed', 'callbacks', [CALLBACK]),
    ('embed', 'errbacks', [CALLBACK]),
    ('embed', 'chain', [CALLBACK]),
    ('embed', 'chord', CALLBACK),
    ('args', None, [1, 'three']),
    ('kwargs', None, {'_principal_id_': 'zope.admin'}),
])
def test_a_signed_message_changed_in_any_covered_part_is_refused(change):
    headers, body = message_parts()
    headers[HEADER] = message_signature(SECRET, headers, body)
    verify_message(SECRET, headers, body)
    where, name, value = change
    if where == 'header':
        headers[name] = value
    elif where == 'embed':
        body[2][name] = value
    else:
        body[0 if where == 'args' else 1] = value
    with pytest.raises(InvalidSignature, match='does not match'):
        verify_message(SECRET, headers, body)


def test_unset_fields_sign_as_missing_ones():
    """Celery's request defaults (retries 0, no time limit) and a
    message without those headers give one signature."""
    headers, body = message_parts()
    bare = {'task': 't.x', 'id': 'id-1', 'root_id': 'id-1'}
    assert message_signature(SECRET, headers, body) == \
        message_signature(SECRET, bare, body)


def test_a_v1_signature_is_refused():
    headers, body = message_parts()
    headers[HEADER] = 'v1:' + signature(SECRET, 't.x', 'id-1', body[0],
                                         body[1]).partition(':')[2]
    with pytest.raises(InvalidSignature, match='unknown version'):
        verify_message(SECRET, headers, body)


def test_is_eager_from_a_message_does_not_make_a_run_in_process(
        load_zcml, db, login):
    """Only how a run started says it is in-process: a request that
    claims ``is_eager`` (as a message's embed can) is still checked."""
    from z3c.celery import signing
    from z3c.celery.worker import runner
    load_zcml(CONFIG)
    task = z3c.celery.CELERY.tasks['t.record']
    task.push_request(id='id-9', is_eager=True, called_directly=False)
    try:
        assert not signing.is_in_process()
        with pytest.raises(InvalidSignature, match='not signed'):
            runner.run(task, ('k', 1), {'_principal_id_': 'zope.bob'})
    finally:
        task.pop_request()
    with signing.in_process():
        assert signing.is_in_process()
    assert not signing.is_in_process()


def test_no_secret_no_signature(load_zcml, login):
    load_zcml(CONFIG.replace(f'signing_secret="{SECRET}"', ''))
    login('zope.bob')
    zope.component.getUtility(ITask, 't.record').delay('k', 1)
    transaction.commit()
    [message] = list(sent_messages(z3c.celery.CELERY))
    assert HEADER not in message.headers


def test_in_process_modes_are_not_checked(load_zcml, db, login):
    """Inline runs never travelled through a broker: nothing to verify."""
    load_zcml(CONFIG.replace('after-commit', 'inline'))
    login('zope.alice')
    result = zope.component.getUtility(ITask, 't.record').delay('k', 1)
    transaction.commit()
    assert result.get() == 1


def test_a_short_secret_is_a_configuration_error(load_zcml):
    with pytest.raises(ConfigurationError, match='signing_secret'):
        load_zcml('<celery:config signing_secret="short" />')
