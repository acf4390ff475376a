"""Handlers of the ``<celery:config>``, ``<celery:task>`` and
``<celery:schedule>`` directives.

They validate and record actions; nothing touches the component registry
or the Celery app until the configuration machine executes the actions.
"""
import datetime
import math

import celery.schedules
import zope.component.zcml
import zope.testing.cleanup
from zope.configuration.exceptions import ConfigurationError

from z3c.celery import CELERY
from z3c.celery import settings as settings_module
from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.interfaces import IConflictPolicy
from z3c.celery.interfaces import IPrincipalResolver
from z3c.celery.interfaces import ITask
from z3c.celery.message import PRINCIPAL_KEY


def config(_context, file=None, module=None, **settings):
    """``<celery:config>``: see `ICeleryConfigDirective`."""
    values = {}
    if module is not None:
        values.update(settings_module.settings_from_module(module))
    if file is not None:
        try:
            values.update(settings_module.settings_from_file(file))
        except OSError as e:
            raise ConfigurationError(
                f'Cannot read the Celery configuration file {file}: {e}')
        except Exception as e:
            raise ConfigurationError(
                f'The Celery configuration file {file} failed: '
                f'{type(e).__name__}: {e}')
    values.update({k: v for k, v in settings.items() if v is not None})
    _context.action(
        discriminator=('celery:config',),
        callable=settings_module.configure_app,
        args=(CELERY, values),
    )


_COMPONENTS = (
    ('conflict_policy', IConflictPolicy),
    ('principal_resolver', IPrincipalResolver),
    ('after_abort', IAfterAbortHandler),
)

_TASK_OPTIONS = ('bind', 'queue', 'max_retries', 'rate_limit',
                 'ignore_result', 'time_limit', 'soft_time_limit',
                 'serializer', 'acks_late')


def task(_context, name, handler, **options):
    """``<celery:task>``: see `ITaskDirective`."""
    if not callable(handler):
        raise ConfigurationError(
            f'The handler of task {name!r} is not callable: {handler!r}')
    max_retries = options.get('max_retries')
    if max_retries is not None and (
            not isinstance(max_retries, int) or max_retries < 0):
        raise ConfigurationError(
            f'max_retries of task {name!r} must be a whole number >= 0 or '
            f'None, not {max_retries!r}')
    # zope.configuration passes only the attributes that were written
    # (and those with a default), so max_retries="None" arrives as None.
    task_options = {key: options[key] for key in _TASK_OPTIONS
                    if key in options}
    # The discriminator is zope.component's, so a second task (or a
    # plain <utility>) of the same name is a conflict naming both places.
    _context.action(
        discriminator=('utility', ITask, name),
        callable=register_task,
        args=(CELERY, name, handler, task_options),
    )
    for attribute, interface in _COMPONENTS:
        factory = options.get(attribute)
        if factory is None:
            continue
        if not callable(factory):
            raise ConfigurationError(
                f'{attribute} of task {name!r} is not callable: '
                f'{factory!r}')
        _context.action(
            discriminator=('utility', interface, name),
            callable=register_component,
            args=(factory, interface, name, _context.info),
        )


def register_task(app, name, handler, options):
    """Action: create the Celery task and register it as ``ITask``."""
    existing = app.tasks.get(name)
    if existing is not None and getattr(existing, '__wrapped__', None) \
            not in (None, handler) and not getattr(
                existing, '_z3c_zcml', False):
        raise ConfigurationError(
            f'Task {name!r} is already defined in Python by '
            f'{existing.__wrapped__!r}; rename one of them')
    if existing is not None:
        app.tasks.unregister(name)
    task = app.task(handler, name=name, lazy=False, _z3c_zcml=True,
                    **options)
    zope.component.zcml.handler('registerUtility', task, ITask, name)
    _zcml_tasks.append((app, name))
    return task


def register_component(factory, interface, name, info):
    """Action: make *factory*'s product the *interface* of task *name*."""
    component = factory()
    if not interface.providedBy(component):
        raise ConfigurationError(
            f'{factory!r} made {component!r}, which does not provide '
            f'{interface.__name__}')
    zope.component.zcml.handler(
        'registerUtility', component, interface, name, info)


_zcml_tasks = []


def _forget_zcml_tasks():
    while _zcml_tasks:
        app, name = _zcml_tasks.pop()
        if name in app.tasks:
            app.tasks.unregister(name)


zope.testing.cleanup.addCleanUp(_forget_zcml_tasks)


def schedule(_context, name, task, seconds=None, crontab=None, args=None,
             kwargs=None, principal=None, queue=None, options=None):
    """``<celery:schedule>``: see `IScheduleDirective`."""
    if (seconds is None) == (crontab is None):
        raise ConfigurationError(
            f'Schedule entry {name!r}: give either seconds or crontab '
            f'({"both were" if seconds is not None else "neither was"} '
            f'given)')
    if seconds is not None:
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ConfigurationError(
                f'Schedule entry {name!r}: seconds must be more than 0 '
                f'(and finite), not {seconds!r}')
        when = celery.schedules.schedule(datetime.timedelta(seconds=seconds))
    else:
        when = parse_crontab(name, crontab)
    if args is not None and not isinstance(args, (list, tuple)):
        raise ConfigurationError(
            f'Schedule entry {name!r}: args must be a list or tuple, not '
            f'{args!r}')
    for label, value in (('kwargs', kwargs), ('options', options)):
        if value is not None and not (
                isinstance(value, dict)
                and all(isinstance(key, str) for key in value)):
            raise ConfigurationError(
                f'Schedule entry {name!r}: {label} must be a dict with '
                f'string keys, not {value!r}')
    entry_options = dict(options or {})
    if queue is not None:
        entry_options['queue'] = queue
    if principal is not None:
        entry_options[PRINCIPAL_KEY] = principal
    entry = {'task': task, 'schedule': when, 'args': tuple(args or ()),
             'kwargs': dict(kwargs or {}), 'options': entry_options}
    # After <celery:config> (order 0), whose beat_schedule it extends.
    _context.action(
        discriminator=('celery:schedule', name),
        callable=add_schedule_entry,
        args=(CELERY, name, entry),
        order=1,
    )


def parse_crontab(name, text):
    """A Celery ``crontab`` of the five fields of a crontab line."""
    fields = text.split()
    if len(fields) != 5:
        raise ConfigurationError(
            f'Schedule entry {name!r}: crontab {text!r} must have five '
            f'fields (minute hour day-of-month month day-of-week), e.g. '
            f'"*/5 * * * *"')
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return celery.schedules.crontab(
            minute=minute, hour=hour, day_of_month=day_of_month,
            month_of_year=month_of_year, day_of_week=day_of_week)
    except (ValueError, KeyError, IndexError) as e:
        raise ConfigurationError(
            f'Schedule entry {name!r}: crontab {text!r} is not valid: '
            f'{e}') from None


def add_schedule_entry(app, name, entry):
    """Action: add *entry* to *app*'s ``beat_schedule`` as *name*."""
    current = dict(settings_module.loaded_conf(app).beat_schedule or {})
    if name in current and name not in _zcml_entries:
        raise ConfigurationError(
            f'Schedule entry {name!r} is defined both by <celery:schedule> '
            f'and in the beat_schedule setting; rename one of them')
    current[name] = entry
    settings_module.configure_app(app, {'beat_schedule': current})
    _zcml_entries.add(name)


_zcml_entries = set()
zope.testing.cleanup.addCleanUp(_zcml_entries.clear)
