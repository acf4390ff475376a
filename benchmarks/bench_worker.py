"""Worker side: tasks run by a real ``celery worker`` in the Zope environment.

Run with ``python -m benchmarks worker`` (or ``python -m
benchmarks.bench_worker``).  One private Redis server and one ZEO server
(a FileStorage behind it) serve every measurement; every worker is
``celery worker -P prefork -c 2``.  The things compared run in the same
process, one right after the other in each round; medians are reported,
and ratios are medians of the ratios within each round.

1. 1000 no-op tasks, sent at once, until the last result is stored:
   tasks/s of z3c.celery (each task opens a ZODB connection, sets the
   site, resolves the principal, begins and commits a transaction,
   looks its done-marker up) against plain Celery no-op tasks (a plain
   ``celery.Celery`` app, default settings).  Also the time per task
   inside the pool process: CPU time measured by a probe module loaded
   into both workers (``task_prerun`` to ``task_postrun``), and wall
   times.  Goals: >= 0.95x tasks/s; <= 0.15 ms more per task.
2. 1000 tasks each writing a distinct key into one OOBTree over ZEO,
   with done-markers on and off (two workers, same database).  Goal:
   markers cost <= 10% of tasks/s.
3. 200 increments of one counter (every pair of concurrent tasks
   conflicts; no conflict resolution) against 200 increments of 200
   distinct counters, same worker.  Drain time ratio, lost and failed
   tasks.  Goal: ratio <= 1.5 with 0 lost and 0 failed.
"""
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import transaction
import zope.component
import zope.component.testing
from zope.configuration import xmlconfig

from z3c.celery import servers
from z3c.celery.celery import get_principal
from z3c.celery.celery import login_principal
from z3c.celery.interfaces import ITask


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'RESULTS-worker.md')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import workers  # noqa: E402


NOOPS = 1000
WRITES = 1000
INCREMENTS = 200
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 7))
WARMUP = 200

PLAIN_APP = '''\
"""A plain Celery app with a no-op task: the baseline."""
import celery

app = celery.Celery('plain', broker={url!r}, backend={url!r})


@app.task(name='plain.noop')
def noop():
    return None
'''


#: Loaded into both workers of benchmark 1 (``-I bench_probe``): the CPU
#: time (and wall time) of each task in its pool process, from Celery's
#: ``task_prerun`` to its ``task_postrun`` signal (the task's call and
#: the storing of its result), summed up and logged every PROBE_EVERY
#: tasks.  CPU time leaves out the time the process waited for a core.
PROBE = '''\
import logging
import time

from celery import signals

_started = {}
_sums = [0.0, 0.0, 0]
log = logging.getLogger('bench_probe')


@signals.task_prerun.connect(weak=False)
def prerun(task_id=None, **kw):
    _started[task_id] = (time.thread_time(), time.perf_counter())


@signals.task_postrun.connect(weak=False)
def postrun(task_id=None, **kw):
    started = _started.pop(task_id, None)
    if started is None:
        return
    _sums[0] += time.thread_time() - started[0]
    _sums[1] += time.perf_counter() - started[1]
    _sums[2] += 1
    if _sums[2] == {every}:
        log.warning('PROBE cpu_ms=%.4f wall_ms=%.4f',
                    _sums[0] / _sums[2] * 1000, _sums[1] / _sums[2] * 1000)
        _sums[:] = [0.0, 0.0, 0]
'''
PROBE_EVERY = 250


def probe_figures(log):
    """Mean CPU and wall ms per task of the PROBE lines in a log."""
    found = re.findall(r'PROBE cpu_ms=([0-9.]+) wall_ms=([0-9.]+)', log)
    return ([float(cpu) for cpu, _ in found],
            [float(wall) for _, wall in found])


def succeeded_times(log, name, last):
    """The run times (ms) of the last *last* tasks *name* in a log."""
    times = re.findall(
        rf'Task {re.escape(name)}\[[^\]]+\] succeeded in ([0-9.e-]+)s', log)
    return [float(t) * 1000 for t in times[-last:]]


def wait_all(results, timeout=600):
    workers.wait_results(results, timeout)


class Client:
    """This process as the web process of a site (sends as Alice)."""

    def __init__(self, site):
        self.site = site

    def __enter__(self):
        zope.component.testing.setUp()
        xmlconfig.file(self.site.site_zcml)
        login_principal(get_principal('zope.alice'))
        return self

    def __exit__(self, *exc):
        transaction.abort()
        zope.component.testing.tearDown()

    def send(self, name, calls):
        """Queue one task per args tuple in *calls*, commit; results."""
        task = zope.component.getUtility(ITask, name)
        results = [task.delay(*args) for args in calls]
        transaction.commit()
        return results


