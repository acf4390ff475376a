"""The outbox relay: publishes the outbox records nobody else published.

A record stays in the outbox when publishing after its commit failed (the
broker was away) or never happened (the process died in between).  The
relay publishes such records with their original task id once they are
older than the grace period (``outbox_grace_period``; younger ones are
left to the committing process).  It runs

* in the worker, as the bootstep `OutboxRelayStep` (a timer thread of its
  own, every ``outbox_relay_interval`` seconds), and
* on demand: ``celery -A z3c.celery.CELERY outbox flush`` (see `outbox`).

Several relays may run against one database.  Each claims the records it
is about to publish in a transaction first (a lease of `CLAIM_LEASE`
seconds); two relays claiming the same record conflict and the loser
leaves it alone, so a record is published twice only if a relay dies
after publishing and before deleting it, which the worker's done-markers
make harmless.

A broker that cannot be reached does not count as an attempt: the relay
stops the round and tries again at the next one.  A message that fails to
publish for another reason (it cannot be encoded, the broker refuses it)
is tried again with a growing delay and after ``outbox_max_attempts``
failures moved to the dead letters (``outbox show``, ``outbox retry``,
``outbox purge``).
"""
import json
import logging
import time

import click
import transaction
import ZODB.POSException
from celery import bootsteps
from celery.bin.base import CeleryCommand
from celery.bin.base import handle_preload_options
from celery.utils import timer2

from z3c.celery import dispatch
from z3c.celery import outbox as outbox_module
from z3c.celery.markers import RESENT_HEADER
from z3c.celery.outbox import FAST_FAIL
from z3c.celery.outbox import RETRY_LANE
from z3c.celery.outbox import get_outbox
from z3c.celery.outbox import is_broker_error
from z3c.celery.outbox import message_of


log = logging.getLogger(__name__)

#: Seconds a relay's claim on a record lasts (if it dies meanwhile, the
#: record becomes due again afterwards).
CLAIM_LEASE = 60.0

#: Longest delay (seconds) between two attempts of a failing record.
MAX_BACKOFF = 600.0


def resent(message):
    """*message*, flagged as possibly sent before.

    The process that committed it may have published it already; the
    header makes the worker look for its done-marker in every partition.
    """
    options = message.options
    options['headers'] = dict(options.get('headers') or {},
                              **{RESENT_HEADER: True})
    return message


class RelayReport:
    """What one relay run did."""

    def __init__(self):
        self.sent = 0          # records published and deleted
        self.waiting = 0       # due, but the broker could not be reached
        self.failed = 0        # publishing failed; will be tried again
        self.dead = 0          # moved to the dead letters
        self.pruned = 0        # abandoned empty lanes removed
        self.conflicts = 0     # another relay (or writer) was faster
        self.error = None      # the broker error, if any

    def __iadd__(self, other):
        for name in ('sent', 'waiting', 'failed', 'dead', 'pruned',
                     'conflicts'):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error = other.error or self.error
        return self

    def as_dict(self):
        return {'sent': self.sent, 'waiting': self.waiting,
                'failed': self.failed, 'dead': self.dead,
                'pruned': self.pruned, 'conflicts': self.conflicts,
                'error': None if self.error is None else repr(self.error)}

    def __repr__(self):
        return f'<RelayReport {self.as_dict()}>'


