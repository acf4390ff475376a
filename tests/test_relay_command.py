"""``celery -A z3c.celery.CELERY outbox ...`` run as a real command."""
import json
import os
import subprocess
import sys

import pytest
import transaction
from celery.utils import uuid

from z3c.celery.message import TaskMessage
from z3c.celery.message import make_record
from z3c.celery.outbox import store
from z3c.celery.testing import servers

from .conftest import ROOT
from .conftest import make_site_db
from .test_outbox import broker_ids


CELERY = os.path.join(os.path.dirname(sys.executable), 'celery')


def message(n):
    return TaskMessage('t.record', ('k', n), {}, {}, uuid(),
                                'zope.alice')


@pytest.fixture
def storage(tmp_path):
    """A FileStorage with 3 pending records and 2 dead letters, closed."""
    path = str(tmp_path / 'Data.fs')
    db = make_site_db(path)
    manager = transaction.TransactionManager()
    txn = manager.begin()
    pending = [message(n) for n in range(3)]
    store.write_records(txn, db, pending, key='web:1:1', now=0)
    manager.commit()
    dead = [message(n) for n in (10, 11)]
    with db.transaction() as conn:
        letters = store.get_outbox(conn).dead
        for m in dead:
            letters[m.task_id] = dict(make_record(m, 0),
                                      attempts=10, error='refused')
    db.close()
    conf = tmp_path / 'zodb.conf'
    conf.write_text(f'<zodb>\n  <filestorage>\n    path {path}\n'
                    f'  </filestorage>\n</zodb>\n')
    return {'conf': str(conf), 'pending': [m.task_id for m in pending],
            'dead': [m.task_id for m in dead]}


def outbox_command(broker_url, *args, timeout=60):
    broker = ['-b', broker_url] if broker_url else []
    process = subprocess.run(
        [CELERY, '-A', 'z3c.celery.CELERY'] + broker + ['outbox']
        + list(args),
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PYTHONPATH=ROOT))
    return process


def test_show_retry_purge_flush(storage, redis_db, redis_server):
    conf = ['--zodb-conf', storage['conf']]
    shown = outbox_command(redis_db, *conf, 'show', '--json')
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)
    assert (figures['pending'], figures['dead']) == (3, 2)
    assert figures['oldest_age'] > 3600 * 24 * 365   # created at 0

    first_dead = storage['dead'][0]
    retried = outbox_command(redis_db, *conf, 'retry', first_dead)
    assert retried.returncode == 0, retried.stderr
    assert '1 dead letter(s) back' in retried.stdout
    assert 'sent: 4' in retried.stdout           # retry flushes everything
    assert sorted(broker_ids(redis_server)) == sorted(
        storage['pending'] + [first_dead])

    purged = outbox_command(redis_db, *conf, 'purge', '--force')
    assert purged.returncode == 0, purged.stderr
    assert 'deleted 1 dead letter(s)' in purged.stdout

    shown = outbox_command(redis_db, *conf, 'show')
    assert 'pending:      0' in shown.stdout
    assert 'dead letters: 0' in shown.stdout


def test_flush_with_the_broker_down_fails_and_keeps_the_records(storage):
    down = f'redis://127.0.0.1:{servers.free_port()}/0'
    conf = ['--zodb-conf', storage['conf']]
    flushed = outbox_command(down, *conf, 'flush')
    assert flushed.returncode == 1
    assert 'waiting: 3' in flushed.stdout
    assert 'broker unavailable' in flushed.stderr
    shown = outbox_command(down, *conf, 'show', '--json')
    assert json.loads(shown.stdout)['pending'] == 3


def test_without_a_database_the_command_says_what_to_give(redis_db):
    shown = outbox_command(redis_db, 'show')
    assert shown.returncode == 2
    assert '--zope-conf' in shown.stderr and '--zodb-conf' in shown.stderr


def test_zope_conf_gives_database_and_broker(tmp_path, redis_db,
                                             redis_server):
    """With --zope-conf the site's ZCML configures the broker."""
    from tests import workers
    path = str(tmp_path / 'Site.fs')
    db = make_site_db(path)
    manager = transaction.TransactionManager()
    txn = manager.begin()
    pending = [message(n) for n in range(2)]
    store.write_records(txn, db, pending, key='web:2:2', now=0)
    manager.commit()
    db.close()
    site = workers.write_site(str(tmp_path / 'site'), redis_db,
                              fs_path=path)
    # No -b (which Celery lets win over any configuration): the broker is
    # the one of the site's <celery:config>.
    flushed = outbox_command(None, '--zope-conf', site.zope_conf, 'flush')
    assert flushed.returncode == 0, flushed.stderr
    assert 'sent: 2' in flushed.stdout
    assert broker_ids(redis_server) == [m.task_id for m in pending]
