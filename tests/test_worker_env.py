"""In-process parts of the worker: zope.conf loading, databases, the
bootstep's settings, and done-markers run through the runner (inline)."""
import sys
import time

import BTrees.Length
import celery
import persistent.mapping
import pytest
import transaction
import ZODB
import ZODB.POSException
import ZODB.interfaces
import zope.component
import zope.component.hooks
from celery.exceptions import Ignore

import z3c.celery
from z3c.celery import database
from z3c.celery.worker import markers
from z3c.celery.worker import connection as worker_connection
from z3c.celery.message import commit_token
from z3c.celery.worker import bootsteps
from z3c.celery.worker.connection import catch_up
from z3c.celery.worker import zopeconf
from z3c.celery.interfaces import ITask

from tests import tasks
from tests import workers
from tests.conftest import read_data


@pytest.fixture
def site(tmp_path, zca):
    fs = workers.prepare_filestorage(str(tmp_path / 'Data.fs'),
                                     {'k': 'v'})
    return workers.write_site(str(tmp_path / 'site'), 'memory://env',
                              fs_path=fs)


def test_load_zope_conf_executes_the_site_zcml_once(site):
    options = zopeconf.load_zope_conf(site.zope_conf)
    assert zope.component.queryUtility(ITask, 'w.whoami') is not None
    assert z3c.celery.CELERY.conf.broker_url == 'memory://env'
    assert zopeconf.load_zope_conf(site.zope_conf) is options
    assert zopeconf.loaded_path() == site.zope_conf


def test_a_second_zope_conf_is_refused(site, tmp_path):
    zopeconf.load_zope_conf(site.zope_conf)
    other = tmp_path / 'other.conf'
    other.write_text(open(site.zope_conf).read())
    with pytest.raises(zopeconf.ZopeConfError, match='already loaded'):
        zopeconf.load_zope_conf(str(other))


def test_paths_and_site_definition_are_relative_to_zope_conf(
        site, tmp_path):
    conf = tmp_path / 'site' / 'relative.conf'
    text = open(site.zope_conf).read().replace(
        site.site_zcml, 'site.zcml')
    conf.write_text('path lib\n' + text)
    saved = sys.path[:]
    try:
        zopeconf.load_zope_conf(str(conf))
        assert sys.path[0] == str(tmp_path / 'site' / 'lib')
    finally:
        sys.path[:] = saved


def test_missing_site_definition_is_named(site, tmp_path):
    conf = tmp_path / 'bad.conf'
    conf.write_text(open(site.zope_conf).read().replace(
        site.site_zcml, str(tmp_path / 'nowhere.zcml')))
    with pytest.raises(zopeconf.ZopeConfError, match='nowhere.zcml'):
        zopeconf.load_zope_conf(str(conf))


def test_open_databases_registers_sets_and_closes(site):
    zopeconf.load_zope_conf(site.zope_conf)
    db = zopeconf.open_databases()
    try:
        assert zope.component.getUtility(ZODB.interfaces.IDatabase) is db
        assert database.get_database() is db
        with db.transaction() as conn:
            root = conn.root()
            assert root['data']['k'] == 'v'
            assert markers.CONTAINER_KEY in root
    finally:
        zopeconf.close_databases()
    assert database.get_database() is None
    assert zope.component.queryUtility(ZODB.interfaces.IDatabase) is None


def test_root_folder_is_created_once_when_missing(tmp_path):
    db = ZODB.DB(None)
    try:
        assert zopeconf.ensure_root_folder(db) is True
        assert zopeconf.ensure_root_folder(db) is False
        with db.transaction() as conn:
            site = conn.root()[database.ROOT_NAME]
            assert zope.component.interfaces.ISite.providedBy(site)
    finally:
        db.close()


def test_boot_without_zope_conf_says_what_to_set(zca):
    app = z3c.celery.CELERY
    with pytest.raises(bootsteps.WorkerSetupError) as error:
        bootsteps.boot(app)
    assert str(error.value) == bootsteps.NO_ZOPE_CONF
    assert bootsteps._state.booted is False


def test_worker_boot_timeout_sets_proc_alive_timeout(site, monkeypatch):
    monkeypatch.setattr(bootsteps, '_state', bootsteps._State())
    app = z3c.celery.CELERY
    app.conf.worker_boot_timeout = 42
    try:
        bootsteps.boot(app, site.zope_conf)
        assert app.conf.worker_proc_alive_timeout == 42.0
        assert app.conf.result_backend_always_retry is True
    finally:
        del app.conf.changes['worker_boot_timeout']
        app.conf.changes.pop('worker_proc_alive_timeout', None)
        app.conf.changes.pop('result_backend_always_retry', None)


