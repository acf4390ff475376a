"""Figures of issue 15 (hardening): outages, big transactions, relay drain.

1. Commit latency while the broker *and* the result backend are down (one
   Redis for both, nothing listening on its port): 200 commits, each
   writing a key and queuing one task (dispatch mode ``outbox``), against
   the same commits without a task.  Goal: added time median <= 5 ms, max
   <= 200 ms.
2. 20,000 tasks queued in one transaction (``outbox``, broker up): the
   ``delay()`` loop and the commit against plain Celery's ``apply_async``
   loop for the same tasks (goal <= 0.25), and the peak memory growth per
   task (``tracemalloc``, in a run of its own; goal <= 1 KB).
3. The relay draining 10,000 pending records after an outage (records
   per second, one relay, ``outbox flush``'s way).

FileStorage in this process and a private Redis; the figures go to
``benchmarks/RESULTS-hardening.md`` (and ``RESULTS.md`` through ``python
-m benchmarks``).
"""
import gc
import os
import statistics
import time
import tracemalloc

import transaction

from benchmarks.bench_sending import run_bench
from z3c.celery.outbox import store
from z3c.celery.outbox.relay import Relay
from z3c.celery.settings import reset_connections


#: Where the figures go (besides RESULTS.md).
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'RESULTS-hardening.md')

#: Commits during the outage; tasks in the big transaction (and its
#: rounds); pending records the relay drains.
OUTAGE_COMMITS, BIG, BIG_ROUNDS, DRAIN = 200, 20_000, 2, 10_000


def set_backend(bench, url):
    bench.app.conf.result_backend = url
    reset_connections(bench.app)


def outage_latency(bench):
    """Added ms per commit (median, max) with broker and backend down."""
    bench.set_broker(bench.down)
    set_backend(bench, bench.down)
    bench.reset()
    bench.app.conf.dispatch = 'outbox'
    bench.hold(0)          # the first commit meets the outage
    conn = bench.conn

    def commit(n):
        bench.counter += 1
        start = time.perf_counter()
        conn.root()['data'][bench.counter] = bench.counter
        for i in range(n):
            bench.task.delay(i, 'x')
        transaction.commit()
        return time.perf_counter() - start
    plain = [commit(0) for _ in range(50)]
    with_task = [commit(1) for _ in range(OUTAGE_COMMITS)]
    pending = store.figures(bench.db)['pending']
    assert pending == OUTAGE_COMMITS, pending
    baseline = statistics.median(plain)
    added = [t - baseline for t in with_task]
    set_backend(bench, bench.broker)
    return (statistics.median(added) * 1000, max(added) * 1000,
            baseline * 1000)


def big_transaction(bench):
    """(plain s, ours s) medians over the rounds."""
    bench.set_broker(bench.broker)
    plain, ours = [], []
    for r in range(BIG_ROUNDS):
        runs = [(plain, lambda: bench.plain_loop(BIG)),
                (ours, lambda: bench.mode('outbox', BIG))]
        if r % 2:
            runs.reverse()
        for into, run in runs:
            gc.collect()
            into.append(run())
    return statistics.median(plain), statistics.median(ours)


def big_memory(bench):
    """Peak memory growth per task (bytes) of one 20,000-task commit."""
    bench.set_broker(bench.broker)
    bench.reset()
    bench.app.conf.dispatch = 'outbox'
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        bench.commit_with_tasks(BIG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bench.client.llen('celery') == BIG
    return (peak - base) / BIG


def relay_drain(bench):
    """Records per second of a relay draining DRAIN pending records."""
    bench.set_broker(bench.down)
    bench.reset()
    bench.app.conf.dispatch = 'outbox'
    bench.hold(60)     # within the pause after a failure: records only
    for _ in range(DRAIN // 100):
        bench.commit_with_tasks(100)
    assert store.figures(bench.db)['pending'] == DRAIN
    bench.set_broker(bench.broker)
    relay = Relay(bench.app, bench.db, grace_period=0)
    start = time.perf_counter()
    report = relay.flush()
    elapsed = time.perf_counter() - start
    assert report.sent == DRAIN, report
    assert bench.client.llen('celery') == DRAIN
    bench.hold(0)
    return DRAIN / elapsed


def measure(bench, say):
    bench.plain_loop(100)
    bench.mode('outbox', 100)
    print('1. commits during a broker + backend outage', flush=True)
    median, worst, baseline = outage_latency(bench)
    print(f'2. {BIG} tasks in one transaction', flush=True)
    plain, ours = big_transaction(bench)
    per_task = big_memory(bench)
    print(f'3. relay drain of {DRAIN} records', flush=True)
    rate = relay_drain(bench)

    def met(ok):
        return 'yes' if ok else 'NO'
    say('### Commits while the broker and the result backend are down')
    say()
    say(f'{OUTAGE_COMMITS} commits, each writing a key and queuing one '
        'task (`outbox`), one Redis URL for broker and result backend '
        'where nothing listens; added time = commit time minus the '
        f'median of 50 commits without a task ({baseline:.2f} ms).')
    say()
    say('| what | ms | goal | met |')
    say('|---|---:|---:|---|')
    say(f'| added time, median | {median:.2f} | <= 5 | '
        f'{met(median <= 5)} |')
    say(f'| added time, max | {worst:.1f} | <= 200 | '
        f'{met(worst <= 200)} |')
    say()
    ratio = ours / plain
    say(f'### {BIG} tasks in one transaction')
    say()
    say(f'Median of {BIG_ROUNDS} alternating rounds: `delay()` loop + '
        'commit (`outbox`, broker up) against plain Celery\'s '
        '`apply_async` loop for the same tasks; memory: peak growth '
        'traced by `tracemalloc` over one such commit (a run of its '
        'own), per task.')
    say()
    say('| what | value | goal | met |')
    say('|---|---:|---:|---|')
    say(f'| plain Celery `apply_async` loop, s | {plain:.2f} | | |')
    say(f'| `delay()` loop + commit, s | {ours:.2f} | | |')
    say(f'| ratio | {ratio:.2f} | <= 0.25 | {met(ratio <= 0.25)} |')
    say(f'| peak memory growth per task, bytes | {per_task:.0f} | '
        f'<= 1024 | {met(per_task <= 1024)} |')
    say()
    say('### Relay drain after an outage')
    say()
    say(f'{DRAIN} pending records (100 commits of 100 tasks while the '
        'broker was down), then one relay flushes them (claim, '
        'publish in batches of 1000, delete).')
    say()
    say('| what | records/s |')
    say('|---|---:|')
    say(f'| relay drain | {rate:.0f} |')
    say()


def main():
    return run_bench('hardening', 'Hardening (issue 15)', RESULTS, measure)
