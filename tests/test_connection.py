"""The worker's connection: catching up with the sender's commit, and
conflicts found before the commit."""
import BTrees.Length
import pytest
import ZODB
import ZODB.interfaces
import ZODB.POSException

import z3c.celery
from z3c.celery import database
from z3c.celery.message import commit_token
from z3c.celery.worker import connection as worker_connection
from z3c.celery.worker.connection import catch_up

from tests import workers


def test_commit_token_and_catch_up_over_zeo(tmp_path, zca):
    """A worker's ZEO client sees the sender's commit before the task."""
    import ZEO

    from z3c.celery.testing import servers
    with servers.ZEOServer(str(tmp_path / 'zeo.fs')) as zeo:
        sender = ZEO.DB(zeo.address)
        receiver = ZEO.DB(zeo.address)      # no server-sync
        try:
            workers.prepare_database(sender)
            database.set_database(sender)
            for i in range(20):
                with sender.transaction() as conn:
                    conn.root()['data']['n'] = i
                token = commit_token(z3c.celery.CELERY)
                assert token == sender.lastTransaction().hex()
                catch_up(receiver, token)
                assert receiver.storage.lastTransaction() >= \
                    bytes.fromhex(token)
                with receiver.transaction() as conn:
                    assert conn.root()['data']['n'] == i
            # Up to date: no round trip is made.
            assert catch_up(receiver, token) is False
            assert catch_up(receiver, None) is False
        finally:
            database.set_database(None)
            sender.close()
            receiver.close()


def test_no_database_no_token(zca):
    assert commit_token(z3c.celery.CELERY) is None


# A conflict that committing would hit is raised before the commit (no
# vote, no half-done commit to abort); one that the object may resolve
# itself is left to the commit.

@pytest.mark.parametrize('how, error, message', [
    ('changed', ZODB.POSException.ConflictError,
     'changed by another.*found before the commit.*PersistentMapping'),
    ('read as current', ZODB.POSException.ReadConflictError,
     'read as current.*found before the commit'),
])
def test_an_object_changed_since_fails_before_the_commit(
        fs_db, how, error, message):
    mine, other = fs_db(), fs_db()
    mine.root()['a']['x'] = 1
    if how == 'read as current':
        mine.readCurrent(mine.root()['b'])
    else:
        mine.root()['b']['x'] = 1
    worker_connection.raise_known_conflict(mine)      # nothing changed yet
    other.root()['b']['y'] = 2
    other.transaction_manager.commit()
    with pytest.raises(error, match=message):
        worker_connection.raise_known_conflict(mine)
    # What the commit would have said too.
    with pytest.raises(error):
        mine.transaction_manager.commit()


def test_a_change_reported_late_but_already_seen_is_no_conflict(fs_db):
    """The report of a commit can come a moment after a transaction began
    that already sees it (a race made here by hand): no conflict."""
    mine, other = fs_db(), fs_db()
    other.root()['b']['y'] = 2
    other.transaction_manager.commit()
    mine.transaction_manager.begin()
    changed = mine.root()['b']
    assert changed['y'] == 2
    changed['x'] = 1
    mine._storage._invalidate(changed._p_serial, [changed._p_oid])
    worker_connection.raise_known_conflict(mine)
    mine.transaction_manager.commit()


def test_conflicts_an_object_resolves_are_left_to_the_commit(fs_db):
    setup = fs_db()
    setup.root()['length'] = BTrees.Length.Length()
    setup.transaction_manager.commit()
    mine, other = fs_db(), fs_db()
    mine.root()['length'].change(1)
    other.root()['length'].change(2)
    other.transaction_manager.commit()
    worker_connection.raise_known_conflict(mine)      # Length resolves it
    mine.transaction_manager.commit()
    setup.transaction_manager.begin()
    assert setup.root()['length']() == 3
