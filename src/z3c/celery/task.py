"""The task class of z3c.celery: queued in the transaction, run by the runner."""
import celery
import kombu.exceptions
import kombu.serialization
import zope.interface
import zope.security.management
from celery.utils import uuid

from z3c.celery import dispatch
from z3c.celery import runner
from z3c.celery.interfaces import ITask
from z3c.celery.markers import RESENT_HEADER
from z3c.celery.result import QueuedResult


_MISSING = object()


def current_principal_id():
    """The id of the principal of the current interaction, or ``None``."""
    interaction = zope.security.management.queryInteraction()
    if interaction is None:
        return None
    for participation in interaction.participations:
        principal = getattr(participation, 'principal', None)
        if principal is not None:
            return principal.id
    return None


@zope.interface.implementer(ITask)
class TransactionAwareTask(celery.Task):
    """A task that is sent when the current transaction commits.

    ``delay()`` / ``apply_async()`` check the arguments now, record the
    principal of the current interaction (or ``_principal_id_=``) and
    return an `AsyncResult` whose id is fixed; the message leaves only
    after a successful commit.  In the worker, the generic runner
    (:mod:`z3c.celery.runner`) runs it in the Zope environment.

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
            return self.app.send_task(
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
        message = dispatch.TaskMessage(
            self.name, args, kwargs, exec_options, task_id or uuid(),
            principal_id)
        message.result = QueuedResult(
            message.task_id, task_name=self.name, app=self.app)
        dispatch.queue_message(self.app, message)
        return message.result

    def check_call(self, args, kwargs, options):
        """Fail now (TypeError) on arguments the task cannot be sent with."""
        if self.typing:
            try:
                self.__header__(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f'{self.name}: {e}') from None
        serializer = options.get('serializer') or self.serializer or \
            self.app.conf.task_serializer
        try:
            kombu.serialization.dumps((args, kwargs), serializer)
        except (kombu.exceptions.EncodeError, TypeError, ValueError):
            pass
        else:
            return
        for index, value in enumerate(args):
            _check_value(self.name, serializer, f'argument {index}', value)
        for key, value in kwargs.items():
            _check_value(self.name, serializer, f'argument {key!r}', value)
        raise TypeError(
            f'{self.name}: the arguments cannot be serialized with '
            f'{serializer!r}')

    def __call__(self, *args, **kwargs):
        return runner.run(self, args, kwargs)

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None,
              countdown=None, max_retries=None, **options):
        """Celery's ``retry``; the new message leaves at once.

        Not at commit: the transaction of the run that asks for a retry
        is aborted.  A run that may repeat an earlier delivery (see
        `z3c.celery.markers.maybe_repeated`) flags its retry the same
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


def _check_value(task_name, serializer, label, value):
    try:
        kombu.serialization.dumps(value, serializer)
    except (kombu.exceptions.EncodeError, TypeError, ValueError) as e:
        raise TypeError(
            f'{task_name}: {label} cannot be serialized with {serializer!r}'
            f' ({type(value).__name__}: {e})') from None
