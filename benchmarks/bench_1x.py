"""z3c.celery 2 against z3c.celery 1.x: distinct keys of one OOBTree.

Run with ``python -m benchmarks 1x`` (or ``python -m
benchmarks.bench_1x``).  Issue 18 asks for the tasks/s of 1000 tasks
writing distinct keys into one OOBTree, against the 1.x figure measured
the same way (goal >= 1.3x).

The 1.x side runs in a virtualenv of its own, made by this benchmark in
a temporary directory (``python -m venv``, then ``pip install`` of the
newest ``z3c.celery<2`` pip finds, with what its worker and its site
need).  Celery, kombu, billiard, redis, ZODB, ZEO, BTrees, persistent and
transaction are pinned to the versions of this process, so that both
sides differ in z3c.celery only; if pip cannot install those pins, it
tries again without them and the report says which versions ran.  pip's
cache is kept under the system temp directory (``BENCH_1X_PIP_CACHE``);
the virtualenv is removed at the end, unless ``BENCH_1X_VENV`` names one
to make or reuse (kept).  ``BENCH_1X_REQUIREMENT`` replaces
``z3c.celery>=1,<2``; ``BENCH_1X_PYTHON`` is the interpreter of the
virtualenv (default: this one).  If 1.x cannot be installed or started,
the report says why, and no comparison is made.

Which 1.x: on Python 3.11, 1.8.0 (PyPI's 1.9.0 and 1.10.0 require Python
>= 3.13).  For what is measured here they behave alike: 1.10.0's
``z3c/celery/celery.py`` differs from 1.8.0's only in ending the
interaction in a ``finally`` after ``transaction.abort()``.  Both retry a
conflict (in the task body or at commit) through Celery's retry, with a
random countdown of up to 2^retries seconds, and sleep in the process
only when an after-abort handler conflicts.  With ``BENCH_1X_PYTHON`` set
to a Python 3.13, the newest 1.x is installed (1.10.0), but then the two
sides run on different interpreters.

Both sides, in one run:

* one private Redis (2.x on db 7, 1.x on db 8) and one ZEO server (a
  FileStorage behind it); each side writes into its own OOBTree under the
  database root (``data`` for 2.x, ``data1x`` for 1.x: the same layout,
  and the two trees grow alike over the rounds);
* ``celery worker -P prefork -c 2`` each, both running for the whole
  run.  The 1.x worker is started as 1.x documents it, in the Celery 5
  form: ``celery -A z3c.celery.CELERY --config celeryconfig worker``,
  its ``celeryconfig.py`` naming ``ZOPE_CONF``: a zope.conf that is a
  ZEO client of the shared server, whose site ZCML has the principal
  registry (``zope.alice``) and zope.app.appsetup, as 1.x's own
  ``ftesting.zcml``; its task is a ``@z3c.celery.task`` function of a
  module written here.  The 2.x worker is bench_worker's, with the
  task ``w.put`` of the test site;
* the sender of each side queues the 1000 tasks in one transaction as
  Alice and commits (1.x and 2.x both send at commit), then waits until
  every result is stored: the time from sending until then gives
  tasks/s (bench_worker's ``drain``; for 1.x the same steps in a sender
  process of the 1.x virtualenv, driven through a pipe);
* paired rounds (``BENCH_ROUNDS``, default 5), the order reversed every
  other round, after a warm-up of each; rates are medians over the
  rounds, the ratio is the median of the per-round ratios.

Also reported: conflicts (bucket splits) and how each side handled them,
counted from the workers' logs (2.x: retries at once in the pool process
and through the broker; 1.x: its ``ConflictError, retrying`` warnings and
the retries it sent), writes missing from the trees and tasks whose
result was not a success.
"""
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import bench_worker
from z3c.celery.testing import WorkerProcess
from z3c.celery.testing import servers
from z3c.celery.testing import write_zope_conf

from tests import workers