class Relay:
    """Publishes the overdue records of *db*'s outbox through *app*.

    Settings default to *app*'s ``outbox_grace_period``,
    ``outbox_max_attempts`` and ``outbox_relay_interval``.
    """

    def __init__(self, app, db, grace_period=None, max_attempts=None,
                 interval=None, lane_retention=None, batch_size=1000,
                 clock=time.time):
        self.app = app
        self.db = db
        self.grace_period = float(
            app.z3c_setting('outbox_grace_period')
            if grace_period is None else grace_period)
        self.max_attempts = int(
            app.z3c_setting('outbox_max_attempts')
            if max_attempts is None else max_attempts)
        self.interval = float(
            app.z3c_setting('outbox_relay_interval')
            if interval is None else interval) or 5.0
        self.lane_retention = (outbox_module.LANE_RETENTION
                               if lane_retention is None else lane_retention)
        self.batch_size = batch_size
        self.clock = clock
        self._broker_down = False

    def run_once(self, force=False):
        """Publish up to ``batch_size`` due records; return a `RelayReport`.

        With *force*, the grace period and the delays between attempts are
        ignored (claims of other relays are not).
        """
        report = RelayReport()
        manager = transaction.TransactionManager()
        connection = self.db.open(transaction_manager=manager)
        try:
            now = self.clock()
            due, abandoned = self._claim(manager, connection, now, force,
                                         report)
            if due:
                self._publish(manager, connection, due, report)
            if abandoned:
                self._prune(manager, connection, abandoned, report)
        finally:
            manager.abort()
            connection.close()
        return report

    def flush(self):
        """Publish every pending record now; return the summed report."""
        total = RelayReport()
        while True:
            report = self.run_once(force=True)
            total += report
            if report.error is not None or report.sent == 0:
                return total

    # The three transactions of a run

    def _claim(self, manager, connection, now, force, report):
        manager.begin()
        outbox = get_outbox(connection)
        if outbox is None:
            return [], []
        cutoff = now - self.grace_period
        due = []
        abandoned = []
        for key, lane in outbox.lanes.items():
            records = lane.records
            if not records:
                if key != RETRY_LANE and \
                        lane.touched < now - self.lane_retention:
                    abandoned.append(key)
                continue
            for task_id, record in records.items():
                if record.get('claimed_until', 0.0) > now:
                    continue
                if not force and (record['created'] > cutoff
                                  or record['next_try'] > now):
                    continue
                due.append(((record['created'], record.get('seq', 0)),
                            key, task_id, record))
        manager.abort()
        if not due:
            return [], abandoned
        due.sort(key=lambda item: item[0])
        due = due[:self.batch_size]
        txn = manager.begin()
        txn.note(f'z3c.celery outbox relay: claim {len(due)} record(s)')
        outbox = get_outbox(connection)
        claimed = []
        for _, key, task_id, _ in due:
            lane = outbox.lanes.get(key)
            record = lane.records.get(task_id) if lane is not None else None
            if record is None:
                continue
            lane.records[task_id] = dict(
                record, claimed_until=now + CLAIM_LEASE)
            claimed.append((key, task_id, record))
        try:
            manager.commit()
        except ZODB.POSException.ConflictError:
            manager.abort()
            report.conflicts += 1
            log.debug('Outbox claim conflicted; another relay is at work')
            return [], abandoned
        return claimed, abandoned

    def _publish(self, manager, connection, claimed, report):
        messages = [resent(message_of(task_id, record))
                    for _, task_id, record in claimed]
        keys = {task_id: key for key, task_id, _ in claimed}
        remaining = messages
        sent = []
        failed = []       # (message, error)
        waiting = []
        while remaining:
            unsent = dispatch.publish(self.app, remaining, **FAST_FAIL)
            sent.extend(remaining[:len(remaining) - len(unsent)])
            if not unsent:
                break
            if unsent.culprit is None or is_broker_error(
                    self.app, unsent.error):
                waiting = list(unsent)
                report.error = unsent.error
                break
            failed.append((unsent.culprit, unsent.error))
            remaining = [m for m in unsent if m is not unsent.culprit]
        self._settle(manager, connection, keys, sent, failed, waiting,
                     report)
        self._log(report, sent, waiting, failed)

    def _settle(self, manager, connection, keys, sent, failed, waiting,
                report):
        for _ in range(10):
            now = self.clock()
            txn = manager.begin()
            txn.note(f'z3c.celery outbox relay: {len(sent)} sent')
            outbox = get_outbox(connection)
            dead = 0
            for message in sent:
                lane = outbox.lanes.get(keys[message.task_id])
                if lane is not None:
                    lane.records.pop(message.task_id, None)
            for message in waiting:
                lane = outbox.lanes.get(keys[message.task_id])
                record = lane.records.get(message.task_id) \
                    if lane is not None else None
                if record is not None:
                    lane.records[message.task_id] = dict(
                        record, claimed_until=0.0)
            for message, error in failed:
                lane = outbox.lanes.get(keys[message.task_id])
                record = lane.records.get(message.task_id) \
                    if lane is not None else None
                if record is None:
                    continue
                attempts = record['attempts'] + 1
                record = dict(record, attempts=attempts, claimed_until=0.0,
                              error=f'{type(error).__name__}: {error}')
                if attempts >= self.max_attempts:
                    del lane.records[message.task_id]
                    outbox.dead[message.task_id] = dict(
                        record, died=now, lane=lane.key)
                    dead += 1
                else:
                    record['next_try'] = now + min(
                        self.interval * 2 ** (attempts - 1), MAX_BACKOFF)
                    lane.records[message.task_id] = record
            try:
                manager.commit()
            except ZODB.POSException.ConflictError:
                manager.abort()
                report.conflicts += 1
                continue
            report.sent += len(sent)
            report.waiting += len(waiting)
            report.failed += len(failed) - dead
            report.dead += dead
            dispatch.counters.add('relayed', len(sent))
            dispatch.counters.add('dead_letters', dead)
            return
        # Claims run out after CLAIM_LEASE: the records are tried again
        # (the sent ones a second time, under the same task ids).
        log.warning('Outbox relay could not record its results after '
                    'repeated conflicts; %d sent record(s) will be sent '
                    'again', len(sent))

    def _prune(self, manager, connection, keys, report):
        txn = manager.begin()
        txn.note(f'z3c.celery outbox relay: prune {len(keys)} lane(s)')
        outbox = get_outbox(connection)
        pruned = 0
        for key in keys:
            lane = outbox.lanes.get(key)
            if lane is None or lane.records:
                continue
            del outbox.lanes[key]
            # Written so that an owner writing into the lane right now (it
            # refreshes ``touched`` on its first write after so long)
            # conflicts instead of writing into a detached lane.
            lane.touched = -1.0
            pruned += 1
        try:
            manager.commit()
        except ZODB.POSException.ConflictError:
            manager.abort()
            report.conflicts += 1
            return
        report.pruned += pruned

    def _log(self, report, sent, waiting, failed):
        if sent:
            log.info('Outbox relay published %d task(s): %s', len(sent),
                     outbox_module._ids(sent))
        if waiting:
            level = logging.INFO if self._broker_down else logging.WARNING
            log.log(level, 'Outbox relay: broker unavailable (%s); %d '
                    'task(s) wait', report.error, len(waiting))
            self._broker_down = True
        elif sent and self._broker_down:
            log.warning('Outbox relay: broker available again')
            self._broker_down = False
        for message, error in failed:
            log.error('Outbox relay could not publish %s[%s]: %s',
                      message.name, message.task_id, error)
        if report.dead:
            log.error('Outbox relay moved %d record(s) to the dead letters '
                      '(see "celery outbox show")', report.dead)


