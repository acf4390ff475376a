"""Faults around a real worker: killed between commit and ack, Redis and
ZEO restarted while tasks are in flight.  Each effect is applied once."""

import contextlib
import socket
import time

import kombu
import pytest
import transaction
import zope.component
import zope.component.testing
import zope.security.management

import z3c.celery
from z3c.celery.interfaces import ITask
from z3c.celery.testing import servers
from z3c.celery.worker import guard
from z3c.celery.worker import markers

from tests import workers


#: Unacknowledged messages come back after 3 seconds; the worker looks
#: for them every second.
FAST_REDELIVERY = (
    'broker_transport_options="{\'visibility_timeout\': 3, '
    '\'unacked_restore_interval\': 1, \'unacked_restore_throttle\': 1}"')


@pytest.fixture
def zeo(tmp_path):
    with servers.ZEOServer(str(tmp_path / 'Data.fs')) as server:
        yield server


@pytest.fixture
def zodb(zeo):
    db = workers.zeo_db(zeo.address)
    workers.prepare_database(db)
    yield db
    db.close()


@pytest.fixture
def client():
    """Call with a site: this process sends as Alice."""
    with contextlib.ExitStack() as stack:
        yield lambda site: stack.enter_context(workers.web_process(site))


def task(name):
    return zope.component.getUtility(ITask, name)


def prefork_worker(tmp_path, zeo, redis, client, concurrency,
                   config=FAST_REDELIVERY):
    """A prefork worker of a site on *redis* and *zeo*; this process sends
    to it as Alice."""
    site = workers.write_site(
        str(tmp_path / 'site'), redis.url + '/0',
        zeo_address=zeo.address, config=config)
    client(site)
    return workers.Worker(site.zope_conf, broker_url=site.broker_url,
                          pool='prefork', concurrency=concurrency,
                          directory=str(tmp_path))


def marker_partitions(db, task_id):
    """The names of the done-marker partitions holding *task_id*."""
    retention = z3c.celery.CELERY.z3c_setting('done_marker_retention')
    with db.transaction() as conn:
        partitions = markers.container(conn)[markers.generation(
            time.time(), retention)]
        return [name for name, tree in partitions.items() if task_id in tree]


def test_killed_after_commit_before_ack_is_redelivered_and_applied_once(
        tmp_path, zeo, zodb, client):
    with servers.RedisServer() as redis:
        site = workers.write_site(
            str(tmp_path / 'site'), redis.url + '/0',
            zeo_address=zeo.address, config=FAST_REDELIVERY)
        client(site)
        flags = tmp_path / 'flags'
        flags.mkdir()
        first = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                               directory=str(tmp_path))
        with first:
            result = task('w.record_and_pause').delay(
                'once', str(flags), 60)
            transaction.commit()
            # The task committed and now pauses before its ack: kill.
            workers.wait_for(lambda: (flags / 'once').exists(), 30,
                             message='the task committed')
            first.kill()
        assert workers.read_data(zodb)['once'] == 1
        # A first delivery marks in the partition of its pool process
        # (and the redelivery below must look there).
        pid = int((flags / 'once').read_text())
        assert marker_partitions(zodb, result.id) == [
            f'{socket.gethostname()}:{pid}']
        (flags / 'once').unlink()

        second = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                                directory=str(tmp_path))
        with second:
            second.wait_for_log(
                rf'w\.record_and_pause\[{result.id}\] was already done',
                timeout=60)
            assert workers.result_of(result, 30) is None
        assert result.state == 'SUCCESS'
        assert workers.read_data(zodb)['once'] == 1
        assert not (flags / 'once').exists()    # it did not run again


def test_redis_and_zeo_restarted_mid_run_every_task_completes_once(
        tmp_path, zeo, zodb, client):
    with workers.PersistentRedis() as redis:
        worker = prefork_worker(tmp_path, zeo, redis, client, 2)
        with worker:
            slow = task('w.slow_increment')
            results = [slow.delay(f'r{i}', 0.1) for i in range(20)]
            transaction.commit()
            worker.wait_for_log(r'slow_increment\[.*\] succeeded', count=3)
            redis.restart()
            results += [slow.delay(f'r{i}', 0.1) for i in range(20, 30)]
            transaction.commit()
            worker.wait_for_log(r'slow_increment\[.*\] succeeded', count=22,
                                timeout=60)
            zeo.restart()
            results += [slow.delay(f'z{i}', 0.1) for i in range(20)]
            transaction.commit()
            workers.wait_results(results, 90)
            assert worker.ping()
        assert {r.state for r in results} == {'SUCCESS'}
        data = workers.read_data(zodb)
        keys = [f'r{i}' for i in range(30)] + [f'z{i}' for i in range(20)]
        assert {key: data.get(key) for key in keys} == {
            key: 1 for key in keys}


