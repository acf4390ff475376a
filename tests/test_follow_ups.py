"""Every way a task leaves follows the transaction, in-process (inline mode
and the worker's runner on a real FileStorage): the canvas, tasks queued by
tasks, send_task, asyncio, scripts that never commit.

The same promises against a real worker are in test_canvas_worker.py.
"""
import asyncio
import gc
import logging
import threading

import celery
import pytest
import transaction
import zope.component
from celery.utils import uuid

import z3c.celery
from z3c.celery.interfaces import ITask
from z3c.celery.outbox import store
from z3c.celery.sending import queue
from z3c.celery.testing import queued_tasks

from .conftest import read_data
from tests import tasks
from tests import workers
from tests.site import canvas


TASKS = '''
  <celery:config dispatch="{mode}" broker_url="redis://127.0.0.1:1/0"
                 outbox_relay_interval="0" />
  <celery:task name="t.add" handler="tests.tasks.add" />
  <celery:task name="t.queue_add" handler="tests.tasks.queue_add" />
  <celery:task name="t.fail" handler="tests.tasks.fail" />
  <celery:task name="t.errback" handler="tests.tasks.errback" />
  <celery:task name="t.replace" handler="tests.tasks.replace_with_add"
               bind="true" />
  <celery:task name="t.conflict_add"
               handler="tests.tasks.add_after_conflicts" max_retries="3" />
'''


def task(name):
    return zope.component.getUtility(ITask, name)


@pytest.fixture
def inline(load_zcml, db, login):
    load_zcml(TASKS.format(mode='inline'))
    login('zope.alice')
    return db


@pytest.fixture
def outbox(load_zcml, db, login):
    """Dispatch mode outbox with a broker that is down: what a commit sends
    stays in the outbox, where the test reads it."""
    load_zcml(TASKS.format(mode='outbox'))
    login('zope.alice')
    return db


def added(db):
    return {key: value for key, value in read_data(db).items()
            if key.startswith('add-')}


# The canvas, queued in the caller's transaction


def test_a_chain_runs_every_step_after_the_commit(inline):
    add = task('t.add')
    celery.chain(add.s(1, 1), add.s(10), add.s(100)).delay()
    assert added(inline) == {}
    transaction.commit()
    assert added(inline) == {'add-1-1': (2, 'zope.alice'),
                             'add-2-10': (12, 'zope.alice'),
                             'add-12-100': (112, 'zope.alice')}


def test_links_run_with_the_result_and_the_principal(inline):
    add = task('t.add')
    add.apply_async((1, 2), link=[add.s(100), add.s(1000)])
    transaction.commit()
    assert added(inline) == {'add-1-2': (3, 'zope.alice'),
                             'add-3-100': (103, 'zope.alice'),
                             'add-3-1000': (1003, 'zope.alice')}


@pytest.mark.parametrize('end', ['abort', 'savepoint'])
def test_nothing_of_a_canvas_leaves_unless_its_transaction_commits(
        inline, end):
    add = task('t.add')
    savepoint = transaction.savepoint()
    celery.chain(add.s(1, 1), add.s(10)).delay()
    celery.group(add.s(2, 2), add.s(3, 3)).delay()
    add.s(4, 4).apply_async(countdown=1, link=add.s(1))
    z3c.celery.CELERY.send_task('t.add', (5, 5))
    assert len(queued_tasks()) == 5
    if end == 'abort':
        transaction.abort()
    else:
        savepoint.rollback()
        transaction.commit()
    assert added(inline) == {}


def test_a_failed_step_sends_no_follow_up_and_runs_its_errback(inline):
    add, fail = task('t.add'), task('t.fail')
    result = fail.apply_async(('k',), link=add.s(1, 1),
                              link_error=task('t.errback').s())
    transaction.commit()
    data = read_data(inline)
    assert 'add-1-1' not in data and 'k' not in data
    message, principal = data[f'errback-{result.id}']
    assert message == 'task failed for k' and principal == 'zope.alice'


