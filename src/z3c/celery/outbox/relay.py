"""The outbox relay: publishes the records nobody else published.

A record stays in the outbox when publishing after its commit failed (the
broker was away) or never happened (the process died in between).  The
`Relay` claims overdue records, publishes them under their task ids
(flagged as possibly resent) and deletes them; a failing record goes to
the dead letters after ``outbox_max_attempts``.  It runs in the worker
(`OutboxRelayStep`, a timer of its own) and on demand (``celery outbox
flush``).  See docs/dispatch.rst for the design.
"""
import logging
import time

import transaction
import ZODB.POSException
from celery import bootsteps
from celery.utils import timer2

from z3c.celery.message import describe
from z3c.celery.message import message_of
from z3c.celery.message import resent
from z3c.celery.outbox import store
from z3c.celery.sending.publish import FAST_FAIL
from z3c.celery.sending.publish import counters
from z3c.celery.sending.publish import is_broker_error
from z3c.celery.sending.publish import publish
from z3c.celery.worker.zopeconf import open_own_database


log = logging.getLogger(__name__)

#: Seconds a relay's claim on a record lasts (if it dies meanwhile, the
#: record becomes due again afterwards).
CLAIM_LEASE = 60.0

#: Longest delay (seconds) between two attempts of a failing record.
MAX_BACKOFF = 600.0


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
        self.lane_retention = (store.LANE_RETENTION
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
        outbox = store.get_outbox(connection)
        if outbox is None:
            return [], []
        due, abandoned = store.due_records(
            outbox, now, now - self.grace_period, force, self.lane_retention)
        manager.abort()
        if not due:
            return [], abandoned
        due = due[:self.batch_size]
        txn = manager.begin()
        txn.note(f'z3c.celery outbox relay: claim {len(due)} record(s)')
        claimed = store.claim(store.get_outbox(connection), due,
                              now + CLAIM_LEASE, now)
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
            unsent = publish(self.app, remaining, **FAST_FAIL)
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
            outbox = store.get_outbox(connection)
            dead = 0
            for message in sent:
                store.remove_sent(outbox, keys[message.task_id],
                                  message.task_id)
            for message in waiting:
                store.release(outbox, keys[message.task_id], message.task_id)
            for message, error in failed:
                dead += store.record_failure(
                    outbox, keys[message.task_id], message.task_id, error,
                    now, self.max_attempts, self._delay)
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
            counters.add('relayed', len(sent))
            counters.add('dead_letters', dead)
            return
        # Claims run out after CLAIM_LEASE: the records are tried again
        # (the sent ones a second time, under the same task ids).
        log.warning('Outbox relay could not record its results after '
                    'repeated conflicts; %d sent record(s) will be sent '
                    'again', len(sent))

    def _prune(self, manager, connection, keys, report):
        txn = manager.begin()
        txn.note(f'z3c.celery outbox relay: prune {len(keys)} lane(s)')
        pruned = store.prune_lanes(store.get_outbox(connection), keys)
        try:
            manager.commit()
        except ZODB.POSException.ConflictError:
            manager.abort()
            report.conflicts += 1
            return
        report.pruned += pruned

    def _delay(self, attempts):
        """Seconds until a record that failed *attempts* times is due."""
        return min(self.interval * 2 ** (attempts - 1), MAX_BACKOFF)

    def _log(self, report, sent, waiting, failed):
        if sent:
            log.info('Outbox relay published %d task(s): %s', len(sent),
                     describe(sent))
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
    requires = ('z3c.celery.worker.bootsteps:ZopeEnvironment',)

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
        db = store.database_for(app)
        if db is None:
            db, self._close = open_own_database(app, avoid_filestorage=True)
        if db is None:
            return
        store.ensure_outbox(db)
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