def retry_dead_letters(db, task_ids=None):
    """Put dead letters (all, or *task_ids*) back into the outbox.

    They go into the lane `RETRY_LANE` with no attempts counted and are due
    at once.  Returns the task ids moved.
    """
    with db.transaction(note='z3c.celery outbox: retry dead letters') as c:
        outbox = get_outbox(c)
        if outbox is None:
            return []
        ids = list(outbox.dead.keys()) if task_ids is None else [
            task_id for task_id in task_ids if task_id in outbox.dead]
        if not ids:
            return []
        lane = outbox.lanes.get(RETRY_LANE)
        if lane is None:
            lane = outbox.lanes[RETRY_LANE] = outbox_module.Lane(RETRY_LANE)
        for task_id in ids:
            record = dict(outbox.dead.pop(task_id))
            for name in ('died', 'lane', 'claimed_until'):
                record.pop(name, None)
            record.update(attempts=0, next_try=0.0)
            lane.records[task_id] = record
        return ids


def purge(db, pending=False):
    """Delete the dead letters (and with *pending* every pending record).

    Returns ``(dead letters deleted, pending records deleted)``.
    """
    with db.transaction(note='z3c.celery outbox: purge') as c:
        outbox = get_outbox(c)
        if outbox is None:
            return 0, 0
        dead = len(outbox.dead)
        outbox.dead.clear()
        removed = 0
        if pending:
            for lane in outbox.lanes.values():
                removed += len(lane.records)
                lane.records.clear()
        return dead, removed


# Running the relay periodically: in the worker, or in any process


class RelayTimer:
    """Runs ``relay.run_once()`` every *interval* seconds on a thread.

    The thread is Celery's own ``timer2.Timer``, apart from the worker's
    timer: a relay run does blocking ZODB and broker I/O, which must not
    stall the worker's event loop (where the worker's timer runs its
    callbacks).  A web process whose FileStorage no worker can open may
    run one as well.
    """

    def __init__(self, relay, interval):
        self.relay = relay
        self.interval = interval
        self.timer = None

    def start(self):
        self.timer = timer2.Timer(on_error=self._on_error)
        self.timer.call_repeatedly(self.interval, self.tick)
        return self

    def tick(self):
        try:
            self.relay.run_once()
        except Exception:
            log.exception('Outbox relay run failed')

    def _on_error(self, exc):   # pragma: no cover - tick catches all
        log.error('Outbox relay timer error: %r', exc)

    def stop(self):
        if self.timer is not None:
            self.timer.stop()
            self.timer = None


