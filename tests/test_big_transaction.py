"""One transaction that queues 100,000 tasks commits and sends them all
(issue 15, part 3): FileStorage, ZEO and RelStorage (PostgreSQL) with
dispatch mode ``outbox`` and a real Redis.

Before, every task id went into the transaction's extended info, which
FileStorage caps at 65,535 bytes: from about 1,450 tasks on the commit
failed (``too much extension data``) and took the user's data with it.
"""
import subprocess
import uuid

import pytest
import transaction
import ZODB

from z3c.celery import message
from z3c.celery.outbox import store

from .test_outbox import site  # noqa: F401 (fixture)
from .test_outbox import task


N = 100_000


def queue_many(db, n):
    conn = db.open()
    conn.root()['data']['big'] = n
    ids = [task().delay('big', i).id for i in range(n)]
    transaction.commit()
    conn.close()
    return ids


def check(db, redis_server, ids):
    assert redis_server.client().llen('celery') == len(ids)
    assert store.figures(db)['pending'] == 0
    with db.transaction() as conn:
        assert conn.root()['data']['big'] == len(ids)


def queuing_transaction_info(db):
    """The extended info of the (last) transaction that queued tasks."""
    found = {}
    for txn in db.storage.iterator():
        if message.TASK_COUNT_KEY in txn.extension:
            found = dict(txn.extension)
    return found


def test_100000_tasks_in_one_transaction_on_filestorage(
        site, redis_db, redis_server):
    db = site(redis_db)
    ids = queue_many(db, N)
    check(db, redis_server, ids)
    info = queuing_transaction_info(db)
    assert info[message.TASK_COUNT_KEY] == N
    assert info[message.TASK_IDS_KEY] == ids[:message.TASK_IDS_KEPT]


def swap_database(new_db):
    """Make *new_db* the database of the loaded site."""
    from z3c.celery import database

    from tests import workers
    workers.prepare_database(new_db)
    database.set_database(new_db)
    store.ensure_outbox(new_db)


def test_100000_tasks_in_one_transaction_on_zeo(
        site, redis_db, redis_server, zeo):
    from tests import workers
    site(redis_db)
    db = workers.zeo_db(zeo.address)
    try:
        swap_database(db)
        ids = queue_many(db, N)
        check(db, redis_server, ids)
    finally:
        db.close()


def _relstorage_db(name):
    try:
        import psycopg2  # noqa: F401
        import relstorage.options  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f'relstorage or psycopg2 is not installed ({e})')
    from relstorage.adapters.postgresql import PostgreSQLAdapter
    from relstorage.options import Options
    from relstorage.storage import RelStorage
    dsn = f'dbname={name} user=postgres host=127.0.0.1 port=5432'
    options = Options(keep_history=False)
    adapter = PostgreSQLAdapter(dsn=dsn, options=options)
    return ZODB.DB(RelStorage(adapter, options=options))


def _psql(sql):
    return subprocess.run(
        ['psql', '-h', '127.0.0.1', '-U', 'postgres', '-d', 'postgres',
         '-v', 'ON_ERROR_STOP=1', '-c', sql],
        capture_output=True, text=True, timeout=60)


@pytest.fixture
def relstorage_db():
    name = f'z3c_celery_test_{uuid.uuid4().hex[:8]}'
    made = _psql(f'CREATE DATABASE {name}')
    if made.returncode:
        pytest.skip(f'no PostgreSQL to test RelStorage: {made.stderr}')
    db = None
    try:
        db = _relstorage_db(name)
        db.test_name = name
        yield db
    finally:
        if db is not None:
            db.close()
        _psql(f'DROP DATABASE IF EXISTS {name}')


def test_100000_tasks_in_one_transaction_on_relstorage(
        site, redis_db, redis_server, relstorage_db):
    site(redis_db)
    swap_database(relstorage_db)
    ids = queue_many(relstorage_db, N)
    check(relstorage_db, redis_server, ids)


def test_the_extended_info_of_a_big_transaction_stays_small(
        site, redis_db, redis_server):
    db = site(redis_db)
    queue_many(db, 5000)
    info = queuing_transaction_info(db)
    assert len(repr(info)) < 8 * 1024
    assert info[message.TASK_COUNT_KEY] == 5000