WRITES = 1000
WARMUP = bench_worker.WARMUP
ROUNDS = int(os.environ.get('BENCH_ROUNDS', 5))
REQUIREMENT = os.environ.get('BENCH_1X_REQUIREMENT', 'z3c.celery>=1,<2')
BASE_PYTHON = os.environ.get('BENCH_1X_PYTHON') or sys.executable
PIP_CACHE = os.environ.get('BENCH_1X_PIP_CACHE', os.path.join(
    tempfile.gettempdir(), 'z3c-celery-bench-1x-pip-cache'))
#: Installed in the 1.x virtualenv at the versions of this process.
PINNED = ('celery', 'kombu', 'billiard', 'vine', 'redis', 'ZODB', 'ZEO',
          'BTrees', 'persistent', 'transaction', 'zodbpickle')
#: Celery's Redis transport and what the 1.x site ZCML includes (as
#: 1.x's ftesting.zcml).
SITE_PACKAGES = ('celery[redis]', 'zope.principalregistry', 'zope.traversing',
                 'zope.container', 'zope.app.appsetup')
#: Versions shown in the report, of each side.
SHOWN = ('z3c.celery', 'celery', 'kombu', 'redis', 'ZODB', 'ZEO',
         'BTrees', 'transaction')
REDIS_DB = {'2x': 7, '1x': 8}
TREE = {'2x': 'data', '1x': 'data1x'}
INSTALL_TIMEOUT = 900

#: The 1.x task module (1.x: tasks are ``z3c.celery.task`` or
#: ``shared_task`` functions; the task runs with the root folder as its
#: site, on the worker's connection).
TASKS_1X = '''\
"""The task of the 1.x side of benchmarks/bench_1x.py."""
import z3c.celery
import zope.component.hooks


@z3c.celery.task(name='b1x.put')
def put(key, value):
    root = zope.component.hooks.getSite()._p_jar.root()
    root[{tree!r}][key] = value
'''

#: The 1.x site ZCML (as 1.x's ftesting.zcml: the principal registry as
#: IAuthentication, zope.app.appsetup for the database).
SITE_1X = '''\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="zope.component" file="meta.zcml" />
  <include package="zope.security" file="meta.zcml" />
  <include package="zope.component" />
  <include package="zope.traversing" />
  <include package="zope.container" />
  <include package="zope.principalregistry" file="meta.zcml" />
  <include package="zope.principalregistry" />
  <include package="zope.app.appsetup" />
  <principal id="zope.alice" title="Alice" login="alice" password="a" />
</configure>
'''

#: The 1.x web process: loads the site ZCML, logs in as Alice, then for
#: each line ``{"prefix": ..., "n": ...}`` on stdin queues n tasks
#: ``b1x.put(prefix-i, i)`` in one transaction, commits (1.x sends at
#: commit) and waits until every result is stored; answers one JSON line
#: (seconds from sending until then, the states of the results).
SENDER_1X = '''\
"""The sender of the 1.x side of benchmarks/bench_1x.py."""
import collections
import json
import sys
import time

import celery.exceptions
import celery.states
import transaction
from zope.configuration import xmlconfig

from z3c.celery.celery import get_principal
from z3c.celery.celery import login_principal
import b1x_tasks

TIMEOUT = 600


def wait(results):
    """Wait until every result is ready (notification, else its state)."""
    deadline = time.monotonic() + TIMEOUT
    for result in results:
        while True:
            left = deadline - time.monotonic()
            try:
                result.get(timeout=min(5.0, max(0.1, left)), propagate=False)
                break
            except celery.exceptions.TimeoutError:
                if result.state in celery.states.READY_STATES:
                    break
                if left <= 0:
                    raise


def main():
    xmlconfig.file(sys.argv[1])
    login_principal(get_principal('zope.alice'))
    print(json.dumps({'ready': True}), flush=True)
    for line in sys.stdin:
        order = json.loads(line)
        start = time.perf_counter()
        results = [b1x_tasks.put.delay(f"{order['prefix']}-{i}", i)
                   for i in range(order['n'])]
        transaction.commit()
        wait(results)
        seconds = time.perf_counter() - start
        states = collections.Counter(r.state for r in results)
        print(json.dumps({'seconds': seconds, 'states': states}),
              flush=True)


main()
'''

