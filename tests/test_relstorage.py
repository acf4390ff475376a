"""The main promises on RelStorage (PostgreSQL), Redis as the broker: a
prefork worker, a conflict storm, RelStorage's lock errors going through
the conflict policy by their type, a worker killed between commit and ack,
and prefork workers starting together on an empty database.

Each module run creates its own database ``z3c_test_<random>`` on the
machine's PostgreSQL (see tests/services.py) and drops it at the end.
"""
import os
import subprocess
import sys

import pytest
import transaction
from BTrees.OOBTree import OOBTree

from z3c.celery.exceptions import CONFLICT_ERRORS
from z3c.celery.worker.components import BackoffConflictPolicy

from tests import promises
from tests import workers
from tests.conftest import ROOT
from tests.promises import client  # noqa: F401 (fixture)
from tests.promises import sender  # noqa: F401 (fixture)
from tests.promises import task
from tests.promises import test_a_conflict_storm_of_200_ends_at_200  # noqa
from tests.promises import \
    test_a_failing_task_runs_its_after_abort_handler  # noqa
from tests.promises import \
    test_a_savepoint_rollback_drops_the_task_queued_after_it  # noqa
from tests.promises import test_an_aborted_transaction_sends_nothing  # noqa
from tests.promises import test_tasks_run_as_the_queuing_principal  # noqa
from tests.services import database_exists
from tests.services import new_database
from tests.services import postgres_admin_dsn  # noqa: F401 (fixture)


pytestmark = pytest.mark.relstorage

LOCK_ERRORS = (
    'UnableToLockRowsToModifyError',
    'UnableToLockRowsToReadCurrentError',
    'UnableToLockRowsDeadlockError',
    'UnableToLockRowsToModifyDeadlockError',
    'UnableToLockRowsToReadCurrentDeadlockError',
    'UnableToAcquireCommitLockError',
)

EXTRA = promises.EXTRA_TASKS + '''
  <celery:task name="r.lock_error_once"
               handler="tests.relstorage_tasks.lock_error_once"
               bind="true" />
'''

#: Unacknowledged messages come back after 3 seconds (Redis).
FAST_REDELIVERY = (
    'broker_transport_options="{\'visibility_timeout\': 3, '
    '\'unacked_restore_interval\': 1, \'unacked_restore_throttle\': 1}"')


@pytest.fixture(scope='module')
def dsn(postgres_admin_dsn):
    with new_database(postgres_admin_dsn) as dsn:
        yield dsn
    assert not database_exists(postgres_admin_dsn, dsn.split('dbname=')[1])


@pytest.fixture(scope='module')
def zodb(dsn):
    db = workers.relstorage_db(dsn)
    workers.prepare_database(db)
    yield db
    db.close()


@pytest.fixture(scope='module')
def site(tmp_path_factory, redis, dsn):
    return workers.write_site(
        str(tmp_path_factory.mktemp('site')), redis.url + '/0',
        relstorage_dsn=dsn, extra=EXTRA)


@pytest.fixture(scope='module')
def worker(site, zodb):
    yield from promises.prefork_worker(site)


@pytest.mark.parametrize('kind', LOCK_ERRORS)
def test_relstorage_lock_errors_are_conflicts_by_type(kind):
    from relstorage.adapters import interfaces
    error = getattr(interfaces, kind)('simulated')
    assert isinstance(error, CONFLICT_ERRORS)
    assert BackoffConflictPolicy().is_conflict(error)


def test_other_relstorage_errors_are_not_conflicts():
    from relstorage.adapters import interfaces
    policy = BackoffConflictPolicy()
    assert not policy.is_conflict(
        interfaces.UnableToAcquirePackUndoLockError('pack'))
    assert not policy.is_conflict(interfaces.StorageError('broken'))