def drain(send):
    """Seconds from sending until every result is stored."""
    start = time.perf_counter()
    results = send()
    wait_all(results)
    return time.perf_counter() - start, results


def median(values):
    return statistics.median(values)


def paired_median(values, baselines):
    """The median of the ratios of the rounds, each to its own baseline.

    The two things compared run one right after the other in each round,
    so a ratio per round cancels what the machine did during that round
    (2 shared cores drift by 20% from one round to the next).
    """
    return median([v / b for v, b in zip(values, baselines)])


def noop_benchmark(redis, zeo, tmp):
    print(f'1. {NOOPS} no-op tasks, prefork -c 2, {ROUNDS} rounds',
          flush=True)
    plain_dir = os.path.join(tmp, 'plain')
    os.makedirs(plain_dir)
    url = redis.url + '/1'
    with open(os.path.join(plain_dir, 'bench_plain_app.py'), 'w') as f:
        f.write(PLAIN_APP.format(url=url))
    with open(os.path.join(plain_dir, 'bench_probe.py'), 'w') as f:
        f.write(PROBE.replace('{every}', str(PROBE_EVERY)))
    pythonpath = os.pathsep.join([plain_dir, ROOT])
    sys.path.insert(0, plain_dir)
    import bench_plain_app
    plain_app = bench_plain_app.app

    site = workers.write_site(os.path.join(tmp, 'noop'), redis.url + '/0',
                              zeo_address=zeo.address, events=False)
    plain = workers.Worker(app='bench_plain_app', broker_url=url,
                           pool='prefork', concurrency=2,
                           directory=plain_dir, args=['-I', 'bench_probe'],
                           env={'PYTHONPATH': pythonpath})
    zope_worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                                 pool='prefork', concurrency=2,
                                 directory=os.path.join(tmp, 'noop'),
                                 args=['-I', 'bench_probe'],
                                 env={'PYTHONPATH': pythonpath})
    rates = {'plain': [], 'z3c': []}
    with plain, zope_worker, Client(site) as client:
        def send_plain(n):
            with plain_app.producer_or_acquire() as producer:
                return [plain_app.send_task('plain.noop', producer=producer)
                        for _ in range(n)]

        def send_z3c(n):
            return client.send('t.noop', [()] * n)

        # Warm up both (pool processes, connections, caches).
        wait_all(send_plain(WARMUP))
        wait_all(send_z3c(WARMUP))
        started = {'plain': plain, 'z3c': zope_worker}
        # CPU per task of each round: the probe lines it added to the log.
        seen = {name: len(probe_figures(worker.log())[0])
                for name, worker in started.items()}
        round_cpu = {'plain': [], 'z3c': []}
        for round_ in range(ROUNDS):
            order = [('plain', send_plain), ('z3c', send_z3c)]
            if round_ % 2:
                order.reverse()
            for name, send in order:
                seconds, _ = drain(lambda: send(NOOPS))
                rates[name].append(NOOPS / seconds)
                cpu = probe_figures(started[name].log())[0]
                round_cpu[name].append(statistics.mean(
                    cpu[seen[name]:] or cpu[-1:]))
                seen[name] = len(cpu)
                print(f'   round {round_ + 1} {name}: '
                      f'{NOOPS / seconds:.0f} tasks/s, '
                      f'{round_cpu[name][-1]:.3f} CPU ms per task',
                      flush=True)
        plain_times = succeeded_times(plain.log(), 'plain.noop',
                                      NOOPS * ROUNDS)
        z3c_times = succeeded_times(zope_worker.log(), 't.noop',
                                    NOOPS * ROUNDS)
        plain_cpu, plain_wall = probe_figures(plain.log())
        z3c_cpu, z3c_wall = probe_figures(zope_worker.log())
    plain_app.close()
    return {
        'plain_cpu_ms': median(plain_cpu), 'z3c_cpu_ms': median(z3c_cpu),
        'plain_wall_ms': median(plain_wall),
        'z3c_wall_ms': median(z3c_wall),
        'plain_rate': median(rates['plain']),
        'z3c_rate': median(rates['z3c']),
        'ratio': paired_median(rates['z3c'], rates['plain']),
        'extra_cpu_ms': median([z - p for z, p in zip(round_cpu['z3c'],
                                                     round_cpu['plain'])]),
        'plain_ms': median(plain_times),
        'z3c_ms': median(z3c_times),
    }


