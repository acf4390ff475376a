"""The project's tasks: shared tasks, as the 1.x documentation asks."""
import celery
import zope.component.hooks
import zope.security.management

from z3c.celery.celery import Abort
from z3c.celery.celery import HandleAfterAbort


#: What tasks run in this process recorded (eager and direct calls).
RECORDED = []


def principal_title():
    interaction = zope.security.management.getInteraction()
    return interaction.participations[0].principal.title


@celery.shared_task
def add(a, b):
    return a + b


@celery.shared_task
def get_principal_title():
    return principal_title()


@celery.shared_task
def record(value):
    RECORDED.append((value, principal_title()))
    return value


@celery.shared_task
def store(key, value):
    site = zope.component.hooks.getSite()
    site[key] = (value, principal_title())
    return key


@celery.shared_task(bind=True)
def get_task_id(self):
    return self.task_id


@celery.shared_task(bind=True)
def retry_once(self):
    if self.request.retries < 1:
        raise self.retry(countdown=0.1)
    return self.request.retries


def write_data(*args, **kw):
    site = zope.component.hooks.getSite()
    if site is not None:
        site['data'] = (args, kw, principal_title())
    RECORDED.append(('callback', args, kw))


@celery.shared_task
def fail_with_handler():
    site = zope.component.hooks.getSite()
    if site is not None:
        site['foo'] = 'bar'
    raise HandleAfterAbort(write_data, 'a1', 'a2', kw=4, message='handled')


@celery.shared_task
def succeed_but_abort():
    site = zope.component.hooks.getSite()
    if site is not None:
        site['flub'] = 'not written'
    raise Abort(write_data, 'aborted', message='done')
