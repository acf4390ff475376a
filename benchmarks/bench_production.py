"""The worker on the production parts: RabbitMQ and RelStorage (PostgreSQL).

Run with ``python -m benchmarks production``.  Three set-ups, each with a
z3c.celery worker and a plain Celery worker (``prefork -c 2`` both) on
the same broker, results in one private Redis:

* RabbitMQ (a node of our own, Debian's ``rabbitmq-server``) + ZEO;
* Redis + RelStorage (a new database ``z3c_test_<random>`` on the
  PostgreSQL of ``$Z3C_CELERY_POSTGRES_DSN``, dropped afterwards);
* RabbitMQ + RelStorage.

In each, every round runs the things compared one right after the other
(the order reversed every other round): no-op tasks of plain Celery and
of z3c.celery (tasks/s, ratio); tasks writing distinct keys of one
OOBTree (tasks/s); increments of one counter against increments of
distinct counters (drain time ratio = the cost of conflicts; lost and
failed tasks, conflict retries).  Short runs (the machine has 2 cores
shared with others); a set-up whose service is missing is reported as
skipped.
"""
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'RESULTS-production.md')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.bench_worker import Client  # noqa: E402
from benchmarks.bench_worker import drain  # noqa: E402
from benchmarks.bench_worker import median  # noqa: E402
from benchmarks.bench_worker import paired_median  # noqa: E402
from benchmarks.bench_worker import wait_all  # noqa: E402
from z3c.celery.testing import servers  # noqa: E402

from tests import services  # noqa: E402
from tests import workers  # noqa: E402


NOOPS = int(os.environ.get('BENCH_PRODUCTION_TASKS', 300))
INCREMENTS = 100
ROUNDS = int(os.environ.get('BENCH_PRODUCTION_ROUNDS', 3))
WARMUP = 50

PLAIN_APP = '''\
import celery

app = celery.Celery('plain', broker={broker!r}, backend={backend!r})
# Not the z3c.celery worker's queue (same broker).
app.conf.task_default_queue = 'plain'


@app.task(name='plain.noop')
def noop():
    return None
'''


def measure(label, broker_url, backend_url, site_kw, tmp, read_db):
    """The figures of one set-up (see the module docstring)."""
    print(f'{label}: {NOOPS} no-ops and writes, {INCREMENTS} increments, '
          f'{ROUNDS} rounds', flush=True)
    directory = os.path.join(tmp, re.sub(r'\W+', '-', label))
    plain_dir = os.path.join(directory, 'plain')
    os.makedirs(plain_dir)
    module = f'bench_plain_{abs(hash(label)) % 10 ** 6}'
    with open(os.path.join(plain_dir, module + '.py'), 'w') as f:
        f.write(PLAIN_APP.format(broker=broker_url, backend=backend_url))
    sys.path.insert(0, plain_dir)
    plain_app = __import__(module).app
    site = workers.write_site(os.path.join(directory, 'site'), broker_url,
                              result_backend=backend_url, events=False,
                              **site_kw)
    plain = workers.Worker(app=module, broker_url=broker_url,
                           pool='prefork', concurrency=2,
                           directory=plain_dir, start_timeout=120,
                           env={'PYTHONPATH': os.pathsep.join(
                               [plain_dir, ROOT])})
    zope_worker = workers.Worker(site.zope_conf, broker_url=broker_url,
                                 pool='prefork', concurrency=2,
                                 directory=site.directory,
                                 start_timeout=120)
    rates = {'plain': [], 'z3c': [], 'writes': []}
    times = {'one': [], 'distinct': []}
    failed = lost = 0
    with plain, zope_worker, Client(site) as client:
        def send_plain(n):
            with plain_app.producer_or_acquire() as producer:
                return [plain_app.send_task('plain.noop', producer=producer)
                        for _ in range(n)]
        kinds = {'plain': send_plain,
                 'z3c': lambda n: client.send('t.noop', [()] * n)}
        for send in kinds.values():
            wait_all(send(WARMUP))
        wait_all(client.send('t.increment', [('warm',)] * WARMUP))
        for round_ in range(ROUNDS):
            order = list(kinds) if round_ % 2 == 0 else list(kinds)[::-1]
            for name in order:
                seconds, results = drain(lambda: kinds[name](NOOPS))
                rates[name].append(NOOPS / seconds)
                failed += sum(r.state != 'SUCCESS' for r in results)
            seconds, results = drain(lambda: client.send(
                'w.put', [(f'w-{round_}-{i}', i) for i in range(NOOPS)]))
            rates['writes'].append(NOOPS / seconds)
            failed += sum(r.state != 'SUCCESS' for r in results)
            order = ['one', 'distinct'] if round_ % 2 == 0 else \
                ['distinct', 'one']
            for name in order:
                calls = ([(f'counter-{round_}',)] * INCREMENTS
                         if name == 'one' else
                         [(f'c-{round_}-{i}',) for i in range(INCREMENTS)])
                seconds, results = drain(
                    lambda: client.send('t.increment', calls))
                times[name].append(seconds)
                failed += sum(r.state != 'SUCCESS' for r in results)
            print(f'   round {round_ + 1}: plain {rates["plain"][-1]:.0f}, '
                  f'z3c {rates["z3c"][-1]:.0f}, writes '
                  f'{rates["writes"][-1]:.0f} tasks/s; increments one '
                  f'{times["one"][-1]:.2f} s, distinct '
                  f'{times["distinct"][-1]:.2f} s', flush=True)
        retries = len(re.findall(r'hit a conflict', zope_worker.log()))
    plain_app.close()
    data = read_db()
    for round_ in range(ROUNDS):
        lost += INCREMENTS - data.get(f'counter-{round_}', 0)
        lost += sum(1 for i in range(INCREMENTS)
                    if data.get(f'c-{round_}-{i}') != 1)
        lost += sum(1 for i in range(NOOPS)
                    if data.get(f'w-{round_}-{i}') != i)
    return {'plain': median(rates['plain']), 'z3c': median(rates['z3c']),
            'ratio': paired_median(rates['z3c'], rates['plain']),
            'writes': median(rates['writes']),
            'writes_ratio': paired_median(rates['writes'], rates['plain']),
            'one': median(times['one']),
            'distinct': median(times['distinct']),
            'conflict_ratio': paired_median(times['one'],
                                            times['distinct']),
            'retries': retries, 'lost': lost, 'failed': failed}


