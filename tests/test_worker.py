"""A real ``celery worker`` (prefork, 2 children) over ZEO and Redis.

One worker serves the whole module (signed messages on): tasks run as the
principal who queued them and see committed data, conflicts are retried
through the broker, events fire, bad input fails visibly without stopping
the worker, forged messages are refused.
"""
import base64
import json
import re
import time
import uuid

import pytest
import transaction
import zope.component
from celery.exceptions import NotRegistered

import z3c.celery
from z3c.celery.exceptions import InvalidSignature
from z3c.celery.interfaces import ITask
from z3c.celery.signing import HEADER
from z3c.celery.worker import markers

from tests import workers


SECRET = 'a test secret of the worker tests'


@pytest.fixture(scope='module')
def site(tmp_path_factory, redis, zeo):
    return workers.write_site(
        str(tmp_path_factory.mktemp('site')), redis.url + '/0',
        zeo_address=zeo.address, config=f'signing_secret="{SECRET}"')


@pytest.fixture(scope='module')
def worker(site, zodb):
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            pool='prefork', concurrency=2)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def client(site, worker, zodb):
    """This process as a web process of the site, logged in as Alice."""
    with workers.web_process(site, zodb):
        yield


def task(name):
    return zope.component.getUtility(ITask, name)


def commit_data(db, **values):
    with db.transaction() as conn:
        conn.root()['data'].update(values)


def test_task_runs_as_queuing_principal_and_sees_committed_data(
        client, zodb, worker):
    commit_data(zodb, seen='committed before')
    mine = task('w.whoami').delay('seen')
    bobs = task('w.whoami').delay('seen', _principal_id_='zope.bob')
    transaction.commit()
    assert workers.result_of(mine, 30) == {
        'principal': 'zope.alice', 'site': 'Folder',
        'value': 'committed before'}
    assert workers.result_of(bobs, 30)['principal'] == 'zope.bob'


def test_writes_are_committed_with_principal_and_task_name(
        client, zodb, worker):
    result = task('t.record').delay('rec', 1)
    transaction.commit()
    assert workers.result_of(result, 30) == 1
    assert workers.read_data(zodb)['rec'] == (1, 'zope.alice')
    info = [i for i in zodb.undoInfo(0, 20)
            if i.get('task_id') == result.id]
    assert len(info) == 1
    assert info[0]['user_name'].endswith('zope.alice')
    assert info[0]['task_name'] == 't.record'


def test_nothing_is_sent_when_the_transaction_aborts(client, zodb, worker):
    task('t.record').delay('aborted', 1)
    transaction.abort()
    done = task('t.record').delay('after-abort', 1)
    transaction.commit()
    workers.result_of(done, 30)
    assert 'aborted' not in workers.read_data(zodb)


def test_conflict_is_retried_through_the_broker_as_the_same_principal(
        client, zodb, worker):
    result = task('w.conflict_once').delay('c1', _principal_id_='zope.bob')
    transaction.commit()
    assert workers.result_of(result, 30) == 1
    assert workers.read_data(zodb)['c1'] == ('zope.bob', 1)
    # The retry was a new message, received by the worker's main process.
    worker.wait_for_log(rf'w\.conflict_once\[{result.id}\] received',
                        count=2)
    worker.wait_for_log(
        rf'EVENT TaskRetried w\.conflict_once\[{result.id}\] '
        rf'principal=zope\.bob')


def test_a_conflict_is_retried_at_once_in_the_pool_process(
        client, zodb, worker):
    """By default a conflict runs the task again in the same process, at
    once: no second message, the same principal, the retry counted."""
    result = task('w.conflict_once_here').delay(
        'c2', _principal_id_='zope.bob')
    transaction.commit()
    assert workers.result_of(result, 30) == 1
    assert workers.read_data(zodb)['c2'] == ('zope.bob', 1)
    worker.wait_for_log(
        rf'w\.conflict_once_here\[{result.id}\] hit a conflict .*; '
        rf'attempt 2 at once, in this process')
    worker.wait_for_log(
        rf'EVENT TaskRetried w\.conflict_once_here\[{result.id}\] '
        rf'principal=zope\.bob')
    assert len(re.findall(rf'w\.conflict_once_here\[{result.id}\] '
                          rf'received', worker.log())) == 1


def test_a_task_asking_for_a_retry_is_run_again(client, zodb, worker):
    """``raise self.retry()``: the retry leaves although the run's
    transaction is aborted, and runs as the same principal."""
    result = task('w.retry_once').delay('asked', _principal_id_='zope.bob')
    transaction.commit()
    assert workers.result_of(result, 30) == 1
    assert workers.read_data(zodb)['asked'] == ('zope.bob', 1)


def test_events_fire_in_the_worker(client, worker):
    ok = task('t.record').delay('ev', 1)
    bad = task('t.fail').delay('ev-fail')
    transaction.commit()
    workers.result_of(ok, 30)
    with pytest.raises(ValueError):
        workers.result_of(bad, 30)
    for event, result in (('TaskStarted', ok), ('TaskSucceeded', ok),
                          ('TaskStarted', bad), ('TaskFailed', bad)):
        worker.wait_for_log(
            rf'EVENT {event} t\.\w+\[{result.id}\] principal=zope\.alice')