def test_logging_ini_of_the_site_zcml_is_applied(tmp_path, monkeypatch, zca):
    """LOGGING_INI in <celery:config> counts, although read late."""
    monkeypatch.setattr(bootsteps, '_state', bootsteps._State())
    ini = tmp_path / 'logging.ini'
    ini.write_text('[loggers]\nkeys = root\n[handlers]\nkeys =\n'
                   '[formatters]\nkeys =\n[logger_root]\nhandlers =\n')
    fs = workers.prepare_filestorage(str(tmp_path / 'Data.fs'))
    site = workers.write_site(str(tmp_path / 'site'), 'memory://env',
                              fs_path=fs, config=f'LOGGING_INI="{ini}"')
    applied = []
    monkeypatch.setattr('z3c.celery.logging.apply_logging_ini',
                        applied.append)
    app = z3c.celery.CELERY
    app.log.already_setup, saved = True, app.log.already_setup
    try:
        bootsteps.boot(app, site.zope_conf)
    finally:
        app.log.already_setup = saved
        app.conf.changes.pop('result_backend_always_retry', None)
    assert applied == [str(ini)]


def test_worker_options_are_installed():
    names = {option.name for option in
             z3c.celery.CELERY.user_options['worker']}
    assert {'zope_conf', 'logging_ini'} <= names
    assert bootsteps.ZopeEnvironment in z3c.celery.CELERY.steps['worker']


# Done-markers through the runner, in-process

TASKS = '''
  <celery:config dispatch="inline" />
  <celery:task name="t.increment" handler="tests.tasks.increment" />
  <celery:task name="w.touch" handler="tests.site.tasks.touch" />
'''


@pytest.fixture
def inline(load_zcml, db, login):
    load_zcml(TASKS)
    login('zope.alice')
    return db


def run(name, *args, task_id):
    """Run a task as a worker would run a (re)delivered message."""
    task = zope.component.getUtility(ITask, name)
    return task.apply(args, {'_principal_id_': 'zope.alice'},
                      task_id=task_id, throw=True)


def marked(db, task_id):
    with db.transaction() as conn:
        return markers.done_at(conn, task_id, z3c.celery.CELERY.z3c_setting(
            'done_marker_retention')) is not None


def test_redelivered_task_is_skipped_and_logged(inline, caplog):
    run('t.increment', 'n', task_id='same-id')
    assert marked(inline, 'same-id')
    outcome = run('t.increment', 'n', task_id='same-id')
    assert outcome.state == 'SUCCESS'
    assert outcome.result is None
    with inline.transaction() as conn:
        assert conn.root()['data']['n'] == 1
    assert 'Task t.increment[same-id] was already done' in caplog.text


#: Task ids of the runs of ``counted_increment`` (its body ran).
RAN = []


def counted_increment(key):
    RAN.append(key)
    tasks.increment(key)


@pytest.fixture
def pool_process(load_zcml, db, login):
    """Tasks run as a prefork pool process runs them, Redis the broker."""
    load_zcml('''
      <celery:config dispatch="inline" broker_url="redis://127.0.0.1:1/0" />
      <celery:task name="t.counted"
                   handler="tests.test_worker_env.counted_increment" />''')
    login('zope.alice')
    RAN.clear()
    yield db
    worker_connection.release_connection()


def run_in_pool(key, task_id, **flags):
    """Run ``t.counted`` from a message delivered with *flags*."""
    task = z3c.celery.CELERY.tasks['t.counted']
    task.push_request(id=task_id, called_directly=False, is_eager=False,
                      retries=0, **flags)
    try:
        return task(key, _principal_id_='zope.alice')
    finally:
        task.pop_request()


def test_a_redelivered_message_whose_run_committed_does_not_run(
        pool_process, caplog):
    run_in_pool('n', 'once', delivery_info={'redelivered': False})
    assert run_in_pool('n', 'once', delivery_info={'redelivered': True}) \
        is None
    assert RAN == ['n']       # skipped before it ran
    assert read_data(pool_process) == {'n': 1}
    assert 'Task t.counted[once] was already done' in caplog.text


def test_a_first_delivery_after_a_resent_copy_ran_is_skipped_at_commit(
        pool_process, caplog):
    """The first delivery looks for its marker when it marks: it ran,
    but its writes are not committed."""
    run_in_pool('n', 'resent', **{markers.RESENT_HEADER: True},
                delivery_info={'redelivered': False})
    assert run_in_pool('n', 'resent',
                       delivery_info={'redelivered': False}) is None
    assert RAN == ['n', 'n']
    assert read_data(pool_process) == {'n': 1}
    assert 'Task t.counted[resent] was already done' in caplog.text


def test_task_that_writes_nothing_gets_no_marker(inline):
    run('w.touch', 'n', task_id='reader')
    assert not marked(inline, 'reader')


