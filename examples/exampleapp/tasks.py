"""The tasks of the example site (registered in ``site.zcml``).

Each is bound (``bind="true"``) to see its own id in ``self.request``.
"""
import time

from exampleapp import data
from exampleapp import note_run
from exampleapp import principal_id

from z3c.celery.exceptions import HandleAfterAbort


def publish(self, name):
    """Publish document *name* as the principal who queued the task.

    The document was written in the same transaction that queued the
    task: the task sees it because it runs only after that commit.
    """
    document = data().documents[name]
    document.published_by = principal_id()
    document.published_task = self.request.id
    note_run(self)


def count_view(self, dwell=0.0):
    """Add one to the shared view counter.

    Read, wait *dwell* seconds, write: tasks running at the same time
    conflict, and the conflict policy retries them until each has counted
    exactly once.
    """
    counter = data().views
    value = counter.value
    time.sleep(dwell)
    counter.value = value + 1
    data().retries[self.request.id] = self.request.retries or 0
    note_run(self)


def send_newsletter(self, name):
    """Fail (there is no mail server), and mark the document afterwards.

    The write below is rolled back with the task's transaction; the
    callback of `HandleAfterAbort` runs in a new transaction after it.
    """
    data().documents[name].newsletter = 'sending'
    raise HandleAfterAbort(newsletter_failed, name,
                           message=f'No mail server for {name!r}')


def newsletter_failed(name):
    data().documents[name].newsletter = 'failed'
