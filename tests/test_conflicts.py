"""Write conflicts in a worker's run: a few attempts at once in the process,
then the broker; the limits; what is true of each attempt.

The runner runs as in a worker's pool process (a message's request, not
in-process), on a real FileStorage.  Against a real worker: test_worker.py.
"""
import celery.exceptions
import pytest
import transaction
import zope.component
import zope.event
from celery.utils import uuid

import z3c.celery
from z3c.celery import events
from z3c.celery.exceptions import ConflictRetriesExceeded
from z3c.celery.interfaces import ITask
from z3c.celery.worker import markers

from .conftest import read_data
from tests import tasks


TASKS = '''
  <celery:config dispatch="inline" {config} />
  <celery:task name="t.conflict" handler="tests.tasks.conflict_then_record"
               max_retries="{max_retries}" {task} />
  <celery:task name="t.conflict_add" handler="tests.tasks.add_after_conflicts"
               max_retries="10" />
  <celery:task name="t.add" handler="tests.tasks.add" />
  <celery:task name="t.queue_then_conflict"
               handler="tests.tasks.queue_then_conflict" />
'''


@pytest.fixture
def site(load_zcml, db, login):
    tasks._conflicts.clear()
    tasks._attempts.clear()

    def load(config='', task='', max_retries=10):
        load_zcml(TASKS.format(config=config, task=task,
                               max_retries=max_retries))
        login('zope.alice')
        return db
    return load


@pytest.fixture
def retried():
    seen = []

    def record(event):
        if isinstance(event, events.TaskRetried):
            seen.append(event)
    zope.event.subscribers.append(record)
    yield seen
    zope.event.subscribers.remove(record)


def run_in_worker(name, *args, retries=0, **headers):
    """Run task *name* as a worker's pool process does; its request."""
    task = z3c.celery.CELERY.tasks[name]
    task_id = uuid()
    task.push_request(id=task_id, called_directly=False, is_eager=False,
                      retries=retries, delivery_info={'redelivered': False},
                      headers=headers or None, **headers)
    try:
        return task(*args, _principal_id_='zope.bob'), task.request
    finally:
        task.pop_request()


class _Asked(list):
    def __init__(self):
        super().__init__()
        self.headers = []


def sent_retries(monkeypatch):
    """The broker retries the runner asks Celery for (not sent)."""
    asked = _Asked()
    headers = asked.headers

    def retry(self, countdown=None, exc=None, throw=True, **kw):
        asked.append((countdown, self.request.retries))
        headers.append(kw.get('headers'))
        return celery.exceptions.Retry(exc=exc, when=countdown)
    monkeypatch.setattr(type(z3c.celery.CELERY.tasks['t.conflict']),
                        'retry', retry)
    return asked


def test_a_few_conflicts_are_retried_at_once_in_the_process(
        site, retried, monkeypatch):
    db = site()
    assert z3c.celery.CELERY.z3c_setting('conflict_in_process') == 6
    broker = sent_retries(monkeypatch)
    result, request = run_in_worker('t.conflict', 'k', 3)
    assert read_data(db)['k'] == ('done', 3)
    assert broker == []
    assert [(e.info['attempt'], e.info['in_process'], e.principal_id)
            for e in retried] == [(2, True, 'zope.bob'), (3, True, 'zope.bob'),
                                  (4, True, 'zope.bob')]
    assert request.retries == 3


def test_then_the_task_goes_back_to_the_broker_with_a_countdown(
        site, retried, monkeypatch):
    db = site(config='conflict_in_process="3"')
    broker = sent_retries(monkeypatch)
    with pytest.raises(celery.exceptions.Retry):
        run_in_worker('t.conflict', 'k', 5)
    assert 'k' not in read_data(db)
    [(countdown, retries)] = broker
    assert countdown > 0 and retries == 3
    assert [e.info['in_process'] for e in retried] == [True] * 3 + [False]


def test_the_countdown_grows_with_the_trips_to_the_broker_only(
        site, monkeypatch):
    site(task='conflict_backoff_base="1" conflict_in_process="3"')
    broker = sent_retries(monkeypatch)
    with pytest.raises(celery.exceptions.Retry):
        run_in_worker('t.conflict', 'k', 9, z3c_broker_retries=3)
    [(countdown, retries)] = broker
    # 3 attempts in the process before: they do not make it longer.
    assert 4 <= countdown <= 8 and retries == 3
    assert broker.headers[0]['z3c_broker_retries'] == 4


def test_the_next_delivery_has_attempts_in_the_process_again(
        site, retried, monkeypatch):
    db = site()
    broker = sent_retries(monkeypatch)
    tasks._conflicts['k'] = 4       # four attempts of an earlier delivery
    run_in_worker('t.conflict', 'k', 5, retries=4)
    assert read_data(db)['k'] == ('done', 5)
    assert broker == []
    assert [e.info['attempt'] for e in retried] == [6]


def test_max_retries_bounds_all_retries(site, retried, monkeypatch):
    db = site(max_retries=2)
    broker = sent_retries(monkeypatch)
    with pytest.raises(ConflictRetriesExceeded,
                       match=r"'t.conflict' gave up after 2 retries"):
        run_in_worker('t.conflict', 'k', 5)
    assert broker == []
    assert len(retried) == 2
    assert 'k' not in read_data(db)


def test_a_task_can_go_to_the_broker_at_once(site, monkeypatch):
    site(task='conflict_in_process="0" conflict_backoff_base="7"')
    broker = sent_retries(monkeypatch)
    with pytest.raises(celery.exceptions.Retry):
        run_in_worker('t.conflict', 'k', 1)
    [(countdown, retries)] = broker
    assert 3.5 <= countdown <= 7 and retries == 0


def test_the_site_sets_the_attempts_in_the_process(site, monkeypatch):
    site(config='conflict_in_process="1"')
    broker = sent_retries(monkeypatch)
    with pytest.raises(celery.exceptions.Retry):
        run_in_worker('t.conflict', 'k', 2)
    assert [retries for _, retries in broker] == [1]


def test_an_attempt_that_conflicted_sent_nothing_and_marked_nothing(site):
    db = site()
    retention = z3c.celery.CELERY.z3c_setting('done_marker_retention')
    _, request = run_in_worker('t.queue_then_conflict', 7, 2)
    data = read_data(db)
    # The task queued t.add(7, 2) in each of its 3 attempts; the two that
    # conflicted were aborted with what they queued: it ran once.
    assert data['add-7-2'] == (9, 'zope.bob')
    assert data['queued-7'] == 3       # attempts, counted outside the ZODB
    with db.transaction() as conn:
        assert markers.done_at(conn, request.id, retention) is not None
    assert [key for key in data if key.startswith('add-')] == ['add-7-2']


def test_conflict_retries_are_configurable_in_zcml(load_zcml):
    load_zcml('''
      <celery:task name="t.x" handler="tests.tasks.noop"
                   conflict_in_process="5" conflict_backoff_base="0.5" />''')
    task = zope.component.getUtility(ITask, 't.x')
    assert (task.conflict_in_process, task.conflict_backoff_base) == (5, 0.5)
    transaction.abort()