#: 1.x's log lines about conflicts (z3c.celery.celery, 1.x): the warning
#: of each conflict, and the retry it sends through the broker.
CONFLICT_1X = re.compile(r'ConflictError, retrying')
RETRY_SENT_1X = re.compile(r'Task submitted for retry in ')
SLEEP_1X = re.compile(r'Waiting [0-9.e-]+ seconds for retry')


class Unavailable(Exception):
    """The 1.x side cannot be installed or started (the message says why)."""


def run(command, timeout=INSTALL_TIMEOUT, **kw):
    """Run *command*; its output; `Unavailable` with its tail if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f'`{" ".join(command)}` failed: {e}') from None
    if done.returncode:
        tail = '\n'.join((done.stdout + done.stderr).splitlines()[-25:])
        raise Unavailable(f'`{" ".join(command)}` exited with '
                          f'{done.returncode}:\n{tail}')
    return done.stdout


def here_versions(names):
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def venv_versions(python):
    """The versions of SHOWN in the virtualenv of *python*."""
    script = ('import importlib.metadata as m, json\n'
              f'names = {list(SHOWN)!r}\n'
              'found = {}\n'
              'for n in names:\n'
              '    try:\n'
              '        found[n] = m.version(n)\n'
              '    except m.PackageNotFoundError:\n'
              '        pass\n'
              'import platform\n'
              'found["Python"] = platform.python_version()\n'
              'print(json.dumps(found))\n')
    return json.loads(run([python, '-c', script], timeout=60))


def make_venv(directory):
    """A virtualenv with z3c.celery 1.x in *directory*; its python and
    a note on how it was installed."""
    python = os.path.join(directory, 'bin', 'python')
    stamp = os.path.join(directory, 'bench-1x-installed')
    pins = [f'{name}=={version}'
            for name, version in here_versions(PINNED).items()]
    wanted = [REQUIREMENT, *SITE_PACKAGES]
    key = hashlib.sha1(json.dumps([BASE_PYTHON] + wanted + pins).encode(
        )).hexdigest()
    with contextlib.suppress(OSError), open(stamp) as f:
        note = f.read()
        if note.startswith(key):
            print(f'   reusing the 1.x virtualenv {directory}', flush=True)
            return python, note[len(key) + 1:]
    print(f'   making a virtualenv for {REQUIREMENT} in {directory} '
          '(python -m venv, pip install)', flush=True)
    run([BASE_PYTHON, '-m', 'venv', '--clear', directory])
    pip = [python, '-m', 'pip', 'install', '--disable-pip-version-check',
           '--cache-dir', PIP_CACHE, '--quiet']
    try:
        run(pip + wanted + pins)
        note = ('Celery, kombu, billiard, redis, ZODB, ZEO, BTrees, '
                'persistent and transaction pinned to the versions of the '
                '2.x side')
    except Unavailable as e:
        print(f'   pip could not install 1.x with the pins of this '
              f'process ({e}); again without them', flush=True)
        run(pip + wanted)
        note = ('pip could not install 1.x with the versions of the 2.x '
                'side pinned; its own choice of versions ran')
    with open(stamp, 'w') as f:
        f.write(f'{key}\n{note}')
    return python, note


class Worker1x(WorkerProcess):
    """The 1.x worker: ``celery -A z3c.celery.CELERY --config celeryconfig
    worker`` run by the python of the 1.x virtualenv."""

    def __init__(self, python, *args, **kw):
        super().__init__(*args, **kw)
        self.python = python

    def command(self):
        command = super().command()
        command[0] = self.python
        return command


class Sender1x:
    """The 1.x web process (SENDER_1X in the 1.x virtualenv)."""

    def __init__(self, python, directory, site_zcml, env):
        self.log_path = os.path.join(directory, 'sender.log')
        self._log = open(self.log_path, 'wb')
        self.process = subprocess.Popen(
            [python, os.path.join(directory, 'b1x_sender.py'), site_zcml],
            cwd=directory, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._answer()

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(30)
            with open(self.log_path, errors='replace') as f:
                raise Unavailable(
                    f'The 1.x sender exited with {self.process.returncode}:'
                    f'\n{f.read()[-3000:]}')
        return json.loads(line)

    def drain(self, prefix, n):
        """Send *n* tasks, wait for them: (seconds, states)."""
        self.process.stdin.write(json.dumps({'prefix': prefix, 'n': n})
                                 + '\n')
        self.process.stdin.flush()
        answer = self._answer()
        return answer['seconds'], answer['states']

    def close(self):
        """Stop it by its pid: end of input, else SIGTERM, else SIGKILL."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        for stop in (None, self.process.terminate, self.process.kill):
            if stop is not None:
                with contextlib.suppress(ProcessLookupError):
                    stop()
            try:
                self.process.wait(15)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.stdout.close()
        self._log.close()


