"""Every way a task leaves, against real workers over ZEO and Redis: each
way of tests/site/canvas.py, sent in a transaction that commits, aborts or
rolls back to a savepoint, or from inside a task that hits a conflict or
fails; for the dispatch modes after-commit and outbox, with a prefork and
a threads worker.  What ran, how often and as whom is read in the ZODB.

The inline mode's share of the matrix is in test_follow_ups.py.
"""
import time
import uuid

import celery
import celery.states
import pytest
import transaction

from z3c.celery.outbox import store

from tests import workers
from tests.site import canvas


WAYS = sorted(canvas.WAYS)
#: Settle time: how long nothing more may happen after the last run.
QUIET = 1.0


@pytest.fixture(scope='module', params=[('after-commit', 'prefork'),
                                        ('outbox', 'threads')],
                ids=lambda p: '-'.join(p))
def setup(request, tmp_path_factory, redis, zeo, zodb):
    mode, pool = request.param
    site = workers.write_site(
        str(tmp_path_factory.mktemp('site')), redis.url + '/0',
        zeo_address=zeo.address, dispatch=mode, events=False,
        config='outbox_grace_period="1" outbox_relay_interval="1"')
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            pool=pool, concurrency=2)
    worker.start()
    yield site, worker, mode
    worker.stop()


@pytest.fixture
def client(setup, zodb):
    """This process as a web process of the site, logged in as Alice."""
    site, worker, _ = setup
    with workers.web_process(site, zodb):
        yield worker


def tag(way):
    return f'{way}-{uuid.uuid4().hex[:8]}'


def runs(zodb, tags):
    data = workers.read_data(zodb)
    return {t: data[t] for t in tags if t in data}


def expect_runs(zodb, expected, principal, worker, timeout=60):
    """Each tag of *expected* ran once, as *principal*, with its value."""
    wanted = {t: (1, principal, value) for t, value in expected.items()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = runs(zodb, wanted)
        if len(seen) == len(wanted):
            break
        time.sleep(0.2)
    time.sleep(QUIET)     # a second run would show by now
    seen = runs(zodb, wanted)
    assert {t: v for t, v in seen.items() if wanted[t] != v} == {}, \
        worker.log()[-3000:]
    assert sorted(set(wanted) - set(seen)) == [], worker.log()[-3000:]


def expect_nothing(zodb, tags, worker):
    """None of *tags* ran, once a task committed after them has run."""
    sentinel = tag('sentinel')
    result = canvas.step().delay(1, sentinel)
    transaction.commit()
    workers.result_of(result, 60)
    time.sleep(QUIET + 1.0)     # countdowns and the relay included
    assert runs(zodb, tags) == {}


def test_each_way_runs_once_after_the_commit_as_its_principal(
        client, zodb):
    expected = {}
    for way in WAYS:
        expected.update(canvas.WAYS[way](tag(way)))
    transaction.commit()
    expect_runs(zodb, expected, 'zope.alice', client)
    failed = [t for t in expected if t.startswith('link_error')]
    # The failing step's own write was rolled back.
    assert runs(zodb, [t.replace('.err', '.1') for t in failed]) == {}


@pytest.mark.parametrize('end', ['abort', 'savepoint rollback'])
def test_no_way_leaves_a_transaction_that_does_not_commit(
        client, zodb, setup, end):
    savepoint = transaction.savepoint()
    expected = {}
    for way in WAYS:
        expected.update(canvas.WAYS[way](tag(way)))
    if end == 'abort':
        transaction.abort()
    else:
        savepoint.rollback()
        transaction.commit()
    if setup[2] == 'outbox':
        assert store.figures(zodb)['pending'] == 0
    expect_nothing(zodb, expected, client)


def test_results_of_a_chain_and_a_chord(client):
    step = canvas.step()
    chained = celery.chain(
        step.s(1, tag('r.chain')), step.s(tag('r.chain'))).delay()
    chorded = celery.chord(
        [step.s(1, tag('r.chord')), step.s(5, tag('r.chord'))],
        canvas.task('c.total').s(tag('r.chord'))).delay()
    transaction.commit()
    assert workers.result_of(chained, 60) == 3
    assert workers.result_of(chorded, 60) == 2 + 6


def test_each_way_inside_a_task_retried_for_a_conflict_runs_once(
        client, zodb):
    """The attempt that conflicted sent nothing; the retry sent once, as
    the task's principal (Bob, who queued it)."""
    expected, results = {}, []
    for way in WAYS:
        name = tag(way)
        results.append(canvas.task('c.send_inside').delay(
            way, name, conflicts=1, _principal_id_='zope.bob'))
        expected.update(_expected(way, name))
    transaction.commit()
    workers.wait_results(results, 120)
    assert [r.state for r in results] == [celery.states.SUCCESS] * len(WAYS)
    expect_runs(zodb, expected, 'zope.bob', client)
    assert runs(zodb, [t + '.dirty' for t in expected]) == {}


def test_no_way_leaves_a_task_that_fails(client, zodb):
    tags, results = [], []
    for way in WAYS:
        name = tag(way)
        results.append(canvas.task('c.send_inside').delay(
            way, name, fail=True))
        tags.extend(_expected(way, name))
    transaction.commit()
    workers.wait_results(results, 120)
    assert [r.state for r in results] == [celery.states.FAILURE] * len(WAYS)
    expect_nothing(zodb, tags, client)


class _Any:
    """A value not known in advance (the id of a task sent by a task)."""

    def __eq__(self, other):
        return True

    def __repr__(self):
        return 'ANY'


def _expected(way, name):
    """What *way* sends for tag *name* from inside a task, not sent here."""
    savepoint = transaction.savepoint()
    try:
        expected = canvas.WAYS[way](name)
    finally:
        savepoint.rollback()
    return {t: _Any() if t.endswith('.err') else value
            for t, value in expected.items()}
