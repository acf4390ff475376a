"""Periodic tasks: ``celery beat --zope-conf`` and ``worker -B`` deliver
every tick, each as its entry's principal (real processes: beat, worker,
ZEO and Redis)."""
import os
import subprocess
import sys
import time

import pytest

from z3c.celery.testing import servers

from tests import workers


SCHEDULE = """
  <unauthenticatedPrincipal id="zope.anybody" title="Anybody" />
  <celery:schedule name="alice-ticks" task="w.tick" seconds="1"
                   args="['{prefix}alice']" principal="zope.alice" />
  <celery:schedule name="anonymous-ticks" task="w.tick" seconds="1"
                   kwargs="{{'key': '{prefix}anonymous'}}" />
"""

#: A Python-registered task (tests.site.pytasks, imported by beat and the
#: worker through the ``imports`` setting) in the site's beat_schedule.
CONFIG = """
      imports="tests.site.pytasks"
      beat_schedule="{{'python-ticks': {{'task': 'py.tick', 'schedule': 1.0,
                      'args': ['{prefix}python'],
                      'options': {{'_principal_id_': 'zope.bob'}}}}}}"
"""


class Beat:
    """A real ``celery beat`` process, stopped by its pid."""

    def __init__(self, directory, args):
        self.directory = directory
        self.log_path = os.path.join(directory, 'beat.log')
        self.command = [sys.executable, '-m', 'celery', '-A',
                        'z3c.celery.CELERY', 'beat', '-l', 'INFO',
                        '-s', os.path.join(directory, 'schedule')] + args
        self.process = None

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=workers.ROOT, PYTHONUNBUFFERED='1')
        for name in ('CELERY_CONFIG_MODULE', 'CELERY_CONFIG_FILE',
                     'Z3C_CELERY_ZOPE_CONF'):
            env.pop(name, None)
        self._log = open(self.log_path, 'ab')
        self.process = subprocess.Popen(
            self.command, cwd=self.directory, env=env, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        return self

    def __exit__(self, *exc):
        servers.stop_process(self.process, timeout=20)
        self._log.close()

    def log(self):
        with open(self.log_path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')


def ticks(db, key):
    return workers.read_data(db).get(key, ())


def wait_for_ticks(db, keys, count, timeout=60, log=lambda: ''):
    deadline = time.monotonic() + timeout
    while True:
        found = {key: ticks(db, key) for key in keys}
        if all(len(found[key]) >= count for key in keys):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f'not {count} ticks of each of {keys} after {timeout}s: '
                f'{found}\n{log()}')
        time.sleep(0.5)


def test_beat_process_sends_every_tick_as_the_entry_principal(
        tmp_path, redis, zeo, zodb):
    prefix = 'beat-'
    # dispatch="outbox" on purpose: beat has no database, its ticks are
    # published after commit (and must not fail for want of a database).
    site = workers.write_site(
        str(tmp_path / 'site'), redis.url + '/1', zeo_address=zeo.address,
        dispatch='outbox', config=CONFIG.format(prefix=prefix),
        extra=SCHEDULE.format(prefix=prefix))
    keys = [prefix + name for name in ('alice', 'anonymous', 'python')]
    with workers.Worker(site.zope_conf, broker_url=site.broker_url,
                        directory=str(tmp_path)) as worker:
        with Beat(str(tmp_path), ['--zope-conf', site.zope_conf]) as beat:
            found = wait_for_ticks(zodb, keys, 3,
                                   log=lambda: beat.log() + worker.log())
        log = beat.log()
    assert set(found[prefix + 'alice']) == {'zope.alice'}
    assert set(found[prefix + 'anonymous']) == {'zope.anybody'}
    assert set(found[prefix + 'python']) == {'zope.bob'}
    # The site's broker, not Celery's default; no warning about principals.
    assert f'@127.0.0.1:{redis.port}/1' in log, log
    assert 'run with no principal' not in log
    assert 'Traceback' not in log and 'Error' not in log, log


def test_every_tick_beat_sent_reaches_the_worker(tmp_path, redis, zeo, zodb):
    """About one tick per second and entry, each reached the worker; with
    our scheduler chosen explicitly (``-S``)."""
    prefix = 'count-'
    site = workers.write_site(
        str(tmp_path / 'site'), redis.url + '/2', zeo_address=zeo.address,
        extra=SCHEDULE.format(prefix=prefix))
    with workers.Worker(site.zope_conf, broker_url=site.broker_url,
                        directory=str(tmp_path)) as worker:
        with Beat(str(tmp_path), [
                '--zope-conf', site.zope_conf,
                '-S', 'z3c.celery.worker.beat:ZopeScheduler']) as beat:
            wait_for_ticks(zodb, [prefix + 'alice'], 1,
                           log=lambda: beat.log() + worker.log())
            time.sleep(4)
        sent = beat.log().count('Sending due task alice-ticks')
        # Every tick beat sent arrives (the worker drains the queue).
        found = wait_for_ticks(zodb, [prefix + 'alice'], sent,
                               timeout=30, log=worker.log)
    assert sent >= 4
    assert 'scheduler -> z3c.celery.worker.beat.ZopeScheduler' in beat.log()
    assert len(found[prefix + 'alice']) == sent


def test_worker_with_embedded_beat_delivers_ticks_and_warns_about_no_principal(
        tmp_path, redis, zeo, zodb):
    """``worker -B`` (solo: the worker process has the database open when
    beat forks); a site without unauthenticated principal: beat warns at
    start naming the entry, whose ticks run with no principal."""
    prefix = 'embedded-'
    schedule = SCHEDULE.replace(
        '<unauthenticatedPrincipal id="zope.anybody" title="Anybody" />', '')
    site = workers.write_site(
        str(tmp_path / 'site'), redis.url + '/3', zeo_address=zeo.address,
        dispatch='outbox', extra=schedule.format(prefix=prefix))
    worker = workers.Worker(
        site.zope_conf, broker_url=site.broker_url, directory=str(tmp_path),
        args=['-B', '-s', str(tmp_path / 'schedule')])
    with worker:
        found = wait_for_ticks(
            zodb, [prefix + 'alice', prefix + 'anonymous'], 3,
            log=worker.log)
        log = worker.log()
    assert set(found[prefix + 'alice']) == {'zope.alice'}
    assert set(found[prefix + 'anonymous']) == {None}
    warnings = [line for line in log.splitlines()
                if 'run with no principal' in line]
    assert warnings, log
    assert all("schedule entry 'anonymous-ticks' (task w.tick)" in line
               for line in warnings), warnings


@pytest.mark.parametrize('pool', ['prefork'])
def test_prefork_worker_with_embedded_beat(tmp_path, redis, zeo, zodb, pool):
    prefix = f'{pool}-'
    site = workers.write_site(
        str(tmp_path / 'site'), redis.url + '/4', zeo_address=zeo.address,
        config=CONFIG.format(prefix=prefix),
        extra=SCHEDULE.format(prefix=prefix))
    worker = workers.Worker(
        site.zope_conf, broker_url=site.broker_url, directory=str(tmp_path),
        pool=pool, concurrency=1,
        args=['-B', '-s', str(tmp_path / 'schedule')])
    keys = [prefix + name for name in ('alice', 'anonymous', 'python')]
    with worker:
        found = wait_for_ticks(zodb, keys, 2, log=worker.log)
    assert set(found[prefix + 'alice']) == {'zope.alice'}
    assert set(found[prefix + 'anonymous']) == {'zope.anybody'}
    assert set(found[prefix + 'python']) == {'zope.bob'}


# In-process: the scheduler's transaction and principal.

@pytest.fixture
def scheduler(load_zcml, tmp_path):
    """Load a site (ZCML *body*) and return a `ZopeScheduler` of it."""
    import z3c.celery
    from z3c.celery.worker import beat

    def make(body):
        load_zcml(body)
        return beat.ZopeScheduler(
            app=z3c.celery.CELERY, lazy=True,
            schedule_filename=str(tmp_path / 'schedule'))
    yield make


def entry(scheduler, name, task, **options):
    import celery.beat
    return celery.beat.ScheduleEntry(
        name=name, task=task, schedule=1.0, args=('k',), options=options,
        app=scheduler.app)


def received(app, timeout=2.0):
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(app.conf.task_default_queue)
        try:
            message = queue.get(timeout=timeout)
            message.ack()
            return message.payload
        finally:
            queue.close()


def test_a_tick_is_committed_and_sent_as_the_unauthenticated_principal(
        scheduler):
    import transaction

    from z3c.celery.sending import queue
    sched = scheduler('''
      <unauthenticatedPrincipal id="zope.anybody" title="Anybody" />
      <celery:config broker_url="memory://" dispatch="after-commit" />
      <celery:task name="b.read" handler="tests.tasks.read" />''')
    result = sched.apply_async(entry(sched, 'anonymous', 'b.read'),
                               advance=False)
    assert queue.queued_messages() == []        # nothing left behind
    transaction.abort()                         # sends nothing more
    args, kwargs, _ = received(sched.app)
    assert args == ['k'] and kwargs == {'_principal_id_': 'zope.anybody'}
    assert result.id


def test_an_entry_principal_wins_and_unknown_tasks_carry_it(scheduler):
    sched = scheduler('''
      <unauthenticatedPrincipal id="zope.anybody" title="Anybody" />
      <celery:config broker_url="memory://" dispatch="after-commit" />''')
    sched.apply_async(entry(sched, 'e', 'not.here', _principal_id_='zope.x'),
                      advance=False)
    args, kwargs, _ = received(sched.app)
    assert kwargs == {'_principal_id_': 'zope.x'}


def test_a_tick_whose_commit_fails_is_an_error_naming_entry_and_task(
        scheduler):
    import celery.beat

    from z3c.celery.sending import queue

    # dispatch="outbox" set explicitly and no database: the commit fails
    # (beat's start would have switched to after-commit; lazy=True did not
    # run it).
    sched = scheduler('''
      <celery:config broker_url="memory://" dispatch="outbox" />
      <celery:task name="b.read" handler="tests.tasks.read" />''')
    with pytest.raises(celery.beat.SchedulingError) as info:
        sched.apply_async(entry(sched, 'failing', 'b.read'), advance=False)
    text = str(info.value)
    assert "Couldn't send scheduled task failing (b.read[" in text, text
    assert 'no database' in text, text
    assert queue.queued_messages() == []


def test_beat_start_switches_outbox_to_after_commit_without_database(
        scheduler, caplog):
    from z3c.celery.worker import beat
    sched = scheduler('''
      <celery:config broker_url="memory://" dispatch="outbox" />
      <celery:schedule name="lonely" task="t.noop" seconds="1" />''')
    caplog.set_level('INFO')
    beat.prepare_process(sched.app)
    assert sched.app.z3c_setting('dispatch') == 'after-commit'
    beat.check_principals({'lonely': entry(sched, 'lonely', 't.noop')})
    assert "schedule entry 'lonely' (task t.noop) run with no principal" \
        in caplog.text