def write_1x(directory, python, redis, zeo):
    """The files of the 1.x side; its worker (not started) and env."""
    os.makedirs(directory)
    site_zcml = os.path.join(directory, 'site.zcml')
    with open(site_zcml, 'w') as f:
        f.write(SITE_1X)
    with open(os.path.join(directory, 'b1x_tasks.py'), 'w') as f:
        f.write(TASKS_1X.format(tree=TREE['1x']))
    with open(os.path.join(directory, 'b1x_sender.py'), 'w') as f:
        f.write(SENDER_1X)
    zope_conf = write_zope_conf(os.path.join(directory, 'zope.conf'),
                                site_zcml, zeo_address=zeo.address)
    url = f'{redis.url}/{REDIS_DB["1x"]}'
    settings = {'ZOPE_CONF': zope_conf, 'broker_url': url,
                'result_backend': url, 'imports': ['b1x_tasks'],
                'worker_boot_timeout': 60}
    # Only the 1.x files on the path (not this checkout).
    env = {'PYTHONPATH': directory}
    worker = Worker1x(python, settings=settings, directory=directory,
                      parameters={'pool': 'prefork', 'concurrency': 2,
                                  'loglevel': 'INFO'},
                      env=env, timeout=90)
    sender_env = dict(os.environ, PYTHONPATH=directory,
                      CELERY_CONFIG_MODULE='celeryconfig',
                      PYTHONUNBUFFERED='1')
    sender_env.pop('CELERY_CONFIG_FILE', None)
    return worker, site_zcml, sender_env


def prepare(zeo):
    db = workers.zeo_db(zeo.address)
    try:
        workers.prepare_database(db)
        from BTrees.OOBTree import OOBTree
        with db.transaction() as conn:
            conn.root().setdefault(TREE['1x'], OOBTree())
    finally:
        db.close()


def lost_writes(zeo, prefixes):
    """Writes missing from the trees: ``{side: n}``."""
    db = workers.zeo_db(zeo.address)
    try:
        with db.transaction() as conn:
            conn.sync()
            root = conn.root()
            lost = {}
            for side, side_prefixes in prefixes.items():
                tree = root[TREE[side]]
                lost[side] = sum(1 for prefix in side_prefixes
                                 for i in range(WRITES)
                                 if tree.get(f'{prefix}-{i}') != i)
            return lost
    finally:
        db.close()


def counts_1x(log):
    return {'conflicts': len(CONFLICT_1X.findall(log)),
            'broker': len(RETRY_SENT_1X.findall(log)),
            'sleeps': len(SLEEP_1X.findall(log))}


