"""Schemas of the ``<celery:config>``, ``<celery:task>`` and
``<celery:schedule>`` directives.

Each field's title and description is the directive's reference
documentation.  ``<celery:config>`` accepts every Celery setting as an
attribute; its schema is generated from Celery's own table of settings
(``celery.app.defaults``), so a misspelt setting is an unknown attribute.
"""
import ast

import zope.configuration.fields
import zope.interface
import zope.schema
from celery.app.defaults import NAMESPACES
from celery.app.defaults import flatten


@zope.interface.implementer(zope.schema.interfaces.IFromUnicode)
class PythonLiteral(zope.schema.Field):
    """A Python literal (dict, list, tuple, number, string, ...).

    With ``text_fallback``, a value that is no literal is taken as text.
    """

    def __init__(self, text_fallback=False, **kw):
        self.text_fallback = text_fallback
        super().__init__(**kw)

    def fromUnicode(self, value):
        try:
            result = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            if self.text_fallback:
                return value
            raise zope.schema.ValidationError(
                f'{value!r} is not a Python literal (e.g. {{"key": 1}})'
            ).with_field_and_value(self, value)
        self.validate(result)
        return result


class Tokens(zope.configuration.fields.Tokens):
    """Space-separated words, as a tuple (Celery's list settings)."""

    def fromUnicode(self, value):
        return tuple(super().fromUnicode(value))


def _field(name, option):
    kind = option.type
    title = name.replace('_', ' ')
    description = (
        f'Celery setting ``{name}`` (default: {option.default!r}).')
    common = dict(title=title, description=description, required=False)
    if kind in ('int', int):
        return zope.schema.Int(**common)
    if kind == 'float':
        return zope.schema.Float(**common)
    if kind == 'bool':
        return zope.configuration.fields.Bool(**common)
    if kind in ('list', 'tuple'):
        return Tokens(value_type=zope.schema.TextLine(), **common)
    if kind == 'dict':
        return PythonLiteral(**common)
    if kind == 'any':
        return PythonLiteral(text_fallback=True, **common)
    return zope.schema.TextLine(**common)


def _celery_setting_fields():
    return {name: _field(name, option)
            for name, option in flatten(NAMESPACES)}


