"""The application: ``ZopeCelery``, its task class and its loader.

These are the three places where Celery lets an integration in
(``task_cls``, ``loader``, the app itself), and the one module that ties
the sending side (`z3c.celery.sending`, `z3c.celery.outbox`) to the
worker's runner (`z3c.celery.worker.runner`).  See docs/design.rst.
"""
import logging
import os
from collections import defaultdict

import celery
import celery.loaders.app
import kombu.exceptions
import kombu.serialization
import zope.component
import zope.interface
from celery.utils import uuid

from z3c.celery import settings
from z3c.celery import signing
from z3c.celery.interfaces import IDispatcher
from z3c.celery.interfaces import ITask
from z3c.celery.message import RESENT_HEADER
from z3c.celery.message import TID_HEADER
from z3c.celery.message import TaskMessage
from z3c.celery.message import commit_token
from z3c.celery.outbox.dispatcher import OutboxDispatcher
from z3c.celery.sending import dispatchers
from z3c.celery.sending import queue
from z3c.celery.sending.result import QueuedResult
from z3c.celery.worker import runner
from z3c.celery.worker.components import current_principal_id


log = logging.getLogger(__name__)

_MISSING = object()

#: The worker's parts, named so that a process that only queues tasks
#: never imports them: Celery imports a step when a worker is built.
ZOPE_ENVIRONMENT_STEP = 'z3c.celery.worker.bootsteps:ZopeEnvironment'
OUTBOX_RELAY_STEP = 'z3c.celery.outbox.relay:OutboxRelayStep'
MESSAGE_GUARD_STEP = 'z3c.celery.worker.guard:MessageGuard'


class _UserOptions(defaultdict):
    """``app.user_options``, with our command-line options added when the
    ``celery`` command first asks for them (click is loaded by then)."""

    def __init__(self):
        super().__init__(set)
        self._ours = False

    def _add_ours(self):
        if not self._ours:
            self._ours = True
            from z3c.celery.worker import bootsteps  # the command's side
            for command, options in bootsteps.command_options().items():
                super().__getitem__(command).update(options)

    def __getitem__(self, key):
        self._add_ours()
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._add_ours()
        return super().get(key, default)