def marker_benchmark(redis, zeo, tmp):
    print(f'2. {WRITES} tasks writing distinct keys, done-markers on/off, '
          f'{ROUNDS} rounds', flush=True)
    sites = {
        'on': workers.write_site(os.path.join(tmp, 'on'), redis.url + '/2',
                                 zeo_address=zeo.address, events=False),
        'off': workers.write_site(os.path.join(tmp, 'off'),
                                  redis.url + '/3', zeo_address=zeo.address,
                                  config='done_markers="false"',
                                  events=False),
    }
    started = {name: workers.Worker(
        site.zope_conf, broker_url=site.broker_url, pool='prefork',
        concurrency=2, directory=site.directory).start()
        for name, site in sites.items()}
    rates = {'on': [], 'off': []}
    failed = 0
    retries = {}
    try:
        for name in ('on', 'off'):   # warm up
            with Client(sites[name]) as client:
                wait_all(client.send(
                    'w.put', [(f'warm-{name}-{i}', i)
                              for i in range(WARMUP)]))
        for round_ in range(ROUNDS):
            order = ['on', 'off'] if round_ % 2 == 0 else ['off', 'on']
            for name in order:
                with Client(sites[name]) as client:
                    seconds, results = drain(lambda: client.send(
                        'w.put', [(f'{name}-{round_}-{i}', i)
                                  for i in range(WRITES)]))
                failed += sum(r.state != 'SUCCESS' for r in results)
                rates[name].append(WRITES / seconds)
                print(f'   round {round_ + 1} markers {name}: '
                      f'{WRITES / seconds:.0f} tasks/s', flush=True)
        retries = {name: len(re.findall(r'hit a conflict', worker.log()))
                   for name, worker in started.items()}
    finally:
        for worker in started.values():
            worker.stop()
    db = workers.zeo_db(zeo.address)
    try:
        data = workers.read_data(db)
    finally:
        db.close()
    lost = sum(1 for name in ('on', 'off') for round_ in range(ROUNDS)
               for i in range(WRITES)
               if data.get(f'{name}-{round_}-{i}') != i)
    return {'on': median(rates['on']), 'off': median(rates['off']),
            'ratio': paired_median(rates['on'], rates['off']),
            'lost': lost, 'failed': failed, 'retries': retries}


def conflict_benchmark(redis, zeo, tmp):
    print(f'3. {INCREMENTS} increments: one counter against distinct '
          f'counters, {ROUNDS} rounds', flush=True)
    site = workers.write_site(os.path.join(tmp, 'conflicts'),
                              redis.url + '/4', zeo_address=zeo.address,
                              events=False)
    worker = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                            pool='prefork', concurrency=2,
                            directory=site.directory)
    times = {'one': [], 'distinct': []}
    lost = failed = 0
    db = workers.zeo_db(zeo.address)
    with worker, Client(site) as client:
        wait_all(client.send('t.increment', [('warm',)] * WARMUP))
        for round_ in range(ROUNDS):
            order = ['one', 'distinct'] if round_ % 2 == 0 else \
                ['distinct', 'one']
            for name in order:
                if name == 'one':
                    calls = [(f'counter-{round_}',)] * INCREMENTS
                else:
                    calls = [(f'c-{round_}-{i}',) for i in range(INCREMENTS)]
                seconds, results = drain(
                    lambda: client.send('t.increment', calls))
                times[name].append(seconds)
                failed += sum(r.state != 'SUCCESS' for r in results)
                print(f'   round {round_ + 1} {name}: {seconds:.2f} s',
                      flush=True)
            data = workers.read_data(db)
            lost += INCREMENTS - data.get(f'counter-{round_}', 0)
            lost += sum(1 for i in range(INCREMENTS)
                        if data.get(f'c-{round_}-{i}') != 1)
        retries = len(re.findall(r'hit a conflict', worker.log()))
    db.close()
    return {'one': median(times['one']),
            'distinct': median(times['distinct']),
            'ratio': paired_median(times['one'], times['distinct']),
            'lost': lost,
            'failed': failed, 'retries': retries}


