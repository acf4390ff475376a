"""Sending side: the commit of a transaction that queues tasks.

Run with ``python -m benchmarks sending`` (or ``python -m
benchmarks.bench_sending``).  One private Redis server and one FileStorage
serve every measurement; runs of the things compared alternate (A/B/A/B,
the order rotating each round) and medians are reported.

1. One transaction that writes one key and queues 1000 tasks, from the
   first ``delay()`` to the end of ``commit()``, in each dispatch mode,
   against plain Celery's ``apply_async`` loop of 1000 tasks (no
   transaction; each call takes a producer from the pool and does its own
   broker round trip).  Goals: ``after-commit`` <= 0.5x, ``outbox`` <= 1.0x.
   Also shown: ``after-commit`` through one producer but without kombu's
   publish batch (one Redis round trip per message), which is where the
   time of plain Celery's loop goes.
   ``inline`` runs each task in this process (a test mode; shown for
   completeness, not compared).
2. ``outbox``: one transaction queuing 10 tasks with the broker down
   against the same with the broker up.  Goal: <= 2x.  "first" is the
   first commit after the broker went away (it tries the broker and is
   refused); "later" are the commits after it (the dispatcher leaves the
   broker alone for ``outbox_relay_interval`` seconds).  For reference,
   ``after-commit`` with Celery's default publish retry policy and the
   broker down (what an integration that publishes in the commit waits
   before failing).
"""
import os
import shutil
import statistics
import sys
import tempfile
import time

import celery
import transaction
import ZODB
import ZODB.FileStorage
import zope.component
import zope.component.testing
from BTrees.OOBTree import OOBTree
from zope.configuration import xmlconfig

import z3c.celery
from z3c.celery import database
from z3c.celery.interfaces import IDispatcher
from z3c.celery.interfaces import ITask
from z3c.celery.outbox import store
from z3c.celery.sending import publish as publishing
from z3c.celery.settings import reset_connections
from z3c.celery.testing import servers


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, 'RESULTS-sending.md')

TASKS = 1000
ROUNDS = 9
SMALL = 10
SMALL_ROUNDS = 41

SITE = '''\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:celery="http://namespaces.zope.org/celery">
  <include package="zope.component" file="meta.zcml" />
  <include package="z3c.celery" />
  <celery:config broker_url="{broker}" dispatch="outbox"
                 broker_connection_retry_on_startup="false" />
  <celery:task name="bench.noop" handler="benchmarks.bench_sending.noop" />
</configure>
'''


def noop(n, text):
    """The benchmark task (never run here, except in inline mode)."""
    return n


def median_ms(values):
    return statistics.median(values) * 1000


