"""The main promises with RabbitMQ as the broker (ZEO database, results in
Redis): a prefork worker on the machine's RabbitMQ, a worker killed between
commit and ack (RabbitMQ requeues the unacknowledged message when the
connection drops), and a broker outage on a RabbitMQ of our own with the
outbox delivering every task once."""
import time

import pytest
import transaction

from z3c.celery.outbox import store
from z3c.celery.testing import servers

from tests import promises
from tests import workers
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
from tests.services import delete_queues
from tests.services import machine_rabbitmq  # noqa: F401 (fixture)
from tests.services import own_queue
from tests.services import own_rabbitmq  # noqa: F401 (fixture)


pytestmark = pytest.mark.rabbitmq


def rabbit_site(directory, broker_url, result_backend, zeo_address, **kw):
    """A site on *broker_url* consuming a queue of its own."""
    queue = own_queue()
    config = f'task_default_queue="{queue}" ' + kw.pop('config', '')
    site = workers.write_site(
        directory, broker_url, result_backend=result_backend,
        zeo_address=zeo_address, extra=promises.EXTRA_TASKS, config=config,
        **kw)
    site.queue = queue
    return site


@pytest.fixture(scope='module')
def site(tmp_path_factory, machine_rabbitmq, redis, zeo):
    site = rabbit_site(str(tmp_path_factory.mktemp('site')),
                       machine_rabbitmq, redis.url + '/0', zeo.address)
    yield site
    delete_queues(machine_rabbitmq, [site.queue])


@pytest.fixture(scope='module')
def worker(site, zodb):
    yield from promises.prefork_worker(site)


def test_the_worker_consumes_from_rabbitmq(site, worker):
    assert 'transport:   amqp://guest:**@127.0.0.1:' in worker.log()
    assert site.queue in worker.log()


def test_killed_between_commit_and_ack_is_redelivered_and_applied_once(
        tmp_path, machine_rabbitmq, redis, zeo, zodb, sender):
    """RabbitMQ's own acks: no visibility timeout, the message comes back
    as soon as the killed worker's connection is gone."""
    site = rabbit_site(str(tmp_path / 'site'), machine_rabbitmq,
                       redis.url + '/1', zeo.address)
    try:
        sender(site)
        started = time.monotonic()
        promises.killed_after_commit_is_applied_once(site, zodb, tmp_path)
        # Far below Redis's visibility timeout (an hour by default).
        assert time.monotonic() - started < 200
    finally:
        delete_queues(machine_rabbitmq, [site.queue])


@pytest.fixture
def own_zodb(tmp_path):
    """A ZEO database of this test alone (no other worker relays its
    outbox)."""
    with servers.ZEOServer(str(tmp_path / 'Data.fs')) as zeo:
        db = workers.zeo_db(zeo.address)
        workers.prepare_database(db)
        try:
            yield zeo, db
        finally:
            db.close()


def test_broker_outage_the_outbox_delivers_every_task_once(
        tmp_path, own_rabbitmq, redis, own_zodb, sender):
    zeo, zodb = own_zodb
    site = rabbit_site(str(tmp_path / 'site'), own_rabbitmq.url,
                       redis.url + '/2', zeo.address, dispatch='outbox',
                       config='outbox_relay_interval="1"')
    sender(site, zodb)
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            pool='prefork', concurrency=2,
                            directory=str(tmp_path), start_timeout=120)
    with worker:
        before = task('t.record').delay('up', 1)
        transaction.commit()
        assert workers.result_of(before, 60) == 1

        # A task still running when the broker goes: its ack cannot be
        # sent, RabbitMQ requeues its message, the done-marker skips it.
        inflight = task('w.slow_increment').delay('inflight', 4)
        transaction.commit()
        worker.wait_for_log(rf'TaskStarted w\.slow_increment\[{inflight.id}')
        own_rabbitmq.stop()
        results = []
        for i in range(10):
            results.append(task('t.increment').delay(f'out{i}'))
            started = time.monotonic()
            transaction.commit()     # the broker is down: still commits
            assert time.monotonic() - started < 30
        assert store.figures(zodb)['pending'] >= 10
        data = workers.read_data(zodb)
        assert not any(f'out{i}' in data for i in range(10))

        own_rabbitmq.start()
        workers.wait_for(
            lambda: all(workers.read_data(zodb).get(f'out{i}')
                        for i in range(10)),
            180, interval=0.5, message='the outbox delivered')
        workers.wait_for(lambda: store.figures(zodb)['pending'] == 0, 60,
                         interval=0.5, message='the outbox emptied')
        # One more task after everything: any second copy had its turn.
        last = task('t.record').delay('last', 1)
        transaction.commit()
        assert workers.result_of(last, 90) == 1
        assert worker.ping()
    data = workers.read_data(zodb)
    assert {f'out{i}': data[f'out{i}'] for i in range(10)} == {
        f'out{i}': 1 for i in range(10)}
    assert data['inflight'] == 1
    assert workers.result_of(inflight, 30) == 1
