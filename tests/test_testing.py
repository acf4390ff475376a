"""The test helpers of z3c.celery.testing, the layers' checks and the 1.x
fixture functions of z3c.celery.conftest."""
import os

import plone.testing
import pytest
import transaction
import zope.component

import z3c.celery
import z3c.celery.celery
import z3c.celery.conftest
from z3c.celery import testing
from z3c.celery.interfaces import ITask
from z3c.celery.outbox import store
from z3c.celery.testing import layers as layer
from z3c.celery.testing import servers


SITE = testing.site_zcml('''
  <celery:task name="t.remember" handler="tests.guide.tasks.remember" />
''')


@pytest.fixture(scope='session')
def zope_celery_site_zcml():
    return SITE


def remember():
    return zope.component.getUtility(ITask, 't.remember')


def test_queued_tasks_show_name_arguments_principal_and_id(
        zope_celery_inline, zope_celery_db, zope_celery_interaction):
    first = remember().delay('a', 1)
    second = remember().apply_async(
        ('b',), {'value': 2, '_principal_id_': 'zope.editor'},
        task_id='fixed')
    assert testing.queued_task_names() == ['t.remember', 't.remember']
    assert testing.queued_tasks() == [
        testing.QueuedTask('t.remember', ('a', 1), {}, first.id,
                           'zope.user', testing.queued_tasks()[0].options),
        testing.QueuedTask('t.remember', ('b',), {'value': 2}, 'fixed',
                           'zope.editor', testing.queued_tasks()[1].options),
    ]
    assert second.id == 'fixed'


def test_recorder_sees_what_was_queued_and_what_left(
        zope_celery_inline, zope_celery_db, zope_celery_interaction,
        zope_celery_recorder):
    remember().delay('dropped', 1)
    transaction.abort()
    kept = remember().delay('kept', 2)
    transaction.commit()
    assert [t.args for t in zope_celery_recorder.queued] == [
        ('dropped', 1), ('kept', 2)]
    assert [t.task_id for t in zope_celery_recorder.sent] == [kept.id]
    assert zope_celery_recorder.sent_names == ['t.remember']
    assert [e.task_id for e in zope_celery_recorder.succeeded] == [kept.id]
    assert zope_celery_recorder.failed == []


def test_last_transaction_info_names_the_queued_task_ids(
        zope_celery_inline, zope_celery_db, zope_celery_interaction):
    conn = zope_celery_db.open()
    conn.root()['touched'] = 1
    result = remember().delay('k', 1)
    # Inline: the task's own transaction commits after the caller's.
    with testing.TaskRecorder() as recorder:
        transaction.commit()
    conn.close()
    info = testing.last_transaction_info(zope_celery_db)
    assert info['task_name'] == 't.remember'
    assert info['task_id'] == result.id == recorder.sent[0].task_id


def test_eager_mode_does_not_serialize_inline_mode_does(
        zope_celery_db, zope_celery_interaction):
    undo = testing.override_settings(
        z3c.celery.CELERY, testing.mode_settings('inline'))
    try:
        result = remember().delay('inline', (1, 2))
        transaction.commit()
        assert result.get() == [1, 2]     # as a worker gets it (JSON)
    finally:
        undo()
    undo = testing.override_settings(
        z3c.celery.CELERY, testing.mode_settings('eager'))
    try:
        result = remember().delay('eager', (1, 2))
        transaction.commit()
        assert result.get() == (1, 2)
    finally:
        undo()


def test_override_settings_undo_restores_and_removes():
    conf = z3c.celery.CELERY.conf
    before = conf.get('task_default_queue')
    undo = testing.override_settings(
        z3c.celery.CELERY, {'task_default_queue': 'elsewhere',
                            'z3c_test_only': 1})
    assert conf.task_default_queue == 'elsewhere'
    undo()
    assert conf.get('task_default_queue') == before
    assert 'z3c_test_only' not in conf


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match=r"'lazy'.*eager, end-to-end, "
                                         r"inline"):
        testing.mode_settings('lazy')


def test_outbox_helpers_show_the_waiting_tasks(
        zope_celery_db, zope_celery_interaction):
    down = f'redis://127.0.0.1:{servers.free_port()}/0'
    undo = testing.override_settings(z3c.celery.CELERY, {
        'dispatch': 'outbox', 'broker_url': down,
        'broker_connection_retry_on_startup': False,
        'broker_connection_max_retries': 0,
        'broker_transport_options': {'max_retries': 0}})
    try:
        first = remember().delay('a', 1)
        second = remember().delay('b', 2, _principal_id_='zope.editor')
        transaction.commit()                # the broker is away
        waiting = testing.outbox_tasks(zope_celery_db)
    finally:
        undo()
    assert [(t.task_id, t.args, t.principal_id) for t in waiting] == [
        (first.id, ('a', 1), 'zope.user'),
        (second.id, ('b', 2), 'zope.editor')]
    assert testing.outbox_figures(zope_celery_db)['pending'] == 2
    assert testing.outbox_dead_letters(zope_celery_db) == []
    assert set(store.pending_records(zope_celery_db)) == {
        first.id, second.id}