class Bench:

    def __init__(self, directory):
        self.directory = directory
        self.redis = servers.RedisServer().start()
        self.broker = self.redis.url + '/0'
        self.down = f'redis://127.0.0.1:{servers.free_port()}/0'
        self.client = self.redis.client()
        self.db = ZODB.DB(ZODB.FileStorage.FileStorage(
            os.path.join(directory, 'Data.fs')))
        with self.db.transaction() as conn:
            conn.root()['data'] = OOBTree()
        zope.component.testing.setUp()     # cleans up: set the db after
        database.set_database(self.db)
        xmlconfig.string(SITE.format(broker=self.broker))
        self.app = z3c.celery.CELERY
        self.task = zope.component.getUtility(ITask, 'bench.noop')
        self.plain = celery.Celery('plain', broker=self.broker,
                                   set_as_current=False)
        self.plain_noop = self.plain.task(name='bench.noop')(noop)
        self.conn = self.db.open()
        self.counter = 0

    def close(self):
        transaction.abort()
        self.conn.close()
        zope.component.testing.tearDown()
        database.set_database(None)
        self.db.close()
        self.plain.close()
        self.redis.close()

    # helpers

    def set_broker(self, url):
        if self.app.conf.broker_url != url:
            self.app.conf.broker_url = url
            reset_connections(self.app)

    def reset(self):
        """Empty Redis and the outbox (not timed)."""
        self.client.flushall()
        store.ensure_outbox(self.db)
        with self.db.transaction() as conn:
            box = store.get_outbox(conn)
            for lane in box.lanes.values():
                if lane.records:
                    lane.records.clear()
        self.conn.sync()

    def commit_with_tasks(self, n):
        """One transaction: write a key, queue *n* tasks, commit."""
        self.counter += 1
        start = time.perf_counter()
        self.conn.root()['data'][self.counter] = self.counter
        delay = self.task.delay
        for i in range(n):
            delay(i, 'x')
        transaction.commit()
        return time.perf_counter() - start

    # measurements

    def plain_loop(self, n=TASKS):
        self.reset()
        start = time.perf_counter()
        apply_async = self.plain_noop.apply_async
        for i in range(n):
            apply_async((i, 'x'))
        elapsed = time.perf_counter() - start
        assert self.client.llen('celery') == n
        return elapsed

    def mode(self, name, n=TASKS):
        self.reset()
        self.app.conf.dispatch = name
        elapsed = self.commit_with_tasks(n)
        if name != 'inline':
            assert self.client.llen('celery') == n, name
        return elapsed

    def hold(self, seconds):
        """Set the outbox dispatcher's pause after a broker failure."""
        dispatcher = zope.component.getUtility(IDispatcher, 'outbox')
        dispatcher._hold_until = time.monotonic() + seconds if seconds \
            else 0.0

    def without_pipeline(self):
        """after-commit, one producer, but one round trip per message."""
        import contextlib
        saved = publishing._batch
        publishing._batch = lambda producer: contextlib.nullcontext()
        try:
            return self.mode('after-commit')
        finally:
            publishing._batch = saved

    def outbox_up(self):
        self.set_broker(self.broker)
        self.hold(0)     # as when the pause after an earlier failure ended
        return self.mode('outbox', SMALL)

    def outbox_down(self, first):
        self.set_broker(self.down)
        # The first commit after the broker went away tries it; the later
        # ones fall within the pause that failure started.
        self.hold(0 if first else 60)
        self.reset()
        self.app.conf.dispatch = 'outbox'
        elapsed = self.commit_with_tasks(SMALL)
        assert store.figures(self.db)['pending'] == SMALL
        return elapsed

    def after_commit_down_default_retry(self):
        self.set_broker(self.down)
        self.reset()
        self.app.conf.dispatch = 'after-commit'
        return self.commit_with_tasks(SMALL)


