"""Outbox faults with real processes: SIGKILL after commit, ZEO writers."""
import json
import os
import signal
import subprocess
import sys

import pytest
import ZEO

import z3c.celery
from z3c.celery.outbox import store
from z3c.celery.outbox.relay import Relay
from z3c.celery.testing import servers

from .conftest import ROOT
from .conftest import make_site_db
from .test_outbox import broker_ids


#: A client process: loads the site (dispatch "outbox"), opens the
#: database the way zope.app.appsetup would (DatabaseOpened creates the
#: outbox), then commits transactions that write data and queue tasks.
CLIENT = '''
import json, os, signal, sys
import transaction, ZODB, ZODB.FileStorage, ZEO
import zope.component, zope.event, zope.processlifetime
from BTrees.OOBTree import OOBTree
from ZODB.POSException import ConflictError
from zope.configuration import xmlconfig
from tests.conftest import SITE_ZCML
from z3c.celery import database
from z3c.celery.interfaces import ITask

mode, where, broker, name, count = sys.argv[1:6]
count = int(count)
if mode == 'zeo':
    db = ZEO.DB(('127.0.0.1', int(where)))
else:
    db = ZODB.DB(ZODB.FileStorage.FileStorage(where))
database.set_database(db)
xmlconfig.string(SITE_ZCML.format(body=f"""
  <celery:config broker_url="{broker}" dispatch="outbox" />
  <celery:task name="t.record" handler="tests.tasks.record" />"""))
zope.event.notify(zope.processlifetime.DatabaseOpened(db))
task = zope.component.getUtility(ITask, 't.record')
conn = db.open()

if mode == 'kill':
    conn.root()['data']['k'] = 'committed'
    # Registered before the task queue's own hook, so it runs first: the
    # process dies after the commit is final and before anything is sent.
    transaction.get().addAfterCommitHook(
        lambda status: os.kill(os.getpid(), signal.SIGKILL))
    ids = [task.delay('k', n, _principal_id_='zope.alice').id
           for n in range(count)]
    print(json.dumps(ids), flush=True)
    transaction.commit()
    print('still alive', flush=True)
    sys.exit(3)

# mode == 'zeo': each process writes its own mapping, so any conflict
# would come from the outbox.
conflicts = []
ids = []
for n in range(count):
    while True:
        try:
            conn.root()[name][n] = n
            ids.append(task.delay(name, n, _principal_id_='zope.alice').id)
            transaction.commit()
            break
        except ConflictError as e:
            conflicts.append(repr(e))
            ids.pop()
            transaction.abort()
print(json.dumps({'ids': ids, 'conflicts': conflicts}), flush=True)
conn.close()
db.close()
'''


def run_client(tmp_path, *args, timeout=60):
    script = tmp_path / 'client.py'
    script.write_text(CLIENT)
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, str(script)] + [str(a) for a in args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def finish(process, timeout=60):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        servers.stop_process(process, sig=signal.SIGKILL)
        raise
    return out, err


def test_process_killed_between_commit_and_publish(
        zca, tmp_path, redis_db, redis_server):
    """Fault 2: SIGKILL after the commit, before publishing."""
    path = str(tmp_path / 'Data.fs')
    make_site_db(path).close()
    process = run_client(tmp_path, 'kill', path, redis_db, '', 5)
    out, err = finish(process)
    assert process.returncode == -signal.SIGKILL, err
    ids = json.loads(out.splitlines()[0])
    assert broker_ids(redis_server) == []          # nothing was sent

    from zope.configuration import xmlconfig

    from .conftest import SITE_ZCML
    xmlconfig.string(SITE_ZCML.format(
        body=f'<celery:config broker_url="{redis_db}" />'))
    from ZODB import DB
    from ZODB.FileStorage import FileStorage
    db = DB(FileStorage(path))
    try:
        with db.transaction() as conn:
            assert conn.root()['data']['k'] == 'committed'
        assert sorted(store.pending_records(db)) == sorted(ids)
        report = Relay(z3c.celery.CELERY, db, grace_period=0).run_once()
        assert report.sent == 5
        assert broker_ids(redis_server) == ids     # same ids, same order
        assert store.figures(db)['pending'] == 0
    finally:
        db.close()


@pytest.fixture
def zeo(tmp_path):
    path = str(tmp_path / 'zeo.fs')
    make_site_db(path).close()
    server = servers.ZEOServer(path).start()
    yield server
    server.stop()


def test_two_processes_enqueue_concurrently_without_conflicts(
        zca, tmp_path, zeo, redis_db, redis_server):
    """Fault 6: two ZEO clients, 200 transactions each."""
    db = ZEO.DB(zeo.address)
    try:
        with db.transaction() as conn:
            from BTrees.OOBTree import OOBTree
            conn.root()['p1'] = OOBTree()
            conn.root()['p2'] = OOBTree()
        clients = [run_client(tmp_path, 'zeo', zeo.port, redis_db, name, 200)
                   for name in ('p1', 'p2')]
        results = []
        for client in clients:
            out, err = finish(client, timeout=90)
            assert client.returncode == 0, err
            results.append(json.loads(out.splitlines()[-1]))
        assert [r['conflicts'] for r in results] == [[], []]
        ids = results[0]['ids'] + results[1]['ids']
        assert len(set(ids)) == 400
        assert sorted(broker_ids(redis_server)) == sorted(ids)
        figures = store.figures(db)
        assert (figures['pending'], figures['lanes']) == (0, 2)
        with db.transaction() as conn:
            assert len(conn.root()['p1']) == len(conn.root()['p2']) == 200
    finally:
        db.close()
