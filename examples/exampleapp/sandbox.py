"""The example site in one process, without broker or worker.

For trying the site out in a Python prompt, and for the documentation's
examples: the site ZCML is loaded, a FileStorage is opened, and tasks run
*inline*: queued for real, and run right after the commit in this process,
each in its own transaction and connection, as a worker would run them.
"""
import os

import exampleapp
import ZODB
import ZODB.FileStorage
import zope.component.testing
from zope.configuration import xmlconfig

from z3c.celery import CELERY
from z3c.celery import database


#: The directory of the example site (site.zcml, zope.conf, ...).
EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_site(overrides=()):
    """Load ``site.zcml``, then the ZCML files in *overrides* over it.

    *overrides* are file names relative to the examples directory (such
    as ``'overrides.zcml'``), included with ``includeOverrides``.
    """
    body = ''.join(f'<includeOverrides file="{os.path.join(EXAMPLES, f)}"'
                   ' />\n' for f in overrides)
    return xmlconfig.string(f'''\
<configure xmlns="http://namespaces.zope.org/zope">
  <include file="{os.path.join(EXAMPLES, 'site.zcml')}" />
  {body}
</configure>''')


def open_sandbox(directory, overrides=()):
    """Load the site and open ``Data.fs`` in *directory*; return the DB.

    Tasks run inline (``dispatch`` ``inline``) against this database.
    Close it with `close_sandbox`.
    """
    zope.component.testing.setUp()
    load_site(overrides)
    CELERY.conf.dispatch = 'inline'
    db = ZODB.DB(ZODB.FileStorage.FileStorage(
        os.path.join(directory, 'Data.fs')))
    with db.transaction() as connection:
        exampleapp.bootstrap(connection)
    database.set_database(db)
    return db


def close_sandbox(db):
    """Close *db* and forget the site's configuration."""
    database.set_database(None)
    db.close()
    zope.component.testing.tearDown()
