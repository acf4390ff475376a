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
   times.  Goals: >= 0.95x tasks/s; <= 0.15 ms more per task.  For
   reference, the same figures for plain Celery tasks that only begin
   and commit a ZODB transaction (a ZEO connection kept per pool
   process): what any integration of ZODB transactions costs at least.
2. 1000 tasks each writing a distinct key into one OOBTree over ZEO,
   with done-markers on and off (two workers, same database).  Goal:
   markers cost <= 10% of tasks/s.
   Goal for the conflicts they meet (bucket splits): broker retries
   <= 5% of the tasks (conflicts run again in the process first).
3. 200 increments of one counter (every pair of concurrent tasks
   conflicts; no conflict resolution) against 200 increments of 200
   distinct counters, same worker.  Drain time ratio, lost and failed
   tasks, retries in the process and through the broker.  Goal: ratio
   <= 1.25 with 0 lost and 0 failed.
4. Scale (figures, no goals): a worker's start until it answers a ping
   (prefork 2, z3c.celery with the site ZCML against plain Celery); the
   memory of each pool process (RSS and unique set size) against plain
   Celery's; a backlog of 10,000 no-op tasks drained by 1, 2 and 4 pool
   processes.
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

from z3c.celery.interfaces import ITask
from z3c.celery.testing import get_principal
from z3c.celery.testing import login_principal
from z3c.celery.testing import servers


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'RESULTS-worker.md')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import workers  # noqa: E402


NOOPS = 1000
WRITES = 1000
INCREMENTS = 200
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 9))
WARMUP = 200

PLAIN_APP = '''\
"""A plain Celery app with a no-op task: the baseline.

And, for reference, a task that only begins and commits a ZODB
transaction on a connection its pool process keeps, as z3c.celery does:
the least any integration of ZODB transactions costs.
"""
import celery
from celery import signals

app = celery.Celery('plain', broker={url!r}, backend={url!r})


@app.task(name='plain.noop')
def noop():
    return None


_kept = []


@app.task(name='plain.zodb')
def zodb():
    if not _kept:
        import transaction
        import ZEO
        db = ZEO.DB({zeo_address!r}, wait_timeout=30)
        manager = transaction.TransactionManager()
        _kept.append((db, manager, db.open(transaction_manager=manager)))
    db, manager, connection = _kept[0]
    manager.begin()
    connection.root()
    manager.commit()


@signals.worker_process_shutdown.connect(weak=False)
def close(**kw):
    for db, manager, connection in _kept:
        connection.close()
        db.close()
'''


#: Loaded into both workers of benchmark 1 (``-I bench_probe``): the CPU
#: time (and wall time) of each task in its pool process, from Celery's
#: ``task_prerun`` to its ``task_postrun`` signal (the task's call and
#: the storing of its result), summed up per task name and logged every
#: PROBE_EVERY tasks of a name.  CPU time leaves out the time the process
#: waited for a core.
PROBE = '''\
import logging
import time

from celery import signals

_started = {}
_sums = {}
log = logging.getLogger('bench_probe')


@signals.task_prerun.connect(weak=False)
def prerun(task_id=None, **kw):
    _started[task_id] = (time.thread_time(), time.perf_counter())


@signals.task_postrun.connect(weak=False)
def postrun(task_id=None, task=None, **kw):
    started = _started.pop(task_id, None)
    if started is None:
        return
    sums = _sums.setdefault(task.name, [0.0, 0.0, 0])
    sums[0] += time.thread_time() - started[0]
    sums[1] += time.perf_counter() - started[1]
    sums[2] += 1
    if sums[2] == {every}:
        log.warning('PROBE %s cpu_ms=%.4f wall_ms=%.4f', task.name,
                    sums[0] / sums[2] * 1000, sums[1] / sums[2] * 1000)
        sums[:] = [0.0, 0.0, 0]
'''
PROBE_EVERY = 250


def probe_figures(log, name):
    """Mean CPU and wall ms per task *name* of the PROBE lines in a log."""
    found = re.findall(
        rf'PROBE {re.escape(name)} cpu_ms=([0-9.]+) wall_ms=([0-9.]+)', log)
    return ([float(cpu) for cpu, _ in found],
            [float(wall) for _, wall in found])


def succeeded_times(log, name, last):
    """The run times (ms) of the last *last* tasks *name* in a log."""
    times = re.findall(
        rf'Task {re.escape(name)}\[[^\]]+\] succeeded in ([0-9.e-]+)s', log)
    return [float(t) * 1000 for t in times[-last:]]


