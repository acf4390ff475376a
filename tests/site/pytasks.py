"""A task defined in Python (not in ZCML), for the beat tests."""
import z3c.celery

from tests.site.tasks import tick


@z3c.celery.CELERY.task(name='py.tick')
def py_tick(key):
    return tick(key)