def alternate(runs, rounds):
    """Run the named callables in rotating order; name -> list of times."""
    times = {name: [] for name, _ in runs}
    for r in range(rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for name, run in order:
            times[name].append(run())
    return times


def measure(bench, say):
    # Warm up every path once (imports, pools, first connections).
    bench.plain_loop(50)
    for name in ('after-commit', 'outbox', 'inline'):
        bench.mode(name, 50)

    print(f'1. one commit queuing {TASKS} tasks, {ROUNDS} rounds',
          flush=True)
    big = alternate([
        ('plain Celery apply_async loop', bench.plain_loop),
        ('after-commit', lambda: bench.mode('after-commit')),
        ('outbox', lambda: bench.mode('outbox')),
        ('no pipeline', bench.without_pipeline),
    ], ROUNDS)
    inline = alternate([('inline', lambda: bench.mode('inline'))], 3)
    plain = median_ms(big['plain Celery apply_async loop'])
    goals = {'after-commit': 0.5, 'outbox': 1.0}
    say(f'### One transaction queuing {TASKS} tasks')
    say()
    say(f'Median of {ROUNDS} alternating rounds; time from the first '
        '`delay()` to the end of `commit()` (a key written too), '
        'against plain Celery\'s `apply_async` loop on the same Redis.')
    say()
    ratio_table(say, 'plain', ('plain Celery `apply_async` loop', plain),
                [(f'`{name}`', median_ms(big[name]), goals[name])
                 for name in ('after-commit', 'outbox')], '.1f')
    ms = median_ms(big['no pipeline'])
    say(f'| `after-commit` through one producer without pipelining '
        f'(one Redis round trip per message; not shipped) | {ms:.1f} | '
        f'{ms / plain:.2f} | | |')
    ms = median_ms(inline['inline'])
    say(f'| `inline` (runs the {TASKS} tasks here; not compared) | '
        f'{ms:.1f} | ({ms / plain:.2f}) | | |')
    say()

    print(f'2. outbox commit of {SMALL} tasks, broker up / down, '
          f'{SMALL_ROUNDS} rounds', flush=True)
    small = alternate([
        ('up', bench.outbox_up),
        ('down, first commit', lambda: bench.outbox_down(True)),
        ('down, later commits', lambda: bench.outbox_down(False)),
    ], SMALL_ROUNDS)
    reference = alternate(
        [('ref', bench.after_commit_down_default_retry)], 3)
    up = median_ms(small['up'])
    say(f'### Outbox: a commit of {SMALL} tasks with the broker down')
    say()
    say(f'Median of {SMALL_ROUNDS} alternating rounds; the broker '
        '"down" is a port nobody listens on (connection refused).')
    say()
    ratio_table(say, 'broker up', ('`outbox`, broker up', up),
                [(f'`outbox`, broker {name}', median_ms(small[name]), 2.0)
                 for name in ('down, first commit', 'down, later commits')],
                '.2f')
    ms = median_ms(reference['ref'])
    say(f'| reference: `after-commit`, broker down, Celery\'s default '
        f'publish retry (tasks lost) | {ms:.1f} | {ms / up:.1f} | | |')
    say()


def ratio_table(say, against, reference, rows, fmt):
    """A table of median ms and ratios to *reference* with goals.

    *reference* is ``(label, ms)``, *rows* ``(label, ms, goal)``; the
    caller adds rows without a goal after it.
    """
    label, base = reference
    say(f'| what | median ms | ratio vs {against} | goal | met |')
    say('|---|---:|---:|---:|---|')
    say(f'| {label} | {base:{fmt}} | 1.00 | | |')
    for label, ms, goal in rows:
        ratio = ms / base
        say(f'| {label} | {ms:{fmt}} | {ratio:.2f} | <= {goal:.1f} | '
            f'{"yes" if ratio <= goal else "NO"} |')


def main():
    return run_bench('sending', 'Sending side', RESULTS, measure)


def run_bench(name, title, path, measure):
    """Set up a `Bench`, call ``measure(bench, say)``, write the results.

    ``say(text)`` prints a line of the results and keeps it.
    """
    import logging

    # The broker-down runs log (with tracebacks) what they are meant to.
    logging.basicConfig(level=logging.CRITICAL)
    directory = tempfile.mkdtemp(prefix=f'z3c-bench-{name}-')
    bench = Bench(directory)
    lines = []

    def say(text=''):
        print(text, flush=True)
        lines.append(text)

    try:
        measure(bench, say)
    finally:
        bench.close()
        shutil.rmtree(directory, ignore_errors=True)
    return write_results(path, title, name, lines)


def write_results(path, title, name, lines):
    """Write the Markdown *lines* of benchmark *name* to *path*; return
    them as one text."""
    markdown = '\n'.join(lines) + '\n'
    with open(path, 'w') as f:
        f.write(f'# {title}: benchmark results\n\n'
                f'Written by `python -m benchmarks {name}` '
                f'({time.strftime("%Y-%m-%d %H:%M")}, '
                f'{os.cpu_count()} cores, Python '
                f'{sys.version.split()[0]}).\n\n' + markdown)
    return markdown


if __name__ == '__main__':
    main()