def test_open_zodb_copy_reads_a_database_another_process_holds(tmp_path):
    path = str(tmp_path / 'Data.fs')
    db = testing.filestorage_db(path)
    with db.transaction() as conn:
        conn.root()['Application']['k'] = ('v', 'x')
    files = set(os.listdir(tmp_path))
    try:
        # The FileStorage stays open (and locked) here.
        with testing.open_zodb_copy(path) as app:
            assert app['k'] == ('v', 'x')
            copy = app._p_jar.db().storage.getName()
            assert os.path.exists(copy)
    finally:
        db.close()
    assert not os.path.exists(copy)            # the copy is gone
    assert set(os.listdir(tmp_path)) <= files | {'Data.fs.index'}


def test_write_celeryconfig_refuses_what_a_worker_cannot_read(tmp_path):
    path = testing.write_celeryconfig(
        str(tmp_path / 'c.py'), {'broker_url': 'redis://x', 'imports': [
            'a.b'], 'ZOPE_CONF': '/z.conf'})
    namespace = {}
    with open(path) as f:
        exec(f.read(), namespace)
    assert namespace['imports'] == ['a.b']
    with pytest.raises(TypeError, match="'task_cls'.*not a Python literal"):
        testing.write_celeryconfig(str(tmp_path / 'd.py'),
                                   {'task_cls': object()})
    with pytest.raises(ValueError, match="'not-a-name'"):
        testing.write_celeryconfig(str(tmp_path / 'e.py'),
                                   {'not-a-name': 1})


def test_worker_options_from_1x_parameters():
    assert testing.worker_options({
        'queues': ('hiprio', 'celery'), 'concurrency': 2,
        'perform_ping_check': False}) == [
        '--queues', 'hiprio,celery', '--concurrency', '2']
    with pytest.raises(ValueError, match="'autoscale'"):
        testing.worker_options({'autoscale': '1,2'})


def test_worker_needs_zope_conf():
    with pytest.raises(ValueError, match='ZOPE_CONF'):
        testing.WorkerProcess({'broker_url': 'redis://127.0.0.1:1'}).start()


def test_worker_that_cannot_start_reports_its_output(
        tmp_path, zope_celery_redis):
    worker = testing.WorkerProcess({
        'broker_url': zope_celery_redis.url + '/3',
        'ZOPE_CONF': str(tmp_path / 'missing.conf')}, timeout=30)
    with pytest.raises(RuntimeError, match=r'(?s)exited with .*missing\.conf'):
        worker.start()
    assert worker.process is None
    worker.close()


def test_write_zope_conf_needs_one_database(tmp_path):
    with pytest.raises(ValueError, match='either zodb_path or zeo_address'):
        testing.write_zope_conf(str(tmp_path / 'z.conf'), 'site.zcml')
    text = open(testing.write_zope_conf(
        str(tmp_path / 'z.conf'), 'site.zcml',
        zeo_address=('127.0.0.1', 8100))).read()
    assert 'server 127.0.0.1:8100' in text


class TestEndToEndLayerChecks:

    def layer(self, **resources):
        class Settings(plone.testing.Layer):
            def setUp(self):
                for key, value in resources.items():
                    self[key] = value
        settings = Settings(name='Settings')
        settings.setUp()
        return layer.EndToEndLayer(bases=(settings,), name='E2E')

    def test_1x_parameters_are_accepted(self):
        testing.check_celery_parameters(z3c.celery.conftest.celery_parameters())

    @pytest.mark.parametrize('parameters, message', [
        ({'broker': 'x'}, "'broker' is not supported"),
        ({'task_cls': 'celery:Task'}, 'task_cls must be TransactionAware'),
        ({'loader': 'default'}, 'loader must be ZopeLoader'),
    ])
    def test_other_parameters_are_refused(self, parameters, message):
        with pytest.raises(ValueError, match=message):
            testing.check_celery_parameters(parameters)

    def test_zope_conf_is_required(self):
        e2e = self.layer(celery_config={'broker_url': 'redis://x'})
        with pytest.raises(ValueError, match='celery_config needs ZOPE_CONF'):
            e2e.setUp()


class TestConftestFunctions:
    """1.x code called the fixture functions directly."""

    def test_celery_parameters(self):
        parameters = z3c.celery.conftest.celery_parameters()
        assert parameters['task_cls'] is z3c.celery.celery.TransactionAwareTask
        assert parameters['loader'] is z3c.celery.celery.ZopeLoader
        assert parameters['strict_typing'] is False

    def test_storage_file_and_zope_conf_generators(self):
        storage = z3c.celery.conftest.storage_file()
        path = next(storage)
        conf = z3c.celery.conftest.zope_conf(path)
        conf_path = next(conf)
        text = open(conf_path).read()
        assert f'path {path}' in text
        site = text.split('site-definition ')[1].split('\n')[0]
        assert 'zope.user' in open(site).read()
        config = z3c.celery.conftest.celery_config(conf_path)
        assert config['ZOPE_CONF'] == conf_path
        next(conf, None)
        next(storage, None)
        assert not os.path.exists(conf_path)
        assert not os.path.exists(os.path.dirname(path))

    def test_celery_config_reads_the_broker_from_the_environment(
            self, monkeypatch):
        monkeypatch.setenv('Z3C_CELERY_BROKER', 'redis://127.0.0.1:1/2')
        config = z3c.celery.conftest.celery_config('/zope.conf')
        assert config['broker_url'] == config['result_backend'] == \
            'redis://127.0.0.1:1/2'
        monkeypatch.delenv('Z3C_CELERY_BROKER')
        assert 'broker_url' not in z3c.celery.conftest.celery_config('/z')