def report(noop, marker, conflict):
    rate_ratio = noop['ratio']
    extra_ms = noop['extra_cpu_ms']
    marker_cost = 1 - marker['ratio']
    drain_ratio = conflict['ratio']

    def met(ok):
        return 'yes' if ok else 'NO'
    lines = [
        '# Worker: benchmark results',
        '',
        f'Written by `python -m benchmarks worker` '
        f'({time.strftime("%Y-%m-%d %H:%M")}, {os.cpu_count()} cores, '
        f'Python {sys.version.split()[0]}).  Every worker: '
        f'`celery worker -P prefork -c 2`, one Redis, one ZEO server; '
        f'{ROUNDS} rounds, the two things compared one right after the '
        'other in each round (in turns which goes first).  Rates and times '
        'are medians over the rounds; ratios are medians of the ratios '
        'within each round, which cancel what the shared machine did '
        'during that round.',
        '',
        f'### 1. {NOOPS} no-op tasks (sent at once, until every result '
        'is stored)',
        '',
        '| what | plain Celery | z3c.celery | z3c / plain | goal | met |',
        '|---|---:|---:|---:|---:|---|',
        f'| tasks/s | {noop["plain_rate"]:.0f} | {noop["z3c_rate"]:.0f} | '
        f'{rate_ratio:.2f} | >= 0.95 | {met(rate_ratio >= 0.95)} |',
        f'| CPU ms per task in the pool process | '
        f'{noop["plain_cpu_ms"]:.3f} | {noop["z3c_cpu_ms"]:.3f} | '
        f'+{extra_ms:.3f} ms | <= +0.15 ms | {met(extra_ms <= 0.15)} |',
        f'| wall ms per task in the pool process (probe) | '
        f'{noop["plain_wall_ms"]:.3f} | {noop["z3c_wall_ms"]:.3f} | '
        f'+{noop["z3c_wall_ms"] - noop["plain_wall_ms"]:.3f} ms | | |',
        f'| wall ms per task, Celery\'s "succeeded in" (median) | '
        f'{noop["plain_ms"]:.3f} | {noop["z3c_ms"]:.3f} | '
        f'+{noop["z3c_ms"] - noop["plain_ms"]:.3f} ms | | |',
        '',
        'CPU ms: CPU time of the pool process from Celery\'s '
        '`task_prerun` to its `task_postrun` signal (the task call and '
        'storing its result), mean per task; medians of the means of '
        f'{PROBE_EVERY} tasks; the difference is the median of the '
        'differences within each round.  Wall times also count the time a '
        'process '
        'waited for one of the 2 cores, shared by 2 pool processes, the '
        'worker, Redis, the ZEO server and this process.',
        '',
        f'### 2. {WRITES} tasks writing distinct keys of one OOBTree '
        'over ZEO',
        '',
        '| done-markers | tasks/s |',
        '|---|---:|',
        f'| off | {marker["off"]:.0f} |',
        f'| on | {marker["on"]:.0f} |',
        '',
        f'Cost of the markers: {marker_cost * 100:.1f}% of tasks/s, median '
        f'of the rounds (goal '
        f'<= 10%: {met(marker_cost <= 0.10)}); lost writes: '
        f'{marker["lost"]}, failed tasks: {marker["failed"]}; conflict '
        f'retries: {marker["retries"].get("on")} (on), '
        f'{marker["retries"].get("off")} (off).',
        '',
        f'### 3. {INCREMENTS} increments, same worker',
        '',
        '| what | drain time (s) |',
        '|---|---:|',
        f'| {INCREMENTS} distinct counters | {conflict["distinct"]:.2f} |',
        f'| one counter (conflicting) | {conflict["one"]:.2f} |',
        '',
        f'Ratio {drain_ratio:.2f}, median of the rounds (goal <= 1.5: '
        f'{met(drain_ratio <= 1.5)}); lost increments: {conflict["lost"]}, '
        f'failed tasks: {conflict["failed"]} (goal 0 and 0: '
        f'{met(conflict["lost"] == 0 and conflict["failed"] == 0)}); '
        f'conflict retries in all rounds: {conflict["retries"]}.',
        '',
    ]
    return '\n'.join(lines)


def main():
    tmp = tempfile.mkdtemp(prefix='z3c-bench-worker-')
    try:
        with servers.RedisServer() as redis, \
                servers.ZEOServer(os.path.join(tmp, 'Data.fs')) as zeo:
            db = workers.zeo_db(zeo.address)
            workers.prepare_database(db)
            db.close()
            noop = noop_benchmark(redis, zeo, tmp)
            marker = marker_benchmark(redis, zeo, tmp)
            conflict = conflict_benchmark(redis, zeo, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(noop, marker, conflict)
    with open(RESULTS, 'w') as f:
        f.write(text)
    print(text)
    return text


if __name__ == '__main__':
    main()
