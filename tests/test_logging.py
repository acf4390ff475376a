"""z3c.celery.logging: task fields in log records, JSON, logging ini."""
import json
import logging

import pytest
import transaction
import zope.component

from z3c.celery.interfaces import ITask
from z3c.celery.logging import JsonFormatter
from z3c.celery.logging import TaskFormatter
from z3c.celery.logging import TaskId
from z3c.celery.logging import apply_logging_ini


TASKS = '''
  <celery:config dispatch="inline" />
  <celery:task name="w.log" handler="tests.site.tasks.log_line" />
'''


class Collect(logging.Handler):

    def __init__(self, formatter):
        super().__init__()
        self.setFormatter(formatter)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture
def collect():
    logger = logging.getLogger('tests.site')
    handlers = []

    def attach(formatter):
        handler = Collect(formatter)
        logger.addHandler(handler)
        handlers.append(handler)
        return handler
    yield attach
    for handler in handlers:
        logger.removeHandler(handler)


def record(msg='hello', **extra):
    r = logging.LogRecord('tests.site', logging.WARNING, __file__, 1, msg,
                          (), None)
    r.__dict__.update(extra)
    return r


def test_task_formatter_outside_a_task_gives_empty_fields():
    formatter = TaskFormatter('%(levelname)s [%(task_name)s|%(task_id)s] '
                              '%(message)s')
    assert formatter.format(record()) == 'WARNING [|] hello'


def test_task_formatter_in_a_task_names_it(load_zcml, db, login, collect):
    load_zcml(TASKS)
    login('zope.alice')
    handler = collect(TaskFormatter('[%(task_name)s|%(task_id)s] '
                                    '%(message)s'))
    result = zope.component.getUtility(ITask, 'w.log').delay('inside')
    transaction.commit()
    assert handler.lines == [f'[w.log|{result.id}] inside']


def test_task_formatter_shows_traceback_info():
    formatter = TaskFormatter('%(message)s')

    def failing():
        __traceback_info__ = 'while doing the thing'  # noqa: F841
        raise ValueError('boom')
    try:
        failing()
    except ValueError:
        import sys
        r = record('failed')
        r.exc_info = sys.exc_info()
    text = formatter.format(r)
    assert 'while doing the thing' in text
    assert 'ValueError: boom' in text


def test_json_formatter_writes_one_object_with_task_fields(
        load_zcml, db, login, collect):
    load_zcml(TASKS)
    login('zope.alice')
    handler = collect(JsonFormatter())
    result = zope.component.getUtility(ITask, 'w.log').delay('as json')
    transaction.commit()
    [line] = handler.lines
    data = json.loads(line)
    assert data['message'] == 'as json'
    assert data['levelname'] == 'WARNING'
    assert data['name'] == 'tests.site'
    assert data['task_id'] == result.id
    assert data['task_name'] == 'w.log'
    assert data['asctime'].endswith('+00:00')


def test_json_formatter_fields_from_format_extra_and_exc_info():
    formatter = JsonFormatter('%(levelname)s %(message)s %(task_id)s')
    try:
        raise KeyError('k')
    except KeyError:
        import sys
        r = record('failed', user='alice', obj=object())
        r.exc_info = sys.exc_info()
    data = json.loads(formatter.format(r))
    assert list(data)[:3] == ['levelname', 'message', 'task_id']
    assert data['task_id'] == ''
    assert data['user'] == 'alice'
    assert data['obj'].startswith('<object object')   # str() of it
    assert "KeyError: 'k'" in data['exc_info']
    assert 'asctime' not in data


def test_task_id_as_filter_adds_fields_and_keeps_records():
    r = record()
    assert TaskId().filter(r) is True
    assert (r.task_id, r.task_name) == ('', '')
    r = record(task_id='given', task_name='by extra')
    TaskId().filter(r)
    assert (r.task_id, r.task_name) == ('given', 'by extra')


INI = '''\
[loggers]
keys = root

[handlers]
keys = file

[formatters]
keys = task

[logger_root]
level = INFO
handlers = file

[handler_file]
class = FileHandler
args = ('%(here)s/out.log',)
formatter = task

[formatter_task]
class = z3c.celery.logging.TaskFormatter
format = %(levelname)s [%(task_id)s] %(name)s: %(message)s
'''


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_apply_logging_ini_keeps_existing_loggers(tmp_path, restore_logging):
    existing = logging.getLogger('tests.existing.logger')
    ini = tmp_path / 'logging.ini'
    ini.write_text(INI)
    apply_logging_ini(str(ini))
    assert not existing.disabled
    existing.warning('still here')
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert (tmp_path / 'out.log').read_text() == (
        'WARNING [] tests.existing.logger: still here\n')


def test_apply_logging_ini_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.ini'):
        apply_logging_ini(str(tmp_path / 'missing.ini'))
