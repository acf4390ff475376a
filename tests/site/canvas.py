"""Every way a task leaves a process, each as a function of a tag.

``WAYS[name](tag)`` sends in the current transaction and returns what the
test site's ZODB must hold once everything it sent has run: ``{tag: value
the step was called with}``, each run exactly once.  The tests call them
in a web process (tests/test_canvas_worker.py, tests/test_follow_ups.py)
and the task ``c.send_inside`` calls them inside a worker's task.
"""
import celery
import zope.component

import z3c.celery
from z3c.celery.interfaces import ITask


def task(name):
    return zope.component.getUtility(ITask, name)


def step():
    return task('c.step')


def delay(tag):
    step().delay(1, tag)
    return {tag: 1}


def apply_async(tag):
    step().apply_async((1, tag), countdown=0.2, expires=120, priority=3,
                       queue='celery')
    return {tag: 1}


def send_task(tag):
    z3c.celery.CELERY.send_task('c.step', (1, tag))
    return {tag: 1}


def signature(tag):
    step().s(1, tag).apply_async(countdown=0.1)
    return {tag: 1}


def chain(tag):
    celery.chain(step().s(1, f'{tag}.1'), step().s(f'{tag}.2'),
                 step().s(f'{tag}.3')).delay()
    return {f'{tag}.1': 1, f'{tag}.2': 2, f'{tag}.3': 3}


def group(tag):
    celery.group(step().s(1, f'{tag}.1'), step().s(2, f'{tag}.2')).delay()
    return {f'{tag}.1': 1, f'{tag}.2': 2}


def chord(tag):
    celery.chord([step().s(1, f'{tag}.1'), step().s(2, f'{tag}.2')],
                 task('c.total').s(f'{tag}.cb')).delay()
    return {f'{tag}.1': 1, f'{tag}.2': 2, f'{tag}.cb': [2, 3]}


def link(tag):
    step().apply_async((1, f'{tag}.1'), link=step().s(f'{tag}.2'))
    return {f'{tag}.1': 1, f'{tag}.2': 2}


def link_error(tag):
    result = task('c.failing_step').apply_async(
        (1, f'{tag}.1'), link_error=task('c.note_failure').s(f'{tag}.err'))
    return {f'{tag}.err': result.id}


def chunks(tag):
    step().chunks([(1, f'{tag}.1'), (2, f'{tag}.2'), (3, f'{tag}.3')],
                  2).delay()
    return {f'{tag}.1': 1, f'{tag}.2': 2, f'{tag}.3': 3}


def starmap(tag):
    step().starmap([(1, f'{tag}.1'), (2, f'{tag}.2')]).delay()
    return {f'{tag}.1': 1, f'{tag}.2': 2}


def map(tag):
    task('c.mark').map([f'{tag}.1', f'{tag}.2']).delay()
    return {f'{tag}.1': None, f'{tag}.2': None}


def queued_by_a_task(tag):
    task('c.queue_step').delay(tag)
    return {tag: 1}


def replace(tag):
    task('c.replace_by_step').delay(tag)
    return {tag: 1}


def retry(tag):
    task('c.retry_then_step').delay(tag)
    return {tag: 1}


WAYS = {function.__name__: function for function in [
    delay, apply_async, send_task, signature, chain, group, chord, link,
    link_error, chunks, starmap, map, queued_by_a_task, replace, retry]}