def test_markers_can_be_switched_off(load_zcml, db, login):
    load_zcml(TASKS.replace('dispatch="inline"',
                            'dispatch="inline" done_markers="false"'))
    login('zope.alice')
    run('t.increment', 'n', task_id='twice')
    run('t.increment', 'n', task_id='twice')
    assert not marked(db, 'twice')
    with db.transaction() as conn:
        assert conn.root()['data']['n'] == 2


def test_skip_keeps_a_result_already_stored(inline, monkeypatch):
    task = zope.component.getUtility(ITask, 't.increment')
    monkeypatch.setattr(type(task.backend), 'get_state',
                        lambda self, task_id: 'SUCCESS', raising=False)
    with pytest.raises(Ignore):
        markers.skip(task, markers.AlreadyDone('t', 'id', 0))


def test_marker_written_by_a_later_commit_hook_counts(inline):
    """Writes made in before-commit hooks (e.g. an outbox) are included."""
    def writes_in_hook():
        def hook():
            tasks.data()['from-hook'] = True
        transaction.get().addBeforeCommitHook(hook)
    db = ZODB.DB(None)
    workers.prepare_database(db)
    manager = transaction.TransactionManager()
    conn = db.open(transaction_manager=manager)
    thread_manager = transaction.manager
    saved = thread_manager.manager
    try:
        txn = manager.begin()
        # As the runner does: the task's manager and site for the thread.
        thread_manager.manager = manager
        zope.component.hooks.setSite(database.root_site(conn))
        writes_in_hook()     # the task only queued something
        markers.mark_at_commit(txn, conn, 'hooked', 100)
        manager.commit()
        manager.begin()
        assert markers.done_at(conn, 'hooked', 100) is not None
    finally:
        zope.component.hooks.setSite(None)
        thread_manager.manager = saved
        conn.close()
        db.close()


def test_generations_are_looked_up_and_pruned():
    db = ZODB.DB(None)
    conn = db.open()
    try:
        day = 86400
        markers.mark_done(conn, 'old', day, now=0.5 * day)
        markers.mark_done(conn, 'recent', day, now=1.5 * day)
        # Still found one generation later, gone two generations later.
        assert markers.done_at(conn, 'old', day, now=1.9 * day)
        assert markers.done_at(conn, 'old', day, now=2.1 * day) is None
        markers.mark_done(conn, 'new', day, now=2.5 * day)
        tree = markers.container(conn)
        assert list(tree.keys()) == [1, 2]     # generation 0 dropped
        assert markers.done_at(conn, 'recent', day, now=2.5 * day)
        assert markers.done_at(conn, 'new', day, now=2.5 * day)
    finally:
        transaction.abort()
        conn.close()
        db.close()


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


# Partitions: a first delivery marks in its process's own partition and,
# when it marks, looks only in the shared one; a run that may repeat one
# looks everywhere and marks in the shared one.  Both kinds at the same
# time conflict.

DAY = 86400


@pytest.fixture
def fs_db(tmp_path):
    """A FileStorage database, and a connection factory with own managers."""
    db = ZODB.DB(str(tmp_path / 'Markers.fs'))
    with db.transaction() as conn:
        for slot in SLOTS:
            conn.root()[slot] = persistent.mapping.PersistentMapping()
        # The steady state: this generation and our partition exist.
        markers.mark_done(conn, 'earlier', DAY, shared=False)
    opened = []

    def open_connection():
        manager = transaction.TransactionManager()
        conn = db.open(transaction_manager=manager)
        opened.append(conn)
        manager.begin()
        return conn
    yield open_connection
    for conn in opened:
        conn.transaction_manager.abort()
        conn.close()
    db.close()


#: Objects the tasks of the tests write to, one each: they conflict only
#: through their markers.
SLOTS = ('a', 'b', 'c', 'd')


def write_and_mark(conn, task_id, shared, slot='a'):
    """A task's write and its marker, in *conn*'s transaction."""
    conn.root()[slot][task_id] = 1
    markers.mark_done(conn, task_id, DAY, shared=shared)


def test_a_first_delivery_marks_in_its_own_partition(fs_db):
    conn = fs_db()
    write_and_mark(conn, 'first', shared=False)
    conn.transaction_manager.commit()
    partitions = markers.container(conn)[markers.generation(
        time.time(), DAY)]
    assert 'first' in partitions[markers.partition_name()]
    assert 'first' not in partitions[markers.shard_name('first')]
    # Found by a run that may repeat it, not by another first delivery.
    assert markers.done_at(conn, 'first', DAY, everywhere=True)
    assert markers.done_at(conn, 'first', DAY, everywhere=False) is None