class ICeleryConfigBase(zope.interface.Interface):
    """Configure the Celery app ``z3c.celery.CELERY``.

    Settings are applied in this order, later ones winning: ``module``,
    ``file``, then the attributes.  One per site: a second one is a
    configuration conflict, which ``includeOverrides`` resolves.
    """

    file = zope.configuration.fields.Path(
        title='Celery configuration file',
        description='A Python file (``celeryconfig.py``) whose public names '
                    'are settings; relative to the ZCML file.',
        required=False)

    module = zope.configuration.fields.GlobalObject(
        title='Celery configuration module',
        description='Dotted name of a module whose public names are '
                    'settings.',
        required=False)

    dispatch = zope.schema.Choice(
        title='Dispatch mode',
        description='How tasks leave at commit: ``outbox`` (the default: '
                    'stored in the ZODB with the data and relayed if the '
                    'broker is away), ``after-commit`` (published after '
                    'commit, nothing stored) or ``inline`` (run in this '
                    'process after commit; for tests).',
        values=('outbox', 'after-commit', 'inline'),
        required=False)

    outbox_grace_period = zope.schema.Float(
        title='Outbox grace period',
        description='Seconds; the relay leaves outbox records younger than '
                    'this to the process that committed them (which '
                    'publishes them right after its commit).  Default: 10.',
        required=False, min=0.0)

    outbox_relay_interval = zope.schema.Float(
        title='Outbox relay interval',
        description='Seconds between two runs of the relay in the worker; '
                    '0 runs no relay there.  Also how long a process waits '
                    'before trying the broker again after a failed publish.'
                    '  Default: 5.',
        required=False, min=0.0)

    outbox_max_attempts = zope.schema.Int(
        title='Outbox maximum attempts',
        description='A record whose publishing failed this many times is '
                    'moved to the dead letters (``celery outbox retry`` '
                    'puts it back).  A broker that cannot be reached does '
                    'not count as an attempt.  Default: 10.',
        required=False, min=1)

    conflict_in_process = zope.schema.Int(
        title='Conflict attempts in the process',
        description='After a write conflict the task runs again at once, '
                    'in the same process, this many times per delivery '
                    '(as Zope\'s publisher retries a request); then it '
                    'goes back to the broker with a countdown.  Default: '
                    '6.',
        required=False, min=0)

    conflict_backoff_base = zope.schema.Float(
        title='Conflict retry backoff base',
        description='Seconds; the n-th retry after a write conflict waits '
                    'about base * 2**n (jittered, capped).',
        required=False, min=0.0)

    conflict_backoff_cap = zope.schema.Float(
        title='Conflict retry backoff cap',
        description='Seconds; the longest wait between conflict retries.',
        required=False, min=0.0)

    zodb_database = zope.schema.TextLine(
        title='Database name',
        description='Name of the ``IDatabase`` (a database of zope.conf) '
                    'tasks run against and that holds the outbox; the main '
                    '(unnamed) one by default.',
        required=False)

    ZOPE_CONF = zope.configuration.fields.Path(
        title='zope.conf (1.x setting)',
        description='The zope.conf a worker loads; prefer the worker '
                    'option ``--zope-conf``.',
        required=False)

    LOGGING_INI = zope.configuration.fields.Path(
        title='Logging configuration (1.x setting)',
        description='An ini file applied with logging.config.fileConfig '
                    'in the worker.',
        required=False)

    worker_boot_timeout = zope.schema.Float(
        title='Worker boot timeout (1.x setting)',
        description='Seconds a prefork pool process may take to start '
                    '(opening its databases included); sets Celery\'s '
                    '``worker_proc_alive_timeout``.',
        required=False, min=0.0)

    done_markers = zope.configuration.fields.Bool(
        title='Done-markers',
        description='Commit a marker for the task id with the writes of '
                    'each task that writes to the ZODB, and skip a '
                    'redelivered task already marked (effectively once).  '
                    'Default: true.',
        required=False)

    done_marker_retention = zope.schema.Int(
        title='Done-marker retention',
        description='Seconds a done-marker is kept at least (it is dropped '
                    'within twice that).  Longer than any redelivery delay '
                    '(the broker\'s visibility timeout, outbox relaying).  '
                    'Default: 604800 (7 days).',
        required=False, min=1)

    signing_secret = zope.schema.TextLine(
        title='Message signing secret',
        description='Sign every task message with this secret (HMAC-SHA256 '
                    'over task name, id, arguments, principal id, times, '
                    'retries and follow-up tasks); a '
                    'worker with it refuses messages not signed with it.  '
                    'Set the same secret on the sending and the worker '
                    'side.  Default: none (messages are not signed).',
        required=False, min_length=16)

    message_size_limit = zope.schema.Int(
        title='Largest message',
        description='Bytes the serialized arguments of one task may take: '
                    'delay() refuses more (TypeError naming the limit), a '
                    'worker refuses a message body of more.  0: no limit.  '
                    'Default: 4194304 (4 MiB).',
        required=False, min=0)


#: Names that are ours, not Celery's (``file`` and ``module`` excluded).
Z3C_FIELDS = tuple(
    name for name in ICeleryConfigBase.names() if name not in (
        'file', 'module'))

ICeleryConfigDirective = zope.interface.interface.InterfaceClass(
    'ICeleryConfigDirective',
    bases=(ICeleryConfigBase,),
    attrs={name: field for name, field in _celery_setting_fields().items()
           if name not in ICeleryConfigBase.names()},
    __module__=__name__,
)