def compare(python, tmp, redis, zeo):
    print(f'{WRITES} tasks writing distinct keys of one OOBTree, '
          f'z3c.celery 2 against 1.x, prefork -c 2, {ROUNDS} rounds',
          flush=True)
    prepare(zeo)
    site = workers.write_site(
        os.path.join(tmp, '2x'), f'{redis.url}/{REDIS_DB["2x"]}',
        zeo_address=zeo.address, events=False)
    worker2 = workers.Worker(site.zope_conf, broker_url=site.broker_url,
                             pool='prefork', concurrency=2,
                             directory=site.directory)
    worker1, site_zcml, sender_env = write_1x(
        os.path.join(tmp, '1x'), python, redis, zeo)
    rates = {'2x': [], '1x': []}
    failed = {'2x': 0, '1x': 0}
    prefixes = {'2x': [], '1x': []}
    sender = None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(worker1)
        except Exception as e:
            raise Unavailable(f'The 1.x worker did not start: {e}') from None
        stack.enter_context(worker2)
        sender = Sender1x(python, worker1.directory, site_zcml, sender_env)
        stack.callback(sender.close)
        client = stack.enter_context(bench_worker.Client(site))

        def drain(side, prefix, n):
            """Seconds to send *n* tasks and have them done; not-succeeded."""
            if side == '2x':
                seconds, results = bench_worker.drain(lambda: client.send(
                    'w.put', [(f'{prefix}-{i}', i) for i in range(n)]))
                return seconds, sum(r.state != 'SUCCESS' for r in results)
            seconds, states = sender.drain(prefix, n)
            return seconds, n - states.get('SUCCESS', 0)
        for side in ('2x', '1x'):   # warm up
            drain(side, f'{side}-warm', WARMUP)
        logs_before = {'2x': worker2.log(), '1x': worker1.log()}
        for round_ in range(ROUNDS):
            order = ['2x', '1x'] if round_ % 2 == 0 else ['1x', '2x']
            for side in order:
                prefix = f'{side}-{round_}'
                seconds, not_succeeded = drain(side, prefix, WRITES)
                prefixes[side].append(prefix)
                failed[side] += not_succeeded
                rates[side].append(WRITES / seconds)
                print(f'   round {round_ + 1} {side}: '
                      f'{WRITES / seconds:.0f} tasks/s'
                      + (f', {not_succeeded} not succeeded'
                         if not_succeeded else ''), flush=True)
        retries = {
            '2x': subtract(bench_worker.retries_in(worker2.log()),
                           bench_worker.retries_in(logs_before['2x'])),
            '1x': subtract(counts_1x(worker1.log()),
                           counts_1x(logs_before['1x']))}
    return {'rates': {side: bench_worker.median(values)
                      for side, values in rates.items()},
            'ratio': bench_worker.paired_median(rates['2x'], rates['1x']),
            'ratios': bench_worker.paired(rates['2x'], rates['1x']),
            'failed': failed, 'lost': lost_writes(zeo, prefixes),
            'retries': retries}


def subtract(after, before):
    return {name: after[name] - before[name] for name in after}


def versions_line(versions):
    return ', '.join(f'{name} {versions[name]}'
                     for name in ('Python', *SHOWN) if name in versions)