class ZopeCelery(celery.Celery):
    """Celery app whose tasks run in the Zope environment.

    Tasks it creates are `TransactionAwareTask`: they are queued in the
    current transaction and sent at commit.  Its worker loads the site
    (``--zope-conf``) and runs the outbox relay.
    """

    task_cls = 'z3c.celery.app:TransactionAwareTask'
    loader_cls = 'z3c.celery.app:ZopeLoader'
    #: Its worker loads the site (see `z3c.celery.worker.bootsteps`).
    zope_environment = True

    def __init__(self, *args, **kw):
        kw.setdefault('task_cls', self.task_cls)
        kw.setdefault('loader', self.loader_cls)
        kw.setdefault('set_as_current', False)
        super().__init__(*args, **kw)
        self.user_options = _UserOptions()
        self.steps['worker'].add(ZOPE_ENVIRONMENT_STEP)
        self.steps['worker'].add(OUTBOX_RELAY_STEP)
        # Checks what arrives before Celery reads it (poison, forgeries).
        self.steps['consumer'].add(MESSAGE_GUARD_STEP)

    def z3c_setting(self, name):
        """Return one of our settings (see `z3c.celery.settings`)."""
        # Read several times per task run: a plain look-up in each layer
        # (changes, celeryconfig, Celery's defaults) costs a fraction of
        # Settings.get, which also tries Celery's old setting names; and
        # no KeyError raised per layer that lacks it.
        for layer in self.conf.maps:
            value = layer.get(name, _MISSING)
            if value is not _MISSING:
                return value
        return settings.DEFAULTS[name]

    def z3c_settings(self, *names):
        """Several of our settings at once, in a tuple."""
        return tuple(self.z3c_setting(name) for name in names)

    def dispatcher(self):
        """The `IDispatcher` of the configured dispatch mode.

        ``task_always_eager`` (1.x's eager mode) wins; otherwise the
        ``dispatch`` setting names an `IDispatcher` utility, else one of
        the built-in modes.
        """
        mode = 'eager' if self.conf.task_always_eager else \
            self.z3c_setting('dispatch')
        found = zope.component.queryUtility(IDispatcher, name=mode)
        if found is None:
            found = _builtin_dispatcher(mode)
        return found

    def send_task(self, name, args=None, kwargs=None, **options):
        """Celery's ``send_task``; in a transaction, like ``delay()``.

        In a Zope context (a request, a running task, a script with the
        database open: see `z3c.celery.sending.queue.in_zope_context`) the
        task is queued in the current transaction and sent after it
        commits, with the principal of the interaction (or
        ``_principal_id_``), and its arguments are checked now.
        Elsewhere (``celery call``, Flower, a plain script) it is sent at
        once, as Celery does: `send_task_now`.
        """
        if not queue.in_zope_context():
            return self.send_task_now(name, args, kwargs, **options)
        for name_ in _NOT_KEPT:
            options.pop(name_, None)
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        principal_id = kwargs.pop(
            '_principal_id_', options.pop('_principal_id_', _MISSING))
        if principal_id is _MISSING:
            principal_id = current_principal_id()
        check_serializable(name, args, kwargs, options.get('serializer')
                           or self.conf.task_serializer,
                           self.z3c_setting('message_size_limit'))
        task_id = options.pop('task_id', None) or uuid()
        message = TaskMessage(name, args, kwargs, options, task_id,
                              principal_id)
        # The message keeps a weak reference only: the caller holds it.
        result = message.result = QueuedResult(task_id, task_name=name,
                                               app=self)
        queue.queue_message(self, message)
        return result

    def send_task_now(self, name, args=None, kwargs=None,
                      _z3c_token=_MISSING, _z3c_secret=_MISSING, **options):
        """Celery's ``send_task``, at once, with our message headers.

        Every message leaves through here (dispatch, outbox relay, Celery
        retries): each carries the last transaction id this process knows
        of its database (so that the worker reads at least that state) and,
        when ``signing_secret`` is set, a signature.  (`publish` looks
        both up once for all the messages it sends.)
        """
        token = commit_token(self) if _z3c_token is _MISSING else _z3c_token
        if token:
            options['headers'] = dict(options.get('headers') or {},
                                      **{TID_HEADER: token})
        secret = self.z3c_setting('signing_secret') \
            if _z3c_secret is _MISSING else _z3c_secret
        if secret:
            # Signed from the message as Celery builds it (times made
            # absolute, follow-ups in its body): see `signing`.
            with signing.signing_with(secret):
                return super().send_task(name, args, kwargs, **options)
        return super().send_task(name, args, kwargs, **options)


#: ``send_task`` options that belong to the moment of sending.
_NOT_KEPT = ('producer', 'connection', 'result_cls', 'publisher', 'router')


#: The built-in dispatch modes; ``configure.zcml`` registers the same.
BUILTIN_DISPATCHERS = {
    'outbox': OutboxDispatcher,
    'after-commit': dispatchers.AfterCommitDispatcher,
    'inline': dispatchers.InlineDispatcher,
    'eager': dispatchers.EagerDispatcher,
}
# One of each per process, as a registered utility would be (the outbox
# dispatcher remembers a recent broker failure).
_builtin = {}


def _builtin_dispatcher(mode):
    found = _builtin.get(mode)
    if found is None:
        factory = BUILTIN_DISPATCHERS.get(mode)
        if factory is None:
            raise ValueError(
                f'Unknown dispatch mode {mode!r}; choose one of '
                f'{", ".join(sorted(BUILTIN_DISPATCHERS))}')
        found = _builtin[mode] = factory()
    return found