class OutboxRelayStep(bootsteps.StartStopStep):
    """Worker bootstep: runs the outbox relay in the worker's main process.

    Every ``outbox_relay_interval`` seconds (0 disables it), see
    `RelayTimer`.  The database is the one the worker opened for its tasks
    in this process (``solo``, ``threads`` pools).  A prefork worker opens
    its databases in the children only; the step then opens the databases
    of the worker's zope.conf once more for itself (a ZEO or RelStorage
    client) and closes them at stop -- except a FileStorage, which only
    one process may open: the children need it, so there the relay does
    not run in the worker (use ``celery outbox flush`` or a `RelayTimer`
    in the process that owns the FileStorage).
    """

    label = 'OutboxRelay'
    requires = ('z3c.celery.worker:ZopeEnvironment',)

    def __init__(self, worker, **kwargs):
        self.relay_timer = None
        self._close = None
        super().__init__(worker, **kwargs)

    def start(self, worker):
        app = worker.app
        interval = float(app.z3c_setting('outbox_relay_interval') or 0)
        if interval <= 0:
            log.info('Outbox relay disabled (outbox_relay_interval=0)')
            return
        db = outbox_module.database_for(app)
        if db is None:
            db, self._close = open_own_database(app, avoid_filestorage=True)
        if db is None:
            return
        outbox_module.ensure_outbox(db)
        self.relay_timer = RelayTimer(Relay(app, db), interval).start()
        log.info('Outbox relay runs every %.1fs', interval)

    def stop(self, worker):
        if self.relay_timer is not None:
            self.relay_timer.stop()
            self.relay_timer = None
        if self._close is not None:
            close, self._close = self._close, None
            close()

    shutdown = stop


def open_own_database(app, zope_conf=None, avoid_filestorage=False):
    """Open the outbox database of a zope.conf for this caller alone.

    The zope.conf is *zope_conf*, else the one this process loaded, else
    the ``ZOPE_CONF`` setting (it is loaded, site ZCML included, if this
    process has not loaded one).  Its databases are opened as a new
    multi-database, apart from the ones tasks use, and neither registered
    nor set anywhere.  Returns ``(db, close)``, or ``(None, None)`` when
    there is no zope.conf, or (with *avoid_filestorage*) it is a
    FileStorage.
    """
    import zope.app.appsetup.appsetup
    import ZODB.config

    from z3c.celery import zopeconf
    options = zopeconf.loaded_options()
    path = zope_conf or (None if options is not None
                         else app.z3c_setting('ZOPE_CONF'))
    if path:
        options = zopeconf.load_zope_conf(path)
    if options is None:
        log.warning('Outbox relay not started: no ZODB database in this '
                    'process and no zope.conf to open one from')
        return None, None
    name = app.z3c_setting('zodb_database')
    factories = list(options.databases)
    names = [f.name or '' for f in factories]
    wanted = factories[names.index(name)] if name in names else (
        factories[0] if factories and not name else None)
    if wanted is None:
        raise LookupError(f'The zope.conf has no database named {name!r}')
    if avoid_filestorage and isinstance(
            getattr(wanted.config, 'storage', None), ZODB.config.FileStorage):
        log.warning('Outbox relay not started in this prefork worker: its '
                    'database is a FileStorage, which only one process may '
                    'open (use ZEO, or run "celery outbox flush")')
        return None, None
    dbs, databases = zope.app.appsetup.appsetup.multi_database(factories)

    def close():
        for db in dbs:
            try:
                db.close()
            except Exception:   # pragma: no cover
                log.warning('Closing %r failed', db, exc_info=True)
    return databases[name] if name in databases else dbs[0], close


# The command: celery -A z3c.celery.CELERY outbox ...


