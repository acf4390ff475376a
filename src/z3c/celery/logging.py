"""Log records that name the task they were written in.

``TaskFormatter`` (1.x name) makes ``%(task_id)s`` and ``%(task_name)s``
available to a format; outside a task both are empty strings, so it serves
as the one formatter of a process.  ``JsonFormatter`` writes one JSON
object per record, with the task fields.  ``TaskId`` is what both share:
a formatter mix-in (as in 1.x) that is also usable on its own as a
logging filter (``filters = taskid`` in an ini file, ``()`` in dictConfig).

Apply an ini file with `apply_logging_ini` (what the worker does for
``--logging-ini`` / ``LOGGING_INI``)::

    [formatter_generic]
    class = z3c.celery.logging.TaskFormatter
    format = %(asctime)s %(levelname)s [%(task_name)s %(task_id)s] %(message)s
"""
import datetime
import json
import logging
import logging.config
import os
import re

import zope.exceptions.log
from celery._state import get_current_task


def task_fields():
    """``task_id`` and ``task_name`` of the task running in this thread.

    Both are '' outside a task (and in a task called directly).
    """
    task = get_current_task()
    request = getattr(task, 'request', None)
    if task is None or request is None or request.called_directly:
        return {'task_id': '', 'task_name': ''}
    return {'task_id': request.id or '', 'task_name': task.name or ''}


class TaskId:
    """Adds ``task_id`` and ``task_name`` to log records.

    As a base of a formatter (its ``format``) or as a filter (``filter``,
    never dropping a record).  Values a record already has (``extra=``)
    are kept.
    """

    def _add_task_fields(self, record):
        for key, value in task_fields().items():
            if not getattr(record, key, None):
                setattr(record, key, value)

    def format(self, record):
        self._add_task_fields(record)
        return super().format(record)

    def filter(self, record):
        self._add_task_fields(record)
        return True


class TaskFormatter(TaskId, zope.exceptions.log.Formatter):
    """A formatter whose format may use ``%(task_id)s`` / ``%(task_name)s``.

    Based on zope.exceptions' formatter, so ``__traceback_info__`` shows in
    tracebacks, as in 1.x.
    """


#: Attributes every LogRecord has; the rest came with ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord(
    '', 0, '', 0, '', (), None))) | {'message', 'asctime'}

_FIELD = re.compile(r'%\((\w+)\)')


class JsonFormatter(TaskId, logging.Formatter):
    """One JSON object per record (one line), with the task fields.

    The fields are those named in the format (``%(name)s`` placeholders,
    as python-json-logger takes them), by default time, level, logger,
    message, task id and name; then whatever was passed with ``extra=``,
    and ``exc_info`` when there is a traceback.  Values JSON cannot hold
    are written with ``str()``.
    """

    default_fields = ('asctime', 'levelname', 'name', 'message',
                      'task_id', 'task_name')

    def __init__(self, fmt=None, datefmt=None, style='%', validate=True,
                 **kw):
        super().__init__(fmt, datefmt, style, validate=False, **kw)
        self.fields = tuple(_FIELD.findall(fmt)) if fmt else \
            self.default_fields

    def usesTime(self):
        return 'asctime' in self.fields

    def formatTime(self, record, datefmt=None):
        if datefmt:
            return super().formatTime(record, datefmt)
        return datetime.datetime.fromtimestamp(
            record.created, datetime.timezone.utc).isoformat(
                timespec='milliseconds')

    def format(self, record):
        self._add_task_fields(record)
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        data = {field: getattr(record, field, None) for field in self.fields}
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in data and \
                    not key.startswith('_'):
                data[key] = value
        if record.exc_info:
            data['exc_info'] = self.formatException(record.exc_info)
        elif record.exc_text:
            data['exc_info'] = record.exc_text
        if record.stack_info:
            data['stack_info'] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str)


def apply_logging_ini(path):
    """Configure logging from the ini file at *path*.

    ``logging.config.fileConfig`` with the loggers that exist kept
    (``disable_existing_loggers=False``); ``%(here)s`` is the file's
    directory and ``%(__file__)s`` the file, as in a paste.ini.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Logging configuration not found: {path}')
    logging.config.fileConfig(
        path, {'__file__': path, 'here': os.path.dirname(path)},
        disable_existing_loggers=False)