def test_conflict_storm_loses_nothing(client, zodb, worker):
    commit_data(zodb, storm=0)
    increment = task('t.increment')
    results = [increment.delay('storm') for _ in range(200)]
    transaction.commit()
    workers.wait_results(results, 120)
    assert {r.state for r in results} == {'SUCCESS'}
    assert workers.read_data(zodb)['storm'] == 200
    # It really was a storm: the children got in each other's way.
    assert 'hit a conflict' in worker.log()


def test_bad_input_fails_visibly_and_loses_nothing(client, zodb, worker):
    record = task('t.record')
    good = [record.delay(f'good{i}', i) for i in range(3)]
    unknown_principal = record.delay('ghost', 1,
                                     _principal_id_='zope.nobody')
    failing = task('t.fail').delay('failing')
    transaction.commit()
    unknown_task = z3c.celery.CELERY.send_task('no.such.task', ('x',))
    good.append(record.delay('good3', 3))
    transaction.commit()

    with pytest.raises(LookupError, match="'zope.nobody'"):
        workers.result_of(unknown_principal, 30)
    with pytest.raises(ValueError, match='task failed for failing'):
        workers.result_of(failing, 30)
    with pytest.raises(NotRegistered):
        workers.result_of(unknown_task, 30)
    assert [workers.result_of(r, 30) for r in good] == [0, 1, 2, 3]

    data = workers.read_data(zodb)
    assert {f'good{i}' for i in range(4)} <= set(data)
    assert 'ghost' not in data
    assert 'failing' not in data    # its write was aborted
    worker.wait_for_log(r"Received unregistered task of type "
                        r"'no\.such\.task'")
    assert worker.ping()


def forge(redis, name, args, kwargs, headers=None, task_id=None,
          queue='celery'):
    """Write a task message straight into Redis, as an attacker would."""
    task_id = task_id or str(uuid.uuid4())
    body = json.dumps([args, kwargs, {'callbacks': None, 'errbacks': None,
                                      'chain': None, 'chord': None}])
    message = {
        'body': base64.b64encode(body.encode()).decode(),
        'content-encoding': 'utf-8',
        'content-type': 'application/json',
        'headers': dict({
            'lang': 'py', 'task': name, 'id': task_id, 'shadow': None,
            'eta': None, 'expires': None, 'group': None,
            'group_index': None, 'retries': 0, 'timelimit': [None, None],
            'root_id': task_id, 'parent_id': None,
            'argsrepr': repr(args), 'kwargsrepr': repr(kwargs),
            'origin': 'attacker@somewhere', 'ignore_result': False},
            **(headers or {})),
        'properties': {
            'correlation_id': task_id, 'reply_to': str(uuid.uuid4()),
            'delivery_mode': 2,
            'delivery_info': {'exchange': '', 'routing_key': queue},
            'priority': 0, 'body_encoding': 'base64',
            'delivery_tag': str(uuid.uuid4())},
    }
    redis.client().lpush(queue, json.dumps(message))
    return z3c.celery.CELERY.AsyncResult(task_id)


def test_forged_messages_are_refused_and_run_nothing(
        client, redis, zodb, worker):
    unsigned = forge(redis, 't.record', ['forged1', 'pwned'],
                     {'_principal_id_': 'zope.bob'})
    wrong = forge(redis, 't.record', ['forged2', 'pwned'],
                  {'_principal_id_': 'zope.bob'},
                  headers={HEADER: 'v2:' + '0' * 64})
    with pytest.raises(InvalidSignature, match='not signed'):
        workers.result_of(unsigned, 30)
    with pytest.raises(InvalidSignature, match='does not match'):
        workers.result_of(wrong, 30)
    worker.wait_for_log(rf'Refused task t\.record\[{unsigned.id}\]')
    # A genuine message, sent by the site, still runs.
    result = task('t.record').delay('genuine', 1)
    transaction.commit()
    assert workers.result_of(result, 30) == 1
    data = workers.read_data(zodb)
    assert 'genuine' in data
    assert 'forged1' not in data and 'forged2' not in data


def test_tampered_principal_is_refused(client, redis, zodb, worker):
    """A signed message whose principal was changed does not verify."""
    from z3c.celery.signing import signature
    task_id = str(uuid.uuid4())
    genuine = signature(SECRET, 't.record', task_id, ['tamper', 1],
                        {'_principal_id_': 'zope.bob'})
    result = forge(redis, 't.record', ['tamper', 1],
                   {'_principal_id_': 'zope.alice'},
                   headers={HEADER: genuine}, task_id=task_id)
    with pytest.raises(InvalidSignature, match='does not match'):
        workers.result_of(result, 30)
    assert 'tamper' not in workers.read_data(zodb)


def test_done_marker_only_for_tasks_that_write(client, zodb, worker):
    writes = task('t.record').delay('marked', 1)
    reads = task('w.touch').delay('marked')
    transaction.commit()
    workers.result_of(writes, 30)
    workers.result_of(reads, 30)
    with zodb.transaction() as conn:
        retention = z3c.celery.CELERY.z3c_setting('done_marker_retention')
        assert markers.done_at(conn, writes.id, retention) is not None
        assert markers.done_at(conn, reads.id, retention) is None
        # This site signs its messages: a signed message may be a replay,
        # so every run marks in the shared partition (its shard).
        partitions = markers.container(conn)[markers.generation(
            time.time(), retention)]
        holders = [name for name, tree in partitions.items()
                   if writes.id in tree]
        assert holders == [markers.shard_name(writes.id)]

