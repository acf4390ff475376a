"""Every ``celery`` subcommand sees the site: the preload option
``--zope-conf`` and ``$Z3C_CELERY_ZOPE_CONF`` (real processes, a private
Redis that is not Celery's default broker)."""
import json
import os
import subprocess
import sys

import pytest
import transaction
from celery.utils import uuid

from z3c.celery.message import TaskMessage
from z3c.celery.outbox import store

from tests import workers
from tests.conftest import make_site_db


ENV = 'Z3C_CELERY_ZOPE_CONF'


def celery(*args, env=None, timeout=90):
    """Run ``celery -A z3c.celery.CELERY ARGS`` and return the process."""
    environment = dict(os.environ, PYTHONPATH=workers.ROOT)
    for name in ('CELERY_CONFIG_MODULE', 'CELERY_CONFIG_FILE',
                 'CELERY_BROKER_URL', ENV):
        environment.pop(name, None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, '-m', 'celery', '-A', 'z3c.celery.CELERY']
        + list(args), cwd=workers.ROOT, capture_output=True, text=True,
        timeout=timeout, env=environment, stdin=subprocess.DEVNULL)


@pytest.fixture
def site(tmp_path, redis):
    """A FileStorage site whose broker is database 5 of the private Redis,
    with an empty queue."""
    fs = workers.prepare_filestorage(str(tmp_path / 'Data.fs'))
    site = workers.write_site(str(tmp_path / 'site'), redis.url + '/5',
                              fs_path=fs)
    client = redis.client(5)
    client.flushdb()
    yield site
    client.flushdb()


def test_call_and_purge_reach_the_broker_of_the_site(site, redis):
    client = redis.client(5)
    ids = []
    for word in ('one', 'two'):
        called = celery('call', '--zope-conf', site.zope_conf, 'w.log',
                        '--args', json.dumps([word]))
        assert called.returncode == 0, called.stderr
        ids.append(called.stdout.strip())
    waiting = [json.loads(m)['headers']['id']
               for m in client.lrange('celery', 0, -1)]
    assert sorted(waiting) == sorted(ids)

    purged = celery('purge', '-f', '--zope-conf', site.zope_conf)
    assert purged.returncode == 0, purged.stderr
    assert 'Purged 2 messages' in purged.stdout, purged.stdout
    assert client.llen('celery') == 0


def test_inspect_and_call_with_the_option_and_the_environment_variable(
        site, tmp_path):
    """The worker holds the FileStorage's lock: the commands load the
    site's configuration without opening its database."""
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            directory=str(tmp_path))
    with worker:
        pinged = celery('inspect', '--zope-conf', site.zope_conf, 'ping',
                        '--timeout', '5')
        assert pinged.returncode == 0, pinged.stderr + pinged.stdout
        assert worker.name in pinged.stdout and 'pong' in pinged.stdout

        status = celery('status', '--zope-conf', site.zope_conf,
                        '--timeout', '5')
        assert status.returncode == 0, status.stderr + status.stdout
        assert '1 node online' in status.stdout, status.stdout

        by_env = celery('inspect', 'ping', '--timeout', '5',
                        env={ENV: site.zope_conf})
        assert by_env.returncode == 0, by_env.stderr + by_env.stdout
        assert worker.name in by_env.stdout

        # (``celery call`` sends at once, outside any transaction; it
        # records no principal.)
        called = celery('call', 'w.log', '--args', '["called"]',
                        env={ENV: site.zope_conf})
        assert called.returncode == 0, called.stderr
        task_id = called.stdout.strip()
        workers.wait_for(
            lambda: f'Task w.log[{task_id}] succeeded' in worker.log(),
            60, message=f'w.log[{task_id}] run by the worker')


def test_worker_takes_the_zope_conf_from_the_environment(site, tmp_path):
    """Without any zope.conf the worker would exit at once; it answers
    on the site's broker."""
    worker = workers.Worker(None, broker_url=site.broker_url,
                            directory=str(tmp_path),
                            env={ENV: site.zope_conf})
    with worker:
        assert worker.ping()
    assert 'Zope environment ready' in worker.log()


def test_an_invalid_zope_conf_stops_the_command_saying_why(tmp_path):
    conf = tmp_path / 'zope.conf'
    conf.write_text('<zodb>\n  <filestorage>\n  </filestorage>\n</zodb>\n')
    pinged = celery('inspect', '--zope-conf', str(conf), 'ping')
    assert pinged.returncode != 0
    assert f'Invalid zope.conf {conf}' in pinged.stderr, pinged.stderr


@pytest.fixture
def outbox_site(tmp_path, redis):
    """A site whose FileStorage holds two pending outbox records."""
    path = str(tmp_path / 'Outbox.fs')
    db = make_site_db(path)
    manager = transaction.TransactionManager()
    txn = manager.begin()
    pending = [TaskMessage('t.record', ('k', n), {}, {}, uuid(), 'zope.alice')
               for n in range(2)]
    store.write_records(txn, db, pending, key='web:3:3', now=0)
    manager.commit()
    db.close()
    site = workers.write_site(str(tmp_path / 'site'), redis.url + '/6',
                              fs_path=path)
    redis.client(6).flushdb()
    return site, [m.task_id for m in pending]


@pytest.mark.parametrize('form', ['after', 'before', 'environment'])
def test_outbox_show_takes_the_zope_conf_before_or_after_the_subcommand(
        outbox_site, form):
    site, _ = outbox_site
    args, env = {
        'after': (['outbox', 'show', '--zope-conf', site.zope_conf], {}),
        'before': (['outbox', '--zope-conf', site.zope_conf, 'show'], {}),
        'environment': (['outbox', 'show'], {ENV: site.zope_conf}),
    }[form]
    shown = celery(*args, '--json', env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)['pending'] == 2


def test_outbox_flush_after_the_subcommand_uses_the_sites_broker(
        outbox_site, redis):
    site, ids = outbox_site
    flushed = celery('outbox', 'flush', '--zope-conf', site.zope_conf)
    assert flushed.returncode == 0, flushed.stderr
    assert 'sent: 2' in flushed.stdout
    waiting = [json.loads(m)['headers']['id']
               for m in redis.client(6).lrange('celery', 0, -1)]
    assert sorted(waiting) == sorted(ids)