def report(figures, versions, note):
    rates, retries = figures['rates'], figures['retries']
    tasks = WRITES * ROUNDS
    ratio = figures['ratio']
    r2, r1 = retries['2x'], retries['1x']
    met = 'yes' if ratio >= 1.3 else 'NO'
    lines = [
        f'# z3c.celery 2 against z3c.celery {versions["1x"]["z3c.celery"]}'
        f': {WRITES} tasks writing distinct keys of one OOBTree',
        '',
        f'Written by `python -m benchmarks 1x` '
        f'({time.strftime("%Y-%m-%d %H:%M")}, {os.cpu_count()} cores, '
        f'Python {sys.version.split()[0]}).  One Redis, one ZEO server; '
        'each side writes into an OOBTree of its own under the database '
        'root, same layout.  Each worker: `celery worker -P prefork -c 2`'
        ' (1.x: `celery -A z3c.celery.CELERY --config celeryconfig worker`'
        ', its celeryconfig naming ZOPE_CONF, a ZEO client zope.conf).  '
        'Each sender queues the tasks in one transaction and commits, '
        'then waits for every result; tasks/s from sending until the last'
        f' is stored.  {ROUNDS} paired rounds, the order reversed every '
        'other round, after a warm-up of each; rates are medians over '
        'the rounds, the ratio the median of the ratios within each '
        'round.',
        '',
        f'- 2.x: {versions_line(versions["2x"])}',
        f'- 1.x (its own virtualenv): {versions_line(versions["1x"])}; '
        f'{note}'
        + ('' if versions['1x'].get('Python') == versions['2x']['Python']
           else '.  **The two sides run on different Python versions**: '
           'the ratio mixes the interpreters with the packages'),
        '',
        '| | tasks/s | not succeeded | writes lost |',
        '|---|---:|---:|---:|',
        f'| z3c.celery {versions["1x"]["z3c.celery"]} | {rates["1x"]:.0f} '
        f'| {figures["failed"]["1x"]} | {figures["lost"]["1x"]} |',
        f'| z3c.celery 2 (this checkout) | {rates["2x"]:.0f} | '
        f'{figures["failed"]["2x"]} | {figures["lost"]["2x"]} |',
        '',
        f'Tasks/s of 2 against 1.x: **{ratio:.2f}x** (goal >= 1.3: {met}); '
        'the ratios of the rounds: '
        + ', '.join(f'{r:.2f}' for r in figures['ratios']) + '.',
        '',
        f'Conflicts (bucket splits) over the {tasks} measured tasks of '
        f'each side: 2.x ran {r2["in_process"]} again at once in the pool '
        f'process and sent {r2["broker"]} back through the broker '
        f'({r2["broker"] / tasks * 100:.1f}% of the tasks); '
        f'{versions["1x"]["z3c.celery"]} logged {r1["conflicts"]} '
        f'`ConflictError, retrying`, sent {r1["broker"]} retries through '
        f'the broker (Celery retry with a random countdown of up to '
        f'2^retries s) and slept {r1["sleeps"]} times in the process '
        '(1.x sleeps only when an after-abort handler conflicts).',
        '',
    ]
    return '\n'.join(lines)


def unavailable(reason):
    text = '\n'.join([
        '# z3c.celery 2 against z3c.celery 1.x: not measured',
        '',
        f'The 1.x side could not be made to run ({REQUIREMENT}, '
        f'{BASE_PYTHON}), so no comparison was made:',
        '',
        '```',
        str(reason).strip(),
        '```',
        '',
    ])
    print(text)
    return text


def main():
    tmp = tempfile.mkdtemp(prefix='z3c-bench-1x-')
    venv = os.environ.get('BENCH_1X_VENV') or os.path.join(tmp, 'venv')
    try:
        try:
            python, note = make_venv(venv)
            versions = {'2x': dict(here_versions(SHOWN),
                                   Python=sys.version.split()[0]),
                        '1x': venv_versions(python)}
            if 'z3c.celery' not in versions['1x']:
                raise Unavailable('z3c.celery is not in the 1.x virtualenv')
            print(f'   1.x side: {versions_line(versions["1x"])}',
                  flush=True)
            with servers.RedisServer() as redis, \
                    servers.ZEOServer(os.path.join(tmp, 'Data.fs')) as zeo:
                figures = compare(python, tmp, redis, zeo)
        except Unavailable as e:
            return unavailable(e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(figures, versions, note)
    print(text)
    return text


if __name__ == '__main__':
    main()