class ZopeLoader(celery.loaders.app.AppLoader):
    """Reads a celeryconfig as 1.x did.

    ``CELERY_CONFIG_MODULE`` (also what ``celery --config`` sets) names an
    importable module; ``CELERY_CONFIG_FILE`` a Python file by path, for a
    configuration that is not on the Python path.
    """

    def read_configuration(self, env='CELERY_CONFIG_MODULE'):
        path = os.environ.get('CELERY_CONFIG_FILE')
        if path:
            return settings.settings_from_file(path)
        module = os.environ.get(env)
        if module:
            return super().read_configuration(env)
        return {}

    def on_worker_process_init(self):
        """Load ``ZOPE_CONF`` and open its databases in this process.

        1.x's hook.  A worker started by Celery sets its processes up with
        our bootstep and signals (`z3c.celery.worker.bootsteps`), so this
        does nothing there; called by hand (as 1.x's tests did) it sets up
        the Zope environment of the current process: the site ZCML is
        executed, the databases are opened.  `on_worker_shutdown` undoes
        it.
        """
        # Imported here: only a worker loads a zope.conf (ZConfig,
        # zope.app.appsetup), never a process that only queues tasks.
        from z3c.celery.worker import bootsteps
        if bootsteps.booted():
            return
        path = self.app.conf.get('ZOPE_CONF')
        if not path:
            raise ValueError(
                'Celery setting ZOPE_CONF not set, check celery worker '
                'config.')
        bootsteps.zopeconf.load_zope_conf(path)
        bootsteps.zopeconf.open_databases()
        self._z3c_loaded = True

    def on_worker_shutdown(self):
        """Close what `on_worker_process_init` opened and forget the
        zope.conf, so that it can be loaded again."""
        if getattr(self, '_z3c_loaded', False):
            from z3c.celery.worker import bootsteps
            self._z3c_loaded = False
            bootsteps.zopeconf.unload()