class ITaskDirective(zope.interface.Interface):
    """Register a task: an ``ITask`` utility and a task of the Celery app."""

    name = zope.schema.ASCIILine(
        title='Task name',
        description='The Celery task name, also the name of the ITask '
                    'utility and of per-task component registrations.',
        required=True)

    handler = zope.configuration.fields.GlobalObject(
        title='Task function',
        description='Dotted name of the callable that does the work.',
        required=True)

    bind = zope.configuration.fields.Bool(
        title='Bind',
        description='Pass the task object as first argument (to read '
                    '``self.request.id``).',
        required=False, default=False)

    queue = zope.schema.ASCIILine(
        title='Queue', description='Default queue of the task.',
        required=False)

    max_retries = PythonLiteral(
        title='Maximum retries',
        description='How many times a write conflict is retried; ``None`` '
                    'means no limit.  Default: 10.',
        required=False)

    rate_limit = zope.schema.ASCIILine(
        title='Rate limit', description='Celery rate limit, e.g. ``10/m``.',
        required=False)

    ignore_result = zope.configuration.fields.Bool(
        title='Ignore result', required=False)

    time_limit = zope.schema.Float(
        title='Hard time limit (seconds)', required=False, min=0.0)

    soft_time_limit = zope.schema.Float(
        title='Soft time limit (seconds)', required=False, min=0.0)

    serializer = zope.schema.ASCIILine(
        title='Serializer', description='e.g. ``json`` or ``pickle``.',
        required=False)

    acks_late = zope.configuration.fields.Bool(
        title='Late acknowledgement',
        description='Default: true (see "Effectively once").',
        required=False)

    conflict_in_process = zope.schema.Int(
        title='Conflict attempts in the process',
        description='This task\'s ``conflict_in_process`` (see '
                    '``<celery:config>``).',
        required=False, min=0)

    conflict_backoff_base = zope.schema.Float(
        title='Conflict retry backoff base',
        description='This task\'s ``conflict_backoff_base`` (see '
                    '``<celery:config>``).',
        required=False, min=0.0)

    conflict_policy = zope.configuration.fields.GlobalObject(
        title='Conflict policy factory',
        description='Called without arguments; the ``IConflictPolicy`` of '
                    'this task only.',
        required=False)

    principal_resolver = zope.configuration.fields.GlobalObject(
        title='Principal resolver factory',
        description='Called without arguments; the ``IPrincipalResolver`` '
                    'of this task only.',
        required=False)

    after_abort = zope.configuration.fields.GlobalObject(
        title='After-abort handler factory',
        description='Called without arguments; the ``IAfterAbortHandler`` '
                    'of this task only.',
        required=False)


class IScheduleDirective(zope.interface.Interface):
    """A periodic task: an entry of Celery's beat schedule.

    ``celery beat`` (or ``celery worker -B``) started with the site's
    zope.conf sends the task on this schedule, each tick in a transaction
    of its own.  Give either ``seconds`` or ``crontab``.  Entries are added
    to the ``beat_schedule`` setting (``<celery:config>``, a
    celeryconfig); an entry name used twice is a configuration conflict.
    """

    name = zope.schema.TextLine(
        title='Entry name',
        description='The name of the schedule entry (unique in the site).',
        required=True)

    task = zope.schema.TextLine(
        title='Task name',
        description='The Celery name of the task to send.',
        required=True)

    seconds = zope.schema.Float(
        title='Interval',
        description='Send the task every this many seconds (more than 0).',
        required=False)

    crontab = zope.schema.TextLine(
        title='Crontab',
        description='Send the task on this crontab schedule: the five '
                    'fields minute, hour, day of month, month and day of '
                    'week, as in a crontab (``*/5 * * * *``: every five '
                    'minutes), in the app\'s timezone.',
        required=False)

    args = PythonLiteral(
        title='Positional arguments',
        description='A Python list or tuple, e.g. ``["daily", 3]``.',
        required=False)

    kwargs = PythonLiteral(
        title='Keyword arguments',
        description='A Python dict, e.g. ``{"days": 3}``.',
        required=False)

    principal = zope.schema.TextLine(
        title='Principal',
        description='Id of the principal the task runs as.  Default: the '
                    'site\'s unauthenticated principal '
                    '(``<unauthenticatedPrincipal>``); without one the '
                    'task runs with no principal and beat warns when it '
                    'starts.',
        required=False)

    queue = zope.schema.ASCIILine(
        title='Queue',
        description='The queue to send the task to (default: the '
                    'task\'s).',
        required=False)

    options = PythonLiteral(
        title='More sending options',
        description='A Python dict of ``apply_async`` options, e.g. '
                    '``{"expires": 30, "priority": 5}``.',
        required=False)