def reader(db_factory):
    def read():
        db = db_factory()
        try:
            return workers.read_data(db)
        finally:
            db.close()
    return read


def run_all(tmp, stack):
    redis = stack.enter_context(servers.RedisServer())
    results = {}
    rabbit = None
    if servers.rabbitmq_server_binary():
        rabbit = stack.enter_context(servers.RabbitMQServer(
            directory=None))
    else:
        results['RabbitMQ'] = 'skipped: no rabbitmq-server'
    dsn = None
    problem = services.check_postgres(services.postgres_dsn())
    if problem:
        results['RelStorage'] = f'skipped: PostgreSQL: {problem}'
    setups = []
    if rabbit is not None:
        zeo = stack.enter_context(servers.ZEOServer(
            os.path.join(tmp, 'Data.fs')))
        db = workers.zeo_db(zeo.address)
        workers.prepare_database(db)
        db.close()
        setups.append(('RabbitMQ + ZEO', rabbit.url,
                       {'zeo_address': zeo.address},
                       reader(lambda: workers.zeo_db(zeo.address))))
    if not problem:
        for name in ('redis', 'rabbit'):
            if name == 'rabbit' and rabbit is None:
                continue
            dsn = stack.enter_context(
                services.new_database(services.postgres_dsn()))
            db = workers.relstorage_db(dsn)
            workers.prepare_database(db)
            db.close()
            setups.append((
                'Redis + RelStorage' if name == 'redis'
                else 'RabbitMQ + RelStorage',
                redis.url + '/1' if name == 'redis' else rabbit.url,
                {'relstorage_dsn': dsn},
                reader(lambda dsn=dsn: workers.relstorage_db(dsn))))
    for label, broker_url, site_kw, read in setups:
        results[label] = measure(label, broker_url, redis.url + '/0',
                                 site_kw, tmp, read)
    return results


def report(results):
    lines = [
        '# The worker on RabbitMQ and RelStorage: benchmark results',
        '',
        f'Written by `python -m benchmarks production` '
        f'({time.strftime("%Y-%m-%d %H:%M")}, {os.cpu_count()} cores, '
        f'Python {sys.version.split()[0]}).  z3c.celery and plain Celery '
        'workers `prefork -c 2` on the same broker, results in Redis; '
        f'{ROUNDS} rounds of {NOOPS} no-op tasks, {NOOPS} writing tasks and '
        f'{INCREMENTS} increments; medians over the rounds, ratios are '
        'medians of the ratios within each round.',
        '',
        '| set-up | plain no-op tasks/s | z3c.celery no-op tasks/s | ratio '
        '| z3c.celery writing tasks/s | conflict drain ratio (one counter '
        '/ distinct) | conflict retries | lost | failed |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    notes = []
    for label, r in results.items():
        if isinstance(r, str):
            notes.append(f'{label}: {r}')
            continue
        lines.append(
            f'| {label} | {r["plain"]:.0f} | {r["z3c"]:.0f} | '
            f'{r["ratio"]:.2f} | {r["writes"]:.0f} | '
            f'{r["conflict_ratio"]:.2f} ({r["one"]:.2f} s / '
            f'{r["distinct"]:.2f} s) | {r["retries"]} | {r["lost"]} | '
            f'{r["failed"]} |')
    lines += [''] + notes + ([''] if notes else [])
    return '\n'.join(lines)


def main():
    tmp = tempfile.mkdtemp(prefix='z3c-bench-production-')
    try:
        with contextlib.ExitStack() as stack:
            results = run_all(tmp, stack)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(results)
    with open(RESULTS, 'w') as f:
        f.write(text)
    print(text)
    return text


if __name__ == '__main__':
    main()