def test_a_step_retried_for_a_conflict_sends_its_follow_ups_once(
        inline, caplog):
    tasks._conflicts.clear()
    task('t.conflict_add').apply_async((1, 2, 2), link=task('t.add').s(10))
    with caplog.at_level(logging.INFO, 'z3c.celery'):
        transaction.commit()
    assert caplog.text.count('hit a conflict') == 2
    assert added(inline) == {'add-1-2': (3, 'zope.alice'),
                             'add-3-10': (13, 'zope.alice')}


# Tasks queued by a running task


def test_a_task_that_queues_one_and_writes_nothing_does_not_hang(outbox):
    """Two connections of one database in one transaction would wait for
    each other's commit lock forever (the outbox's, the done-marker's)."""
    done = []

    def run():
        done.append(task('t.queue_add').apply(
            (7, 8), {'_principal_id_': 'zope.bob'}))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert done, 'the task hung in its commit'
    assert done[0].successful(), done[0].result
    [queued] = store.pending_records(outbox).values()
    assert (queued['name'], queued['args']) == ('t.add', (7, 8))
    assert queued['principal_id'] == 'zope.bob'   # the running task's


def test_tasks_queued_by_a_task_leave_with_its_commit(inline, login):
    login('zope.bob')
    task('t.queue_add').delay(3, 4)
    transaction.commit()
    assert added(inline) == {'add-3-4': (7, 'zope.bob')}


def test_a_replaced_task_commits_and_its_replacement_runs(inline):
    """Task.replace() queues the replacement and raises Ignore: the run's
    transaction must commit, not abort (or the replacement is lost)."""
    replacer = task('t.replace')
    replacer.push_request(id=uuid(), called_directly=False, is_eager=False,
                          retries=0, delivery_info={})
    try:
        with pytest.raises(celery.exceptions.Ignore):
            replacer(20, 22, _principal_id_='zope.bob')
    finally:
        replacer.pop_request()
    assert added(inline) == {'add-20-22': (42, 'zope.bob')}


# send_task


def test_send_task_in_a_transaction_is_queued_like_delay(outbox):
    app = z3c.celery.CELERY
    result = app.send_task('remote.thing', ('x',), {'y': 1}, countdown=5)
    [queued] = queued_tasks()
    assert queued.task_id == result.id
    assert (queued.name, queued.args, queued.kwargs) == (
        'remote.thing', ('x',), {'y': 1})
    assert queued.principal_id == 'zope.alice'
    assert queued.options['countdown'] == 5
    transaction.abort()
    assert store.figures(outbox)['pending'] == 0


def test_send_task_checks_its_arguments_now(outbox):
    with pytest.raises(TypeError, match="remote.thing: argument 0 cannot"):
        z3c.celery.CELERY.send_task('remote.thing', (object(),))
    assert queued_tasks() == []


def test_send_task_outside_any_zope_context_sends_at_once(
        zca, monkeypatch):
    """No interaction, no site, no database: a plain process (Flower, the
    celery command) sends at once, as Celery does."""
    sent = []
    app = z3c.celery.CELERY
    monkeypatch.setattr(app, 'send_task_now',
                        lambda name, *a, **kw: sent.append(name))
    app.send_task('remote.thing', ())
    assert sent == ['remote.thing']
    assert queued_tasks() == []


# asyncio: a transaction per coroutine


def test_coroutines_queue_in_their_own_transactions(inline, login):
    add = task('t.add')
    both_queued = asyncio.Event

    async def request(number, gate, other):
        manager = transaction.TransactionManager()
        with queue.transaction_manager(manager):
            manager.begin()
            add.delay(number, number)
            gate.set()
            await other.wait()        # the other one queues meanwhile
            assert [t.args for t in queued_tasks()] == [(number, number)]
            if number == 1:
                manager.abort()
            else:
                manager.commit()

    async def main():
        first, second = both_queued(), both_queued()
        await asyncio.gather(request(1, first, second),
                             request(2, second, first))
    asyncio.run(main())
    assert added(inline) == {'add-2-2': (4, 'zope.alice')}


