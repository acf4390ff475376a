"""Setting a worker up in-process: zope.conf loading, databases, the
bootstep's settings and options."""
import sys

import pytest
import ZODB
import ZODB.interfaces
import ZODB.POSException
import zope.component
import zope.component.hooks
from celery.utils.imports import symbol_by_name

import z3c.celery
from z3c.celery import database
from z3c.celery.interfaces import ITask
from z3c.celery.worker import bootsteps
from z3c.celery.worker import markers
from z3c.celery.worker import zopeconf

from tests import workers


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
    preload = {option.name for option in
               z3c.celery.CELERY.user_options['preload']}
    # --zope-conf is a preload option, which Celery gives every subcommand
    # (the worker too: not twice).
    assert 'logging_ini' in names and 'zope_conf' not in names
    assert preload == {'zope_conf'}
    # Named, so that a process that only queues tasks does not import it.
    steps = {symbol_by_name(step) for step in z3c.celery.CELERY.steps['worker']}
    assert bootsteps.ZopeEnvironment in steps
