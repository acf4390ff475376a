"""Starting a worker: the 1.x ways (celeryconfig), solo and threads pools
over a FileStorage, the logging ini, and a clear error without zope.conf."""
import os
import time

import transaction
import ZODB
import ZODB.FileStorage
import zope.component
import zope.component.testing
import zope.security.management
from zope.configuration import xmlconfig

from z3c.celery.interfaces import ITask
from z3c.celery.testing import get_principal
from z3c.celery.testing import login_principal
from z3c.celery.worker import markers

from tests import workers


LOGGING_INI = '''\
[loggers]
keys = root

[handlers]
keys = console

[formatters]
keys = task

[logger_root]
level = INFO
handlers = console

[handler_console]
class = StreamHandler
args = (sys.stderr,)
formatter = task

[formatter_task]
class = z3c.celery.logging.TaskFormatter
format = LOGINI %(levelname)s [%(task_name)s|%(task_id)s] %(message)s
'''


def client_of(site):
    zope.component.testing.setUp()
    xmlconfig.file(site.site_zcml)
    login_principal(get_principal('zope.alice'))


def client_done():
    transaction.abort()
    zope.security.management.endInteraction()
    zope.component.testing.tearDown()


def read_filestorage(path):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
    try:
        with db.transaction() as conn:
            root = conn.root()
            done = root.get(markers.CONTAINER_KEY) or {}
            return dict(root['data']), sum(
                len(partition) for generation in done.values()
                for partition in generation.values())
    finally:
        db.close()


def run_tasks(site):
    """Queue two tasks as Alice; their results."""
    client_of(site)
    try:
        whoami = zope.component.getUtility(ITask, 'w.whoami').delay('before')
        record = zope.component.getUtility(ITask, 't.record').delay(
            'written', 7, _principal_id_='zope.bob')
        logged = zope.component.getUtility(ITask, 'w.log').delay('hello')
        transaction.commit()
        return (workers.result_of(whoami), workers.result_of(record),
                workers.result_of(logged), logged.id)
    finally:
        client_done()


def test_solo_over_filestorage_with_1x_config_module(tmp_path, redis):
    """``celery --config celeryconfig`` naming ZOPE_CONF, as in 1.x."""
    fs = workers.prepare_filestorage(str(tmp_path / 'Data.fs'),
                                     {'before': 'committed'})
    site = workers.write_site(str(tmp_path / 'site'), redis.url + '/1',
                              fs_path=fs)
    (tmp_path / 'celeryconfig.py').write_text(
        f'ZOPE_CONF = {site.zope_conf!r}\n')
    worker = workers.Worker(config='celeryconfig', directory=str(tmp_path),
                            broker_url=site.broker_url, pool='solo')
    with worker:
        whoami, record, logged, _ = run_tasks(site)
    assert whoami == {'principal': 'zope.alice', 'site': 'Folder',
                      'value': 'committed'}
    assert record == 7
    data, markers_count = read_filestorage(fs)
    assert data['written'] == (7, 'zope.bob')
    assert markers_count == 1   # the one task that wrote
    assert 'Zope environment ready' in worker.log()


def test_threads_with_1x_config_file_and_logging_ini(tmp_path, redis):
    """``CELERY_CONFIG_FILE`` naming ZOPE_CONF and LOGGING_INI."""
    fs = workers.prepare_filestorage(str(tmp_path / 'Data.fs'),
                                     {'before': 'committed'})
    site = workers.write_site(str(tmp_path / 'site'), redis.url + '/2',
                              fs_path=fs)
    ini = tmp_path / 'logging.ini'
    ini.write_text(LOGGING_INI)
    config = tmp_path / 'config.py'
    config.write_text(f'ZOPE_CONF = {site.zope_conf!r}\n'
                      f'LOGGING_INI = {str(ini)!r}\n')
    worker = workers.Worker(env={'CELERY_CONFIG_FILE': str(config)},
                            broker_url=site.broker_url, pool='threads',
                            concurrency=2, directory=str(tmp_path))
    with worker:
        whoami, record, logged, log_id = run_tasks(site)
        worker.wait_for_log(rf'LOGINI WARNING \[w\.log\|{log_id}\] hello')
    assert whoami['principal'] == 'zope.alice'
    assert whoami['value'] == 'committed'
    assert read_filestorage(fs)[0]['written'] == (7, 'zope.bob')
    # Outside tasks the task fields are empty.
    assert 'LOGINI INFO [|] Zope environment ready' in worker.log()


def test_zope_conf_option_wins_over_the_setting(tmp_path, redis):
    fs = workers.prepare_filestorage(str(tmp_path / 'Data.fs'))
    site = workers.write_site(str(tmp_path / 'site'), redis.url + '/3',
                              fs_path=fs)
    config = tmp_path / 'config.py'
    config.write_text("ZOPE_CONF = '/nonexistent/zope.conf'\n")
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            env={'CELERY_CONFIG_FILE': str(config)},
                            directory=str(tmp_path))
    with worker:
        assert worker.ping()


def test_without_zope_conf_the_worker_exits_at_once_saying_what_to_set(
        tmp_path):
    worker = workers.Worker(directory=str(tmp_path))
    started = time.monotonic()
    worker.start(wait=False)
    try:
        code = worker.wait_exit(timeout=30)
    finally:
        worker.stop()
    assert code != 0
    assert time.monotonic() - started < 30
    log = worker.log()
    assert 'no zope.conf to load' in log
    assert '--zope-conf' in log and 'ZOPE_CONF' in log
    assert 'CELERY_CONFIG_FILE' in log


def test_invalid_zope_conf_names_file_and_cause(tmp_path):
    conf = tmp_path / 'zope.conf'
    conf.write_text('<zodb>\n  <filestorage>\n  </filestorage>\n</zodb>\n')
    worker = workers.Worker(str(conf), directory=str(tmp_path))
    worker.start(wait=False)
    try:
        assert worker.wait_exit(timeout=30) != 0
    finally:
        worker.stop()
    log = worker.log()
    assert f'Invalid zope.conf {conf}' in log
    assert 'path' in log


def test_missing_zope_conf_file_is_a_usage_error(tmp_path):
    missing = os.path.join(str(tmp_path), 'missing.conf')
    worker = workers.Worker(missing, directory=str(tmp_path))
    worker.start(wait=False)
    try:
        assert worker.wait_exit(timeout=30) != 0
    finally:
        worker.stop()
    assert "'--zope-conf'" in worker.log()
    assert 'does not exist' in worker.log()