# Code that never commits


def test_a_transaction_dropped_with_queued_tasks_warns(inline, caplog):
    manager = transaction.TransactionManager()
    manager.begin()
    with queue.transaction_manager(manager):
        result = task('t.add').delay(1, 1)
    del manager
    with caplog.at_level(logging.WARNING, 'z3c.celery.sending.queue'):
        gc.collect()
    [record] = [r for r in caplog.records if 'NOT sent' in r.getMessage()]
    assert f't.add[{result.id}]' in record.getMessage()


def test_an_aborted_transaction_says_what_it_dropped(inline, caplog):
    with caplog.at_level(logging.INFO, 'z3c.celery.sending.queue'):
        result = task('t.add').delay(1, 1)
        transaction.abort()
    assert f't.add[{result.id}]' in caplog.text
    assert 'dropped, not sent' in caplog.text


# The inline mode's share of the matrix of test_canvas_worker.py


@pytest.fixture
def inline_site(load_zcml, db, login, redis_db):
    """Inline mode, the test site's tasks, a Redis result backend (a
    chord needs one)."""
    load_zcml(f'''
      <celery:config dispatch="inline" broker_url="{redis_db}"
                     result_backend="{redis_db}" />
      <include file="{workers.SITE_DIR}/tasks.zcml" />''')
    login('zope.alice')
    return db


@pytest.mark.parametrize('way', sorted(canvas.WAYS))
@pytest.mark.parametrize('end', ['commit', 'abort', 'savepoint rollback'])
def test_each_way_in_inline_mode(inline_site, way, end):
    savepoint = transaction.savepoint()
    expected = canvas.WAYS[way](f'{way}-inline')
    if end == 'abort':
        transaction.abort()
    elif end == 'savepoint rollback':
        savepoint.rollback()
        transaction.commit()
    else:
        transaction.commit()
    data = read_data(inline_site)
    ran = {tag: data[tag] for tag in expected if tag in data}
    if end != 'commit':
        assert ran == {}
        return
    assert ran == {tag: (1, 'zope.alice', value)
                   for tag, value in expected.items()}


@pytest.mark.parametrize('way', sorted(canvas.WAYS))
def test_each_way_inside_a_task_retried_for_a_conflict_inline(
        inline_site, way):
    tag = f'{way}-inside'
    savepoint = transaction.savepoint()
    expected = canvas.WAYS[way](tag)
    savepoint.rollback()
    result = canvas.task('c.send_inside').delay(way, tag, conflicts=1,
                                                _principal_id_='zope.bob')
    transaction.commit()
    assert result.get() == way
    data = read_data(inline_site)
    assert {t: data.get(t, (None,))[:2] for t in expected} == {
        t: (1, 'zope.bob') for t in expected}


# Every way a follow-up could be dropped says so


def test_follow_ups_that_cannot_be_sent_are_named_in_an_error(
        inline, caplog, monkeypatch):
    """The window's commit fails (a dispatcher that cannot write, say):
    each follow-up is logged with its name and id."""
    from celery.app.task import Context

    from z3c.celery.worker import follow_ups

    class Broken:
        def before_commit(self, app, txn, messages):
            raise OSError('disk full')
    add = task('t.add')
    window = follow_ups.Window(add, Context(id='the-task'), None, 'zope.bob')
    result = add.delay(1, 2)
    monkeypatch.setattr(type(z3c.celery.CELERY), 'dispatcher',
                        lambda app: Broken())
    with caplog.at_level(logging.ERROR):
        window.close()
    assert f't.add[{result.id}]' in caplog.text
    assert 'could not be sent' in caplog.text and 'LOST' in caplog.text
    assert 't.add[the-task]' in caplog.text


def test_a_task_this_process_cannot_run_inline_is_named(inline, caplog):
    result = z3c.celery.CELERY.send_task('nowhere.registered', (1,))
    with caplog.at_level(logging.ERROR):
        transaction.commit()
    assert f'nowhere.registered[{result.id}] is not registered' in \
        caplog.text
