"""The example application of z3c.celery: documents and what tasks do to them.

Everything lives in the ZODB next to the root folder (``Application``, the
site the worker sets for each task):

* ``documents``: the documents, keyed by name, written by the web side;
* ``views``: one counter that every ``count_view`` task increments, on
  purpose without conflict resolution, so that concurrent tasks conflict;
* ``runs``: how many times each task id changed the database (1, or the
  task ran twice);
* ``retries``: how many conflict retries the task with that id needed;
* ``audit``: failures, written by the site's after-abort handler override.
"""
import persistent
import zope.component.hooks
import zope.security.management
from BTrees.OOBTree import OOBTree


#: Key of the application's data in the ZODB root.
ROOT_KEY = 'exampleapp'


class Document(persistent.Persistent):
    """A document; tasks publish it and send its newsletter."""

    published_by = None
    published_task = None
    newsletter = None

    def __init__(self, title):
        self.title = title


class Counter(persistent.Persistent):
    """A number without conflict resolution: concurrent writes conflict."""

    value = 0


class ExampleData(persistent.Persistent):
    """The application's root object."""

    def __init__(self):
        self.documents = OOBTree()
        self.views = Counter()
        self.runs = OOBTree()
        self.retries = OOBTree()
        self.audit = OOBTree()


def bootstrap(connection):
    """Create the root site and the application data if they are missing.

    Returns true if something was created (the caller commits).
    """
    from zope.site.folder import rootFolder
    from zope.site.site import LocalSiteManager
    root = connection.root()
    created = False
    if 'Application' not in root:
        folder = rootFolder()
        folder.setSiteManager(LocalSiteManager(folder))
        root['Application'] = folder
        created = True
    if ROOT_KEY not in root:
        root[ROOT_KEY] = ExampleData()
        created = True
    return created


def data(connection=None):
    """The application data: of *connection*, else of the current site.

    In a task the site is the root folder the worker set, so its
    connection is the task's connection.
    """
    if connection is None:
        connection = zope.component.hooks.getSite()._p_jar
    return connection.root()[ROOT_KEY]


def principal_id():
    """The id of the principal the current code runs as."""
    interaction = zope.security.management.getInteraction()
    return interaction.participations[0].principal.id


def note_run(task):
    """Count that *task* (its id) changed the database once more."""
    runs = data().runs
    task_id = task.request.id
    runs[task_id] = runs.get(task_id, 0) + 1