#: Log lines of the retries of a conflict (see z3c.celery.worker.runner).
BROKER_RETRY = re.compile(r'hit a conflict .*; retry \d+ in ')
IN_PROCESS_RETRY = re.compile(r'hit a conflict .*; attempt \d+ at once')


def retries_in(log):
    """``{'broker': n, 'in_process': n}`` retries of conflicts in *log*."""
    return {'broker': len(BROKER_RETRY.findall(log)),
            'in_process': len(IN_PROCESS_RETRY.findall(log))}


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


def paired(values, baselines):
    """The ratios of the rounds, each to its own baseline, sorted."""
    return sorted(v / b for v, b in zip(values, baselines))


def quartiles(values):
    """First and third quartile of *values*."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


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
        f.write(PLAIN_APP.format(url=url, zeo_address=tuple(zeo.address)))
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
    #: What runs: (worker, task name) of each kind compared.
    kinds = {'plain': (plain, 'plain.noop'), 'zodb': (plain, 'plain.zodb'),
             'z3c': (zope_worker, 't.noop')}
    rates = {name: [] for name in kinds}
    round_cpu = {name: [] for name in kinds}
    with plain, zope_worker, Client(site) as client:
        def sender(name):
            if name == 'z3c':
                return lambda n: client.send('t.noop', [()] * n)

            def send(n):
                with plain_app.producer_or_acquire() as producer:
                    return [plain_app.send_task(kinds[name][1],
                                                producer=producer)
                            for _ in range(n)]
            return send
        senders = {name: sender(name) for name in kinds}
        # Warm up (pool processes, connections, caches).
        for send in senders.values():
            wait_all(send(WARMUP))
        # CPU per task of each round: the probe lines it added to the log.
        seen = {name: len(probe_figures(worker.log(), task)[0])
                for name, (worker, task) in kinds.items()}
        for round_ in range(ROUNDS):
            order = list(kinds)
            if round_ % 2:
                order.reverse()
            for name in order:
                worker, task = kinds[name]
                seconds, _ = drain(lambda: senders[name](NOOPS))
                rates[name].append(NOOPS / seconds)
                cpu = probe_figures(worker.log(), task)[0]
                round_cpu[name].append(statistics.mean(
                    cpu[seen[name]:] or cpu[-1:]))
                seen[name] = len(cpu)
                print(f'   round {round_ + 1} {name}: '
                      f'{NOOPS / seconds:.0f} tasks/s, '
                      f'{round_cpu[name][-1]:.3f} CPU ms per task',
                      flush=True)
        figures = {}
        for name, (worker, task) in kinds.items():
            log = worker.log()
            cpu, wall = probe_figures(log, task)
            figures[name] = {
                'rate': median(rates[name]), 'cpu_ms': median(cpu),
                'wall_ms': median(wall),
                'ms': median(succeeded_times(log, task, NOOPS * ROUNDS))}
    plain_app.close()

    def compared(name, baseline):
        return {'ratio': paired_median(rates[name], rates[baseline]),
                'ratios': paired(rates[name], rates[baseline]),
                'extra_cpu_ms': median([
                    a - b for a, b in zip(round_cpu[name],
                                          round_cpu[baseline])])}
    return {'figures': figures,
            'z3c': compared('z3c', 'plain'),
            'zodb': compared('zodb', 'plain'),
            'z3c_zodb': compared('z3c', 'zodb')}


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
        retries = {name: retries_in(worker.log())
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
        retries = retries_in(worker.log())
    db.close()
    return {'one': median(times['one']),
            'distinct': median(times['distinct']),
            'ratio': paired_median(times['one'], times['distinct']),
            'lost': lost,
            'failed': failed, 'retries': retries}


def report(noop, marker, conflict, scale):
    marker_broker = sum(r['broker'] for r in marker['retries'].values())
    marker_in_process = sum(
        r['in_process'] for r in marker['retries'].values())
    marker_tasks = 2 * WRITES * ROUNDS
    marker_broker_share = marker_broker / marker_tasks
    rate_ratio = noop['z3c']['ratio']
    extra_ms = noop['z3c']['extra_cpu_ms']
    figures = noop['figures']
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
        f'{ROUNDS} rounds, the things compared one right after the '
        'other in each round (the order reversed every other round).  '
        'Rates and times '
        'are medians over the rounds; ratios are medians of the ratios '
        'within each round, which cancel what the shared machine did '
        'during that round.',
        '',
        f'### 1. {NOOPS} no-op tasks (sent at once, until every result '
        'is stored)',
        '',
        'Three kinds of task, in the same rounds: plain Celery no-op '
        'tasks; plain Celery tasks that only begin and commit a ZODB '
        'transaction on a ZEO connection their pool process keeps (the '
        'least any integration of ZODB transactions costs: a reference, '
        'not a goal); z3c.celery no-op tasks (connection, site, '
        'principal, interaction, transaction, done-marker rules).',
        '',
        '| what | plain Celery | plain + ZODB transaction | z3c.celery '
        '| goal | met |',
        '|---|---:|---:|---:|---:|---|',
        f'| tasks/s | {figures["plain"]["rate"]:.0f} | '
        f'{figures["zodb"]["rate"]:.0f} | {figures["z3c"]["rate"]:.0f} | '
        '| |',
        f'| tasks/s against plain Celery | 1 | {noop["zodb"]["ratio"]:.2f} '
        f'| {rate_ratio:.2f} | >= 0.95 | {met(rate_ratio >= 0.95)} |',
        f'| CPU ms per task in the pool process | '
        f'{figures["plain"]["cpu_ms"]:.3f} | '
        f'{figures["zodb"]["cpu_ms"]:.3f} | '
        f'{figures["z3c"]["cpu_ms"]:.3f} | | |',
        f'| CPU ms per task above plain Celery | | '
        f'+{noop["zodb"]["extra_cpu_ms"]:.3f} | +{extra_ms:.3f} | '
        f'<= +0.15 | {met(extra_ms <= 0.15)} |',
        f'| wall ms per task in the pool process (probe) | '
        f'{figures["plain"]["wall_ms"]:.3f} | '
        f'{figures["zodb"]["wall_ms"]:.3f} | '
        f'{figures["z3c"]["wall_ms"]:.3f} | | |',
        f'| wall ms per task, Celery\'s "succeeded in" (median) | '
        f'{figures["plain"]["ms"]:.3f} | {figures["zodb"]["ms"]:.3f} | '
        f'{figures["z3c"]["ms"]:.3f} | | |',
        '',
        'Tasks/s ratios are medians of the ratios within each round; '
        'their first and third quartiles over the rounds show how much '
        'the machine moved: z3c.celery / plain '
        f'{quartiles(noop["z3c"]["ratios"])[0]:.2f} to '
        f'{quartiles(noop["z3c"]["ratios"])[1]:.2f}, plain + ZODB '
        'transaction / plain '
        f'{quartiles(noop["zodb"]["ratios"])[0]:.2f} to '
        f'{quartiles(noop["zodb"]["ratios"])[1]:.2f}.  What z3c.celery '
        'adds to a bare ZODB transaction: tasks/s '
        f'{noop["z3c_zodb"]["ratio"]:.2f}x, '
        f'+{noop["z3c_zodb"]["extra_cpu_ms"]:.3f} CPU ms per task.',
        '',
        'CPU ms: CPU time of the pool process from Celery\'s '
        '`task_prerun` to its `task_postrun` signal (the task call and '
        'storing its result), mean per task; medians of the means of '
        f'{PROBE_EVERY} tasks; the differences are medians of the '
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
        f'{marker["lost"]}, failed tasks: {marker["failed"]}.',
        '',
        'Conflicts (bucket splits of the OOBTree) in all rounds, markers '
        f'on and off: {marker_in_process} retries at once in the pool '
        f'process, {marker_broker} through the broker: '
        f'{marker_broker_share * 100:.1f}% of the {marker_tasks} tasks '
        f'(goal <= 5%: {met(marker_broker_share <= 0.05)}).',
        '',
        f'### 3. {INCREMENTS} increments, same worker',
        '',
        '| what | drain time (s) |',
        '|---|---:|',
        f'| {INCREMENTS} distinct counters | {conflict["distinct"]:.2f} |',
        f'| one counter (conflicting) | {conflict["one"]:.2f} |',
        '',
        f'Ratio {drain_ratio:.2f}, median of the rounds (goal <= 1.25: '
        f'{met(drain_ratio <= 1.25)}); lost increments: '
        f'{conflict["lost"]}, failed tasks: {conflict["failed"]} (goal 0 '
        f'and 0: {met(conflict["lost"] == 0 and conflict["failed"] == 0)});'
        f' conflict retries in all rounds: '
        f'{conflict["retries"]["in_process"]} at once in the pool process, '
        f'{conflict["retries"]["broker"]} through the broker.',
        '',
    ] + scale_report(scale)
    return '\n'.join(lines)


BACKLOG = int(os.environ.get('BENCH_BACKLOG', 10000))
STARTS = 3


def memory_of(pid):
    """RSS and unique set size (MiB) of process *pid*."""
    figures = {}
    with open(f'/proc/{pid}/smaps_rollup') as f:
        for line in f:
            name, _, rest = line.partition(':')
            if name in ('Rss', 'Private_Clean', 'Private_Dirty'):
                figures[name] = int(rest.split()[0]) / 1024
    return figures['Rss'], figures['Private_Clean'] + \
        figures['Private_Dirty']


def scale_benchmark(redis, zeo, tmp):
    print(f'4. scale: start, memory, a backlog of {BACKLOG} tasks by 1, 2 '
          'and 4 pool processes', flush=True)
    plain_dir = os.path.join(tmp, 'plain')     # written by benchmark 1
    pythonpath = os.pathsep.join([plain_dir, ROOT])
    url = redis.url + '/1'    # the plain app's broker (benchmark 1)
    site = workers.write_site(os.path.join(tmp, 'scale'), redis.url + '/6',
                              zeo_address=zeo.address, events=False)

    def plain_worker(concurrency=2):
        return workers.Worker(app='bench_plain_app', broker_url=url,
                              pool='prefork', concurrency=concurrency,
                              directory=plain_dir,
                              env={'PYTHONPATH': pythonpath})

    def zope_worker(concurrency=2):
        return workers.Worker(site.zope_conf, broker_url=site.broker_url,
                              pool='prefork', concurrency=concurrency,
                              directory=site.directory,
                              env={'PYTHONPATH': pythonpath})
    starts = {'plain': [], 'z3c': []}
    memory = {}
    for round_ in range(STARTS):
        for name, make in (('plain', plain_worker), ('z3c', zope_worker)):
            worker = make()
            began = time.perf_counter()
            worker.start()
            starts[name].append(time.perf_counter() - began)
            if round_ == STARTS - 1:
                with Client(site) as client:
                    if name == 'z3c':
                        wait_all(client.send('t.noop', [()] * WARMUP))
                    else:
                        import bench_plain_app
                        wait_all([bench_plain_app.app.send_task(
                            'plain.noop') for _ in range(WARMUP)])
                memory[name] = [memory_of(pid)
                                for pid in worker.pool_pids()]
            worker.stop()
    backlog = {}
    for concurrency in (1, 2, 4):
        with Client(site) as client:
            results = []
            for start in range(0, BACKLOG, 1000):
                results.extend(client.send('t.noop', [()] * 1000))
        worker = zope_worker(concurrency)
        began = time.perf_counter()
        worker.start()
        wait_all(results)
        backlog[concurrency] = time.perf_counter() - began
        worker.stop()
        print(f'   backlog by {concurrency}: {backlog[concurrency]:.1f} s',
              flush=True)
    return {'starts': {name: median(values)
                       for name, values in starts.items()},
            'memory': {name: (median([rss for rss, _ in values]),
                              median([uss for _, uss in values]))
                       for name, values in memory.items()},
            'backlog': backlog}


def scale_report(scale):
    starts, memory, backlog = \
        scale['starts'], scale['memory'], scale['backlog']
    lines = [
        '### 4. Scale (figures, no goals)',
        '',
        '| what | plain Celery | z3c.celery | ratio |',
        '|---|---:|---:|---:|',
        f'| start until it answers a ping, prefork 2 (s, median of '
        f'{STARTS}) | {starts["plain"]:.2f} | {starts["z3c"]:.2f} | '
        f'{starts["z3c"] / starts["plain"]:.2f} |',
        f'| RSS per pool process (MiB) | {memory["plain"][0]:.1f} | '
        f'{memory["z3c"][0]:.1f} | {memory["z3c"][0] / memory["plain"][0]:.2f}'
        ' |',
        f'| unique memory (USS) per pool process (MiB) | '
        f'{memory["plain"][1]:.1f} | {memory["z3c"][1]:.1f} | '
        f'{memory["z3c"][1] / memory["plain"][1]:.2f} |',
        '',
        f'A backlog of {BACKLOG} z3c.celery no-op tasks, queued before '
        'the worker starts, drained from its start:',
        '',
        '| pool processes | seconds | tasks/s | against 1 process |',
        '|---:|---:|---:|---:|',
    ]
    for concurrency, seconds in sorted(backlog.items()):
        lines.append(f'| {concurrency} | {seconds:.1f} | '
                     f'{BACKLOG / seconds:.0f} | '
                     f'{backlog[1] / seconds:.2f} |')
    lines += ['', 'The machine has 2 cores: 4 pool processes share them '
              'with the worker, Redis, the ZEO server and this process.',
              '']
    return lines


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
            scale = scale_benchmark(redis, zeo, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(noop, marker, conflict, scale)
    with open(RESULTS, 'w') as f:
        f.write(text)
    print(text)
    return text


if __name__ == '__main__':
    main()