@pytest.mark.parametrize('kind', LOCK_ERRORS[::3])
def test_a_lock_error_in_the_worker_is_retried_as_the_same_principal(
        client, zodb, worker, kind):
    result = task('r.lock_error_once').delay(
        f'lock-{kind}', kind, _principal_id_='zope.bob')
    transaction.commit()
    assert workers.result_of(result, 90) == 1
    data = workers.read_data(zodb)
    assert data[f'lock-{kind}'] == ('zope.bob', 1)
    assert f'lock-{kind}-dirty' not in data
    worker.wait_for_log(
        rf'r\.lock_error_once\[{result.id}\] hit a conflict \(simulated '
        rf'{kind}')
    worker.wait_for_log(
        rf'EVENT TaskRetried r\.lock_error_once\[{result.id}\] '
        rf'principal=zope\.bob')


def test_the_worker_runs_on_relstorage(site, worker, zodb):
    with open(site.zope_conf) as f:
        assert '<relstorage>' in f.read()
    assert type(zodb.storage).__name__ == 'RelStorage'


def test_killed_between_commit_and_ack_is_redelivered_and_applied_once(
        tmp_path, redis, dsn, zodb, sender):
    site = workers.write_site(
        str(tmp_path / 'site'), redis.url + '/1', relstorage_dsn=dsn,
        config=FAST_REDELIVERY)
    sender(site)
    promises.killed_after_commit_is_applied_once(site, zodb, tmp_path)


def test_prefork_workers_start_together_on_an_empty_database(
        tmp_path, redis, postgres_admin_dsn, sender):
    """No schema, no root: two prefork workers (2 pool processes and an
    outbox relay each) start at once; one process creates the schema and
    the root, the others wait, none exits, and tasks run."""
    with new_database(postgres_admin_dsn) as empty:
        site = workers.write_site(
            str(tmp_path / 'site'), redis.url + '/3', relstorage_dsn=empty,
            dispatch='outbox')
        started = [workers.Worker(site.zope_conf, broker_url=site.broker_url,
                                  pool='prefork', concurrency=2,
                                  directory=str(tmp_path / f'w{i}'),
                                  start_timeout=120)
                   for i in range(2)]
        for worker in started:
            os.makedirs(worker.directory)
        try:
            for worker in started:
                worker.start(wait=False)
            for worker in started:
                worker.wait_ready()
            for worker in started:
                assert len(worker.pool_pids()) == 2
            # Only now does this process open the database (for the
            # outbox): the workers made it alone.
            db = workers.relstorage_db(empty)
            try:
                with db.transaction() as conn:
                    root = conn.root()
                    assert type(root['Application']).__name__ == 'Folder'
                    root['data'] = OOBTree()
                sender(site, db)
                results = [task('t.record').delay(f'e{i}', i)
                           for i in range(8)]
                transaction.commit()
                workers.wait_results(results, 120)
                assert [r.state for r in results] == ['SUCCESS'] * 8
                assert workers.read_data(db) == {
                    f'e{i}': (i, 'zope.alice') for i in range(8)}
            finally:
                transaction.abort()
                db.close()
            for worker in started:
                assert worker.running()
                log = worker.log()
                assert 'Traceback' not in log, log
                assert 'exited' not in log, log
                assert len(worker.pool_pids()) == 2
        finally:
            for worker in started:
                worker.stop()


@pytest.mark.rabbitmq
def test_the_main_job_keeps_every_promise_on_rabbitmq_and_relstorage(
        tmp_path, postgres_admin_dsn):
    from tests.services import check_rabbitmq
    from tests.services import missing
    from tests.services import rabbitmq_url
    url = rabbitmq_url()
    problem = check_rabbitmq(url)
    if problem:
        missing(f'RabbitMQ at {url}: {problem}')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('EXAMPLE_')}
    with new_database(postgres_admin_dsn) as dsn:
        process = subprocess.run(
            [sys.executable, os.path.join(ROOT, 'examples', 'main_job.py'),
             '--quick', '--broker', url, '--relstorage-dsn', dsn,
             '--work-dir', str(tmp_path), '--timeout', '90'],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    assert 'Every promise kept.' in output
    assert 'RelStorage' in output and 'amqp://' in output