def test_a_first_delivery_finds_a_repeated_run_marker_when_marking(fs_db):
    conn = fs_db()
    write_and_mark(conn, 'again', shared=True)
    conn.transaction_manager.commit()
    assert markers.done_at(conn, 'again', DAY, everywhere=False)
    with pytest.raises(markers.AlreadyDone):
        write_and_mark(conn, 'again', shared=False)


def test_a_first_delivery_marking_in_a_commit_hook_fails_the_commit(fs_db):
    """When other before-commit hooks run (an outbox), the marker waits
    for them, and the commit itself raises AlreadyDone."""
    conn = fs_db()
    write_and_mark(conn, 'hooked', shared=True)
    conn.transaction_manager.commit()
    txn = conn.transaction_manager.begin()
    conn.root()['b']['hooked'] = 1
    txn.addBeforeCommitHook(lambda: None)
    markers.mark_at_commit(txn, conn, 'hooked', DAY, shared=False)
    with pytest.raises(markers.AlreadyDone):
        conn.transaction_manager.commit()
    conn.transaction_manager.abort()
    conn.transaction_manager.begin()
    assert 'hooked' not in conn.root()['b']


def test_marking_an_id_twice_in_one_partition_is_already_done(fs_db):
    conn = fs_db()
    write_and_mark(conn, 'twice', shared=False)
    conn.transaction_manager.commit()
    with pytest.raises(markers.AlreadyDone):
        write_and_mark(conn, 'twice', shared=False)


@pytest.mark.parametrize('first_commits', ['first delivery', 'repeated'])
def test_both_kinds_of_run_of_one_message_at_once_conflict(
        fs_db, first_commits):
    """Whichever commits second gets a conflict (and is retried)."""
    first, repeated = fs_db(), fs_db()
    # Both looked and found nothing.
    assert markers.done_at(first, 'same', DAY, everywhere=False) is None
    assert markers.done_at(repeated, 'same', DAY, everywhere=True) is None
    write_and_mark(first, 'same', shared=False, slot='a')
    write_and_mark(repeated, 'same', shared=True, slot='b')
    winner, loser = (first, repeated) if first_commits == 'first delivery' \
        else (repeated, first)
    winner.transaction_manager.commit()
    with pytest.raises(ZODB.POSException.ConflictError):
        loser.transaction_manager.commit()
    loser.transaction_manager.abort()
    # Retried, the loser finds the winner's marker.
    loser.transaction_manager.begin()
    assert markers.done_at(loser, 'same', DAY, everywhere=True)


def test_different_messages_at_once_do_not_conflict(fs_db, monkeypatch):
    first, other_process, repeated = fs_db(), fs_db(), fs_db()
    # (Different shards: a repeated run's marker conflicts only with first
    # deliveries of its shard, one in markers.SHARDS.)
    assert markers.shard_name('one') != markers.shard_name('three')
    write_and_mark(first, 'one', shared=False, slot='b')
    monkeypatch.setattr(markers, 'partition_name', lambda: 'host:other')
    write_and_mark(other_process, 'two', shared=False, slot='c')
    write_and_mark(repeated, 'three', shared=True, slot='d')
    for conn in (repeated, first, other_process):
        conn.transaction_manager.commit()
    conn.transaction_manager.begin()
    assert all(markers.done_at(conn, task_id, DAY)
               for task_id in ('one', 'two', 'three'))


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


def request(**info):
    from celery.app.task import Context
    values = dict(retries=0, is_eager=False,
                  delivery_info={'redelivered': False})
    values.update(info)
    return Context(**values)


class FakeTask:
    def __init__(self, broker_url):
        self.app = celery.Celery(broker=broker_url, set_as_current=False)


@pytest.mark.parametrize('info, expected', [
    ({}, False),
    ({'retries': 1}, False),
    ({'is_eager': True}, True),
    ({'delivery_info': {'redelivered': True}}, True),
    ({'redelivered': True}, True),
    ({markers.RESENT_HEADER: True}, True),
])
def test_which_runs_may_repeat_an_earlier_delivery(info, expected):
    task = FakeTask('redis://127.0.0.1:1/0')
    assert markers.maybe_repeated(task, request(**info)) is expected


@pytest.mark.parametrize('url, expected', [
    ('redis://127.0.0.1:1/0', False),
    ('sentinel://127.0.0.1:1;sentinel://127.0.0.1:2', False),
    ('amqp://guest@127.0.0.1//', False),
    ('sqs://', True),
    ('redis://127.0.0.1:1/0;sqs://', True),
    ('filesystem://', True),
])
def test_brokers_that_do_not_flag_redeliveries_always_look(url, expected):
    assert markers.maybe_repeated(FakeTask(url), request()) is expected


def test_signed_messages_always_look(fs_db):
    """A replayed signed message may have lost its flags."""
    task = FakeTask('redis://127.0.0.1:1/0')
    assert markers.maybe_repeated(task, request(), secret='s3cret')