@zope.interface.implementer(ITask)
class TransactionAwareTask(celery.Task):
    """A task that is sent when the current transaction commits.

    ``delay()`` / ``apply_async()`` check the arguments now, record the
    principal of the current interaction (or ``_principal_id_=``) and
    return an `AsyncResult` whose id is fixed; the message leaves only
    after a successful commit.  In the worker, the generic runner
    (:mod:`z3c.celery.worker.runner`) runs it in the Zope environment.

    Calling the task object directly (``my_task(1, 2)``) runs the plain
    function in the caller's transaction, as Celery does.
    """

    #: Late acknowledgement: the message is acknowledged only after the
    #: task's transaction finished, so a worker killed in between leaves
    #: it to be redelivered (done-markers make that harmless).
    acks_late = True
    #: Conflicts are expected under load; the conflict policy retries up
    #: to this many times (``None``: no limit).
    max_retries = 10
    #: Retries of a conflict run again at once in the process, this many
    #: per delivery, before the broker (``None``: the site's setting).
    conflict_in_process = None
    #: Backoff base of the broker retries (``None``: the site's setting).
    conflict_backoff_base = None

    def apply_async(self, args=None, kwargs=None, task_id=None,
                    producer=None, link=None, link_error=None, shadow=None,
                    **options):
        if options.pop('_z3c_direct', False):
            # A retry (or a relay): send now, outside any transaction.
            # Not through Celery's apply_async: its typing check refuses
            # the ``_principal_id_`` a retry carries (the arguments were
            # checked when the task was queued).
            options = dict(self._get_exec_options(), **options)
            options.setdefault('ignore_result', self.ignore_result)
            return self.app.send_task_now(
                self.name, args, kwargs, task_id=task_id, producer=producer,
                link=link, link_error=link_error,
                result_cls=self.AsyncResult,
                shadow=shadow or self.shadow_name(args, kwargs, options),
                task_type=self, **options)
        args = tuple(args or ())
        kwargs = dict(kwargs or {})   # the caller's dict stays untouched
        # The principal may come as a keyword argument (1.x) or as an
        # execution option (``apply_async(args, _principal_id_=...)``).
        principal_id = kwargs.pop(
            '_principal_id_', options.pop('_principal_id_', _MISSING))
        kwargs.pop('_task_id_', None)  # 1.x passed it; ids are ours now
        if principal_id is _MISSING:
            principal_id = current_principal_id()
        self.check_call(args, kwargs, options)
        for name, value in (('link', link), ('link_error', link_error),
                            ('shadow', shadow)):
            if value is not None:
                options[name] = value
        exec_options = {k: v for k, v in self._get_exec_options().items()
                        if v is not None}
        exec_options.update(options)
        message = TaskMessage(
            self.name, args, kwargs, exec_options, task_id or uuid(),
            principal_id)
        # The message keeps a weak reference only (see TaskMessage.result).
        result = message.result = QueuedResult(
            message.task_id, task_name=self.name, app=self.app)
        queue.queue_message(self.app, message)
        return result

    def apply(self, *args, **kw):
        """Celery's ``apply``: run here and now, known as in-process.

        The run did not travel through a broker, so no signature is
        checked (see `z3c.celery.signing.in_process`; Celery's own
        ``request.is_eager`` is not trusted, a message can set it).
        """
        with signing.in_process():
            return super().apply(*args, **kw)

    def check_call(self, args, kwargs, options):
        """Fail now (TypeError) on arguments the task cannot be sent with."""
        if self.typing:
            try:
                self.__header__(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f'{self.name}: {e}') from None
        check_serializable(
            self.name, args, kwargs, options.get('serializer')
            or self.serializer or self.app.conf.task_serializer,
            self.app.z3c_setting('message_size_limit'))

    def __call__(self, *args, **kwargs):
        return runner.run(self, args, kwargs)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None,
              countdown=None, max_retries=None, **options):
        """Celery's ``retry``; the new message leaves at once.

        Not at commit: the transaction of the run that asks for a retry
        is aborted.  A run that may repeat an earlier delivery (see
        `z3c.celery.worker.markers.maybe_repeated`) flags its retry the same
        way, so that the retry too looks for the task's done-marker
        everywhere.
        """
        options.setdefault('_z3c_direct', True)
        if getattr(self.request, 'z3c_repeated', False):
            options['headers'] = dict(
                options.get('headers') or self.request.headers or {},
                **{RESENT_HEADER: True})
        return super().retry(args, kwargs, exc, throw, eta, countdown,
                             max_retries, **options)

    @property
    def task_id(self):
        """1.x name: the id of the running task, ``self.request.id``."""
        return self.request.id


def check_serializable(task_name, args, kwargs, serializer, limit=None):
    """Raise a `TypeError` naming the argument *serializer* cannot take,
    or saying the arguments take more than *limit* bytes."""
    try:
        _, _, data = kombu.serialization.dumps((args, kwargs), serializer)
    except (kombu.exceptions.EncodeError, TypeError, ValueError):
        pass
    else:
        if limit and len(data) > limit:
            raise TypeError(
                f'{task_name}: the arguments take {len(data)} bytes '
                f'serialized with {serializer!r}, more than '
                f'message_size_limit ({limit} bytes)')
        return
    for index, value in enumerate(args):
        _check_value(task_name, serializer, f'argument {index}', value)
    for key, value in kwargs.items():
        _check_value(task_name, serializer, f'argument {key!r}', value)
    raise TypeError(
        f'{task_name}: the arguments cannot be serialized with '
        f'{serializer!r}')


def _check_value(task_name, serializer, label, value):
    try:
        kombu.serialization.dumps(value, serializer)
    except (kombu.exceptions.EncodeError, TypeError, ValueError) as e:
        raise TypeError(
            f'{task_name}: {label} cannot be serialized with {serializer!r}'
            f' ({type(value).__name__}: {e})') from None
