"""The main job (README command 1) runs, keeps every promise, cleans up.

It runs as the README runs it (a subprocess, ``--quick`` for fewer
tasks): its own Redis and ZEO, a real prefork worker, a broker outage.
Afterwards the test reads the FileStorage itself, so a bug in the job's
own checks cannot hide a lost or doubled task, and checks that every
process the job started is gone.
"""
import json
import os
import subprocess
import sys

import pytest
import ZODB
import ZODB.FileStorage

from tests.conftest import ROOT


EXAMPLES = os.path.join(ROOT, 'examples')
MAIN_JOB = os.path.join(EXAMPLES, 'main_job.py')
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import main_job  # noqa: E402


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope='module')
def job(tmp_path_factory):
    work = tmp_path_factory.mktemp('main-job')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('EXAMPLE_')}
    process = subprocess.run(
        [sys.executable, MAIN_JOB, '--quick', '--work-dir', str(work),
         '--timeout', '60'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    return process, work


def worker_log(work):
    try:
        with open(work / 'worker.log', errors='replace') as f:
            return f.read()[-4000:]
    except OSError:
        return ''


def test_main_job_keeps_every_promise(job):
    process, work = job
    output = process.stdout + process.stderr
    assert process.returncode == 0, output + worker_log(work)
    assert 'Every promise kept.' in output
    assert 'FAILED' not in output
    assert 'Summary (checked against the ZODB)' in output


def test_main_job_stopped_every_process_it_started(job):
    process, work = job
    with open(work / 'pids.json') as f:
        started = json.load(f)
    labels = [label for label, _ in started]
    assert labels == ['Redis', 'ZEO', 'worker', 'Redis (restarted)']
    assert [label for label, pid in started if not gone(pid)] == []
    worker_pid = dict(started)['worker']
    with pytest.raises(ProcessLookupError):   # no pool process left
        os.killpg(worker_pid, 0)
    for label in ('worker', 'ZEO', 'Redis'):
        assert f'stopped {label} (pid' in process.stdout


def test_database_shows_each_task_ran_once(job):
    """Read the job's FileStorage directly, after the job ended."""
    _, work = job
    db = ZODB.DB(ZODB.FileStorage.FileStorage(
        str(work / 'Data.fs'), read_only=True))
    try:
        state = main_job.snapshot(db)
    finally:
        db.close()
    docs = state['documents']
    sizes = main_job.SIZES['quick']
    published = {name for name, doc in docs.items() if doc['published_by']}
    never = {'aborted-existing', 'savepoint-dropped', 'newsletter'}
    assert published == set(docs) - never
    assert 'aborted-new' not in docs      # aborted with its transaction
    assert {docs[n]['published_by'] for n in published if
            n.startswith('bob-')} == {'example.bob'}
    outage = {n for n in published if n.startswith('outage-')}
    assert len(outage) == sizes['outage_batches'] * sizes['outage_batch']
    assert state['views'] == sizes['views']
    assert set(state['runs'].values()) == {1}
    assert len(state['runs']) == len(published) + sizes['views']
    assert docs['newsletter']['newsletter'] == 'failed'
    assert [entry[:2] for entry in state['audit'].values()] == [
        ('exampleapp.send_newsletter', 'example.alice')]


def expectations():
    expect = main_job.Expectations()
    expect.published = {'alice-1': ('example.alice', 't1'),
                        'savepoint-kept': ('example.alice', 't2')}
    expect.not_published = {'aborted-new': ('abort', 't3'),
                            'savepoint-dropped': ('savepoint', 't4')}
    expect.view_tasks = ['v1', 'v2']
    expect.newsletter = ('newsletter', 't5', 'example.alice')
    expect.skipped['outage'] = 'external broker'
    return expect


def good_state():
    return {
        'documents': {
            'alice-1': {'published_by': 'example.alice',
                        'published_task': 't1', 'newsletter': None},
            'savepoint-kept': {'published_by': 'example.alice',
                               'published_task': 't2', 'newsletter': None},
            'savepoint-dropped': {'published_by': None,
                                  'published_task': None,
                                  'newsletter': None},
            'newsletter': {'published_by': None, 'published_task': None,
                           'newsletter': 'failed'},
        },
        'views': 2,
        'runs': {'t1': 1, 't2': 1, 'v1': 1, 'v2': 1},
        'retries': {'v1': 0, 'v2': 1},
        'audit': {'t5': ('exampleapp.send_newsletter', 'example.alice',
                         'No mail server')},
    }


def failed(rows):
    return [row.promise for row in rows if not row.ok]


def test_verify_passes_a_good_state():
    rows = main_job.verify(good_state(), expectations())
    assert failed(rows) == []
    assert main_job.exit_status(rows) == 0


def test_verify_fails_on_a_lost_task():
    state = good_state()
    state['documents']['alice-1']['published_by'] = None
    del state['runs']['t1']
    rows = main_job.verify(state, expectations())
    assert failed(rows) == [main_job.PROMISES['principal']]
    assert main_job.exit_status(rows) == 1


def test_verify_fails_on_a_task_that_ran_twice():
    state = good_state()
    state['runs']['v2'] = 2
    state['views'] = 3
    rows = main_job.verify(state, expectations())
    assert failed(rows) == [main_job.PROMISES['conflicts'],
                            main_job.PROMISES['once']]
    assert main_job.exit_status(rows) == 1


def test_verify_fails_on_a_task_sent_despite_rollback():
    state = good_state()
    state['documents']['savepoint-dropped']['published_by'] = 'example.alice'
    state['runs']['t4'] = 1
    rows = main_job.verify(state, expectations())
    assert failed(rows) == [main_job.PROMISES['savepoint'],
                            main_job.PROMISES['once']]


def test_broker_option_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv('EXAMPLE_BROKER_URL', 'amqp://guest@127.0.0.1//')
    assert main_job.parse_args([]).broker == 'amqp://guest@127.0.0.1//'
    assert main_job.parse_args(['--broker', 'redis://127.0.0.1:1/0']
                               ).broker == 'redis://127.0.0.1:1/0'
    monkeypatch.delenv('EXAMPLE_BROKER_URL')
    assert main_job.parse_args([]).broker is None


def test_zope_conf_gets_this_runs_values(tmp_path):
    path = main_job.write_zope_conf(str(tmp_path / 'zope.conf'),
                                    '127.0.0.1:9999')
    with open(path) as f:
        text = f.read()
    assert f'%define EXAMPLE_HOME {EXAMPLES}\n' in text
    assert '%define EXAMPLE_ZEO 127.0.0.1:9999\n' in text