def test_task_finishing_after_the_broker_connection_was_lost_keeps_the_worker(
        tmp_path, zeo, zodb, client):
    # The task's message came on a channel that the lost connection
    # closed.  Neither closing that channel nor acknowledging the message
    # there may end the worker (Celery 5.7 with kombu's Redis transport:
    # AttributeError, "Unrecoverable error"); the message is delivered
    # again and skipped by its done-marker.
    with workers.PersistentRedis() as redis:
        worker = prefork_worker(tmp_path, zeo, redis, client, 1)
        with worker:
            result = task('w.slow_increment').delay('long', 4)
            transaction.commit()
            worker.wait_for_log(r'EVENT TaskStarted w\.slow_increment')
            redis.stop()
            worker.wait_for_log(r'Connection to broker lost', timeout=30)
            redis.start()
            worker.wait_for_log(r'slow_increment\[.*\] succeeded', timeout=30)
            assert workers.result_of(result, 60) == 1
            # Its message came back and was skipped, not run again.
            worker.wait_for_log(
                rf'slow_increment\[{result.id}\] was already done',
                timeout=30)
            assert worker.ping()
            log = worker.log()
        assert workers.read_data(zodb)['long'] == 1
        assert 'Unrecoverable error' not in log, log
        assert f'(task w.slow_increment[{result.id}]) was not acknowledged' \
            in log


def test_a_connection_lost_while_redis_stays_up_puts_messages_back_at_once(
        tmp_path, zeo, zodb, client):
    # Redis's default visibility timeout (an hour): the message comes back
    # at once only if closing the lost connection's channel put it back.
    with servers.RedisServer() as redis:
        worker = prefork_worker(tmp_path, zeo, redis, client, 1, config='')
        with worker:
            result = task('w.slow_increment').delay('blip', 3)
            transaction.commit()
            worker.wait_for_log(r'EVENT TaskStarted w\.slow_increment')
            redis.client().client_kill_filter(_type='normal')
            worker.wait_for_log(r'Connection to broker lost', timeout=30)
            worker.wait_for_log(
                rf'slow_increment\[{result.id}\] was already done',
                timeout=60)
            assert workers.result_of(result, 30) == 1
            assert worker.ping()
            log = worker.log()
        assert workers.read_data(zodb)['blip'] == 1
        assert 'Restoring 1 unacknowledged message(s)' in log
        assert 'Unrecoverable error' not in log, log


def test_a_channel_whose_transport_was_collected_puts_its_messages_back(
        redis_server, caplog):
    # What Celery 5.7 does with a lost connection, step by step: kombu's
    # collect() drops the transport's client, then the connection is
    # released, which closes its channel.  Redis is reachable here: the
    # unacknowledged message must go back into its queue at once (kombu
    # raised AttributeError), and acknowledging it afterwards must not
    # fail either.
    url = redis_server.url + '/6'
    redis_server.client(6).flushdb()
    connection = kombu.Connection(url)
    guard.guard_transport(connection)
    channel = connection.default_channel
    assert isinstance(channel, guard.GuardedChannel)
    queue = kombu.Queue('z3c-collected', channel=channel)
    queue.declare()
    kombu.Producer(channel).publish(
        {'x': 1}, routing_key='z3c-collected',
        headers={'task': 't.x', 'id': 'the-id'})
    message = queue.get(no_ack=False)
    assert message.headers['id'] == 'the-id'
    assert redis_server.client(6).llen('z3c-collected') == 0

    connection._do_close_transport()        # collect()'s last step
    connection.release()
    assert redis_server.client(6).llen('z3c-collected') == 1
    with caplog.at_level('WARNING', logger=guard.__name__):
        message.ack()
    assert '(task t.x[the-id]) was not acknowledged' in caplog.text
