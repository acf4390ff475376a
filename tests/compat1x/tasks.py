"""Tasks of the 1.x application: shared tasks, as the 1.x docs ask."""
import logging

import zope.component.hooks
import zope.security.management
from celery import shared_task

from z3c.celery.celery import Abort
from z3c.celery.celery import HandleAfterAbort


log = logging.getLogger(__name__)


def principal_title():
    interaction = zope.security.management.getInteraction()
    return interaction.participations[0].principal.title


@shared_task
def get_principal_title_task():
    """Return the title of the principal the task runs as."""
    return principal_title()


@shared_task
def store(key, value):
    """Store *value* and the principal's title in the root folder."""
    site = zope.component.hooks.getSite()
    site[key] = (value, principal_title())
    return value


@shared_task(bind=True)
def get_task_id(self):
    """Return the task id, as a bound shared task sees it."""
    assert self.task_id == self.request.id   # 1.x docs: ``self.task_id``
    return self.request.id


@shared_task
def except_with_handler():
    """Write, then fail; the handler writes after the abort."""
    site = zope.component.hooks.getSite()
    site['foo'] = 'bar'

    def handler(arg1, arg2, kw1=1, kw2=2):
        site = zope.component.hooks.getSite()
        site['data'] = (arg1, arg2, kw1, kw2, principal_title())

    raise HandleAfterAbort(handler, 'a1', 'a2', kw2=4, message='handled')


@shared_task
def success_but_abort_transaction():
    """Succeed with a message, but write nothing."""
    site = zope.component.hooks.getSite()
    site['flub'] = 'will not be written'
    raise Abort(lambda: None, message='done')


@shared_task
def log_message(text):
    """Write *text* to the log (TaskFormatter adds the task)."""
    log.info(text)
    return text
