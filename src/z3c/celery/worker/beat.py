"""``celery beat`` (and ``worker -B``): each tick in a committed transaction.

A z3c.celery task queued with ``delay()`` / ``apply_async()`` leaves only
when its transaction commits; Celery's beat calls ``apply_async`` and
commits nothing.  When beat starts (``beat_init``), its scheduler, whichever
it is, gets `TransactionalTicks`' behaviour (`make_transactional`): each
tick runs in a transaction of its own, which is committed, so the tick
leaves through the app's dispatcher like any other task.  `ZopeScheduler`
is Celery's default scheduler with it built in.  A tick runs as the
principal its entry names (``_principal_id_`` in its options;
``principal`` of ``<celery:schedule>``), else as the site's
unauthenticated principal.
See docs/worker.rst ("Periodic tasks").
"""
import logging
import types

import celery.beat
import transaction
import zope.authentication.interfaces
import zope.component

from z3c.celery import database
from z3c.celery.message import PRINCIPAL_KEY
from z3c.celery.worker import zopeconf


log = logging.getLogger(__name__)

def default_principal_id():
    """The id of the site's unauthenticated principal, or ``None``."""
    principal = zope.component.queryUtility(
        zope.authentication.interfaces.IUnauthenticatedPrincipal)
    return None if principal is None else principal.id


def prepare_process(app):
    """Set up the process beat runs in; called once, when beat starts.

    Databases inherited from the worker that forked this process (``worker
    -B``) are forgotten: their connections belong to the parent.  Beat
    opens no database itself, so in dispatch mode ``outbox`` its ticks are
    published after commit (``after-commit``) unless this process has a
    database of its own.
    """
    zopeconf.forget_inherited_databases()
    if app.conf.task_always_eager:
        return
    if app.z3c_setting('dispatch') == 'outbox' and database.get_database(
            app.z3c_setting('zodb_database')) is None:
        app.conf.dispatch = 'after-commit'
        log.info('beat: no ZODB database in this process; ticks are '
                 'published right after their transaction commits '
                 '(dispatch "after-commit")')


def check_principals(schedule):
    """Warn about each entry whose ticks would run without a principal."""
    if default_principal_id() is not None:
        return
    for name, entry in sorted(schedule.items()):
        if entry.options.get(PRINCIPAL_KEY) is None:
            log.warning(
                'beat: the ticks of schedule entry %r (task %s) run with no '
                'principal: the entry names none and the site has no '
                'unauthenticated principal (IUnauthenticatedPrincipal '
                'utility)', name, entry.task)


def apply_in_transaction(apply_async, entry, producer=None, advance=True,
                         **kwargs):
    """Apply *entry* with *apply_async* in a transaction of its own, as
    the entry's principal, and commit it: the tick leaves at commit."""
    if PRINCIPAL_KEY not in entry.options:
        entry = entry.__class__(**dict(entry, options=dict(
            entry.options, **{PRINCIPAL_KEY: default_principal_id()})))
    manager = transaction.manager
    manager.begin()
    result = None
    try:
        result = apply_async(entry, producer=producer, advance=advance,
                             **kwargs)
        manager.get().note(f'z3c.celery beat: {entry.name}')
        manager.commit()
    except celery.beat.SchedulingError:
        manager.abort()
        raise
    except Exception as e:
        manager.abort()
        raise celery.beat.SchedulingError(
            f"Couldn't send scheduled task {entry.name} ({entry.task}"
            f'{_task_id(result)}): '
            f'the transaction of its tick failed: {type(e).__name__}: '
            f'{e}') from e
    return result


def _task_id(result):
    task_id = getattr(result, 'id', None)
    return f'[{task_id}]' if task_id else ''


def send_task(app, name, args=None, kwargs=None, **options):
    """Send a task this process does not know by name, with the principal
    in its keyword arguments (where the worker looks for it)."""
    principal_id = options.pop(PRINCIPAL_KEY, None)
    if principal_id is not None:
        kwargs = dict(kwargs or {}, **{PRINCIPAL_KEY: principal_id})
    return app.send_task(name, args, kwargs, **options)


class TransactionalTicks:
    """Scheduler mix-in: each tick in a committed transaction of its own,
    as the entry's principal."""

    def setup_schedule(self):
        prepare_process(self.app)
        super().setup_schedule()
        check_principals(self.schedule)

    def apply_async(self, entry, producer=None, advance=True, **kwargs):
        return apply_in_transaction(
            super().apply_async, entry, producer, advance, **kwargs)

    def send_task(self, name, args=None, kwargs=None, **options):
        return send_task(self.app, name, args, kwargs, **options)


class ZopeScheduler(TransactionalTicks, celery.beat.PersistentScheduler):
    """Celery's default scheduler (a shelve file of last run times), whose
    ticks leave when their transaction commits."""


def make_transactional(scheduler):
    """Give a scheduler the site chose (``beat_scheduler``, ``-S``) the
    behaviour of `TransactionalTicks`; `ZopeScheduler` has it already."""
    if isinstance(scheduler, TransactionalTicks):
        return False
    prepare_process(scheduler.app)
    apply_async = scheduler.apply_async

    def transactional_apply_async(self, entry, producer=None, advance=True,
                                  **kwargs):
        return apply_in_transaction(apply_async, entry, producer, advance,
                                    **kwargs)

    def principal_send_task(self, name, args=None, kwargs=None, **options):
        return send_task(self.app, name, args, kwargs, **options)
    scheduler.apply_async = types.MethodType(
        transactional_apply_async, scheduler)
    scheduler.send_task = types.MethodType(principal_send_task, scheduler)
    check_principals(scheduler.schedule)
    log.info('beat: ticks of %s are sent in transactions of their own',
             type(scheduler).__name__)
    return True
