"""The relay bootstep in a real ``celery worker`` (prefork, over ZEO).

The committing process cannot reach the broker; its tasks stay in the
outbox.  The worker's relay (in the worker's main process, with a database
connection of its own: prefork children have theirs) publishes them and
the worker runs them, once each, as the principal who queued them.
"""
import os

import pytest
import transaction
import zope.component
from zope.configuration import xmlconfig

from z3c.celery import database
from z3c.celery.interfaces import ITask
from z3c.celery.outbox import store
from z3c.celery.testing import servers

from .conftest import SITE_ZCML
from tests import workers


@pytest.fixture(scope='module')
def worker(tmp_path_factory, redis, zeo, zodb):
    site = workers.write_site(
        str(tmp_path_factory.mktemp('site')), redis.url + '/0',
        zeo_address=zeo.address, dispatch='outbox',
        config='outbox_relay_interval="0.3" outbox_grace_period="0.5"')
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            pool='prefork', concurrency=1)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def web(zca, zodb, login):
    """This process as a web process whose broker is unreachable."""
    down = f'redis://127.0.0.1:{servers.free_port()}/0'
    tasks_zcml = os.path.join(workers.SITE_DIR, 'tasks.zcml')
    xmlconfig.string(SITE_ZCML.format(body=f'''
      <celery:config broker_url="{down}" dispatch="outbox" />
      <include file="{tasks_zcml}" />'''))
    database.set_database(zodb)
    login('zope.alice')
    yield zodb
    database.set_database(None)


def test_worker_relay_delivers_what_the_web_process_could_not_send(
        worker, web):
    zodb = web
    conn = zodb.open()
    conn.root()['data']['before'] = 'committed'
    record = zope.component.getUtility(ITask, 't.record')
    increment = zope.component.getUtility(ITask, 't.increment')
    ids = [record.delay(f'relayed-{n}', n).id for n in range(3)]
    ids.append(increment.delay('relayed-count').id)
    transaction.commit()
    conn.close()
    pending = store.pending_records(zodb)
    assert sorted(pending) == sorted(ids)       # the broker was away

    def done():
        data = workers.read_data(zodb)
        return all(f'relayed-{n}' in data for n in range(3)) and \
            'relayed-count' in data and data
    data = workers.wait_for(done, 30, message='relayed tasks ran')
    assert [data[f'relayed-{n}'] for n in range(3)] == [
        (0, 'zope.alice'), (1, 'zope.alice'), (2, 'zope.alice')]
    workers.wait_for(lambda: store.figures(zodb)['pending'] == 0, 10,
                     message='outbox empty')
    worker.wait_for_log(r'Outbox relay published 4 task\(s\)', timeout=10)
    assert workers.read_data(zodb)['relayed-count'] == 1   # once