class _CommandState:
    """Options of the ``outbox`` group and the database they opened."""

    def __init__(self, app, zope_conf, zodb_conf):
        self.app = app
        self.zope_conf = zope_conf or app.z3c_setting('ZOPE_CONF')
        self.zodb_conf = zodb_conf
        self.db = None
        self.close_db = None

    def database(self):
        if self.db is not None:
            return self.db
        if self.zodb_conf:
            import ZODB.config
            self.db = ZODB.config.databaseFromURL(self.zodb_conf)
            self.close_db = self.db.close
        elif self.zope_conf:
            self.db, self.close_db = open_own_database(
                self.app, self.zope_conf)
        else:
            self.db = outbox_module.database_for(self.app)
        if self.db is None:
            raise click.UsageError(
                'No ZODB database to read the outbox from: give '
                '--zope-conf (the site\'s zope.conf) or --zodb-conf (a ZODB '
                'configuration file with a <zodb> section), or set '
                'ZOPE_CONF.')
        return self.db

    def close(self):
        if self.close_db is not None:
            close, self.close_db = self.close_db, None
            close()


_STATE_KEY = 'z3c.celery.outbox'


def _database(ctx):
    return ctx.meta[_STATE_KEY].database()


def _age(seconds):
    if seconds is None:
        return '-'
    if seconds < 120:
        return f'{seconds:.1f}s'
    if seconds < 7200:
        return f'{seconds / 60:.1f}min'
    return f'{seconds / 3600:.1f}h'


@click.group()
@click.option('--zope-conf', type=click.Path(exists=True, dir_okay=False),
              help='The site\'s zope.conf (its database holds the outbox); '
                   'default: the ZOPE_CONF setting.')
@click.option('--zodb-conf', type=click.Path(exists=True, dir_okay=False),
              help='Instead of --zope-conf: a ZODB configuration file '
                   '(<zodb> section, as ZODB.config reads it).')
@click.pass_context
@handle_preload_options
def outbox(ctx, zope_conf=None, zodb_conf=None, **kwargs):
    """The z3c.celery outbox: figures, flush, retry dead letters, purge."""
    state = _CommandState(ctx.obj.app, zope_conf, zodb_conf)
    ctx.meta[_STATE_KEY] = state
    ctx.call_on_close(state.close)


@outbox.command(cls=CeleryCommand)
@click.option('--json', 'as_json', is_flag=True,
              help='Print the figures as JSON.')
@click.pass_context
def show(ctx, as_json=False, **kwargs):
    """Show pending records, the oldest one's age and dead letters."""
    figures = outbox_module.figures(_database(ctx))
    if as_json:
        click.echo(json.dumps(figures))
        return
    click.echo(f'pending:      {figures["pending"]}')
    click.echo(f'oldest age:   {_age(figures["oldest_age"])}')
    click.echo(f'dead letters: {figures["dead"]}')
    click.echo(f'lanes:        {figures["lanes"]}')


@outbox.command(cls=CeleryCommand)
@click.pass_context
def flush(ctx, **kwargs):
    """Publish every pending record now (exit 1 if the broker is away)."""
    report = Relay(ctx.obj.app, _database(ctx)).flush()
    click.echo(f'sent: {report.sent}  waiting: {report.waiting}  '
               f'failed: {report.failed}  dead letters: {report.dead}')
    if report.error is not None:
        click.echo(f'broker unavailable: {report.error}', err=True)
        ctx.exit(1)


@outbox.command(cls=CeleryCommand)
@click.argument('task_ids', nargs=-1)
@click.option('--no-flush', is_flag=True,
              help='Only put them back; the relay sends them later.')
@click.pass_context
def retry(ctx, task_ids, no_flush=False, **kwargs):
    """Put dead letters (all, or TASK_IDS) back and publish them."""
    moved = retry_dead_letters(_database(ctx), list(task_ids) or None)
    click.echo(f'{len(moved)} dead letter(s) back in the outbox')
    if moved and not no_flush:
        ctx.invoke(flush)


@outbox.command(name='purge', cls=CeleryCommand)
@click.option('--pending', is_flag=True,
              help='Also delete the pending records (those tasks are '
                   'then never sent).')
@click.option('-f', '--force', is_flag=True, help='Do not ask.')
@click.pass_context
def purge_command(ctx, pending=False, force=False, **kwargs):
    """Delete the dead letters (with --pending: all records)."""
    db = _database(ctx)
    if not force:
        what = 'ALL dead letters and pending records' if pending \
            else 'all dead letters'
        click.confirm(f'Delete {what} of the outbox? There is no undo.',
                      abort=True)
    dead, removed = purge(db, pending)
    click.echo(f'deleted {dead} dead letter(s) and {removed} pending '
               f'record(s)')
