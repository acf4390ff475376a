"""The main promises, as tests shared by the modules of each production
part (tests/test_rabbitmq.py, tests/test_relstorage.py).

A module imports the ``test_*`` functions it wants and provides the
fixtures ``site`` (a `workers.Site` whose ZCML registers `EXTRA_TASKS`),
``zodb`` (a client of the site's database, with the test site in it) and
``worker`` (a running prefork worker of the site).  Each test uses this
process as the site's web process, logged in as Alice.
"""
import contextlib

import pytest
import transaction

from tests import workers
from tests.test_worker import client  # noqa: F401 (fixture)
from tests.test_worker import commit_data
from tests.test_worker import task


#: ZCML for write_site(extra=...): tasks beyond tests/site/tasks.zcml.
EXTRA_TASKS = '''
  <celery:task name="t.fail_with_handler"
               handler="tests.tasks.fail_with_handler" />
'''


@pytest.fixture
def sender():
    """Call with a site (and its database, for the outbox): this process
    sends as Alice."""
    with contextlib.ExitStack() as stack:
        yield lambda site, db=None: stack.enter_context(
            workers.web_process(site, db))


def prefork_worker(site):
    """A fixture's body: a prefork worker (2 pool processes) of *site*."""
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            pool='prefork', concurrency=2, start_timeout=120)
    worker.start()
    yield worker
    worker.stop()


def test_tasks_run_as_the_queuing_principal(client, zodb):
    commit_data(zodb, seen='committed before')
    mine = task('w.whoami').delay('seen')
    bobs = task('w.whoami').delay('seen', _principal_id_='zope.bob')
    written = task('t.record').delay('by-bob', 3, _principal_id_='zope.bob')
    transaction.commit()
    assert workers.result_of(mine, 60) == {
        'principal': 'zope.alice', 'site': 'Folder',
        'value': 'committed before'}
    assert workers.result_of(bobs, 60)['principal'] == 'zope.bob'
    assert workers.result_of(written, 60) == 3
    assert workers.read_data(zodb)['by-bob'] == (3, 'zope.bob')


def test_an_aborted_transaction_sends_nothing(client, zodb):
    task('t.record').delay('aborted', 1)
    transaction.abort()
    # A later task on the same queue has run: the aborted one had its turn.
    last = task('t.record').delay('after-abort', 1)
    transaction.commit()
    workers.result_of(last, 60)
    data = workers.read_data(zodb)
    assert data['after-abort'] == (1, 'zope.alice')
    assert 'aborted' not in data


def test_a_savepoint_rollback_drops_the_task_queued_after_it(client, zodb):
    kept = task('t.record').delay('sp-kept', 1)
    savepoint = transaction.savepoint()
    task('t.record').delay('sp-dropped', 1)
    savepoint.rollback()
    transaction.commit()
    workers.result_of(kept, 60)
    last = task('t.record').delay('sp-last', 1)
    transaction.commit()
    workers.result_of(last, 60)
    data = workers.read_data(zodb)
    assert data['sp-kept'] == (1, 'zope.alice')
    assert 'sp-dropped' not in data


def test_a_conflict_storm_of_200_ends_at_200(client, zodb, worker):
    commit_data(zodb, storm=0)
    increment = task('t.increment')
    results = [increment.delay('storm') for _ in range(200)]
    transaction.commit()
    workers.wait_results(results, 300)
    states = [r.state for r in results]
    assert states.count('FAILURE') == 0
    assert states.count('SUCCESS') == 200
    assert workers.read_data(zodb)['storm'] == 200
    # Two pool processes on one key: there were conflicts to retry.
    worker.wait_for_log(r'hit a conflict', timeout=10)


def test_a_failing_task_runs_its_after_abort_handler(client, zodb):
    result = task('t.fail_with_handler').delay('aah')
    transaction.commit()
    with pytest.raises(Exception, match='failed: aah'):
        workers.result_of(result, 60)
    assert result.state == 'FAILURE'
    # The task's own write ('dirty') was rolled back; the handler's landed.
    assert workers.read_data(zodb)['aah'] == 'handled'


def killed_after_commit_is_applied_once(site, zodb, tmp_path,
                                        redelivery_timeout=90):
    """Kill -9 a worker between its task's commit and the message's ack;
    a second worker gets the message again and skips it (done-marker).

    Call with this process set up as a client of *site*.
    """
    flags = tmp_path / 'flags'
    flags.mkdir()
    first = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                           directory=str(tmp_path))
    with first:
        result = task('w.record_and_pause').delay('once', str(flags), 120)
        transaction.commit()
        workers.wait_for(lambda: (flags / 'once').exists(), 60,
                         message='the task committed')
        first.kill()
    assert workers.read_data(zodb)['once'] == 1
    (flags / 'once').unlink()
    second = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            directory=str(tmp_path))
    with second:
        second.wait_for_log(
            rf'w\.record_and_pause\[{result.id}\] was already done',
            timeout=redelivery_timeout)
        assert workers.result_of(result, 60) is None
    assert result.state == 'SUCCESS'
    assert workers.read_data(zodb)['once'] == 1
    assert not (flags / 'once').exists()    # it did not run again
