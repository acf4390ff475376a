"""Where tasks find the ZODB: the process's database, its root site.

The worker bootstep sets the database it opened from zope.conf; a web
process that runs under zope.app.appsetup has its databases registered as
``IDatabase`` utilities, which are found without any call here.  Tests set
one with `set_database`.
"""
import ZODB.interfaces
import zope.component
import zope.component.interfaces
import zope.testing.cleanup


#: The key of the root folder in the ZODB root (as zope.app.appsetup and
#: zope.app.publication name it).
ROOT_NAME = 'Application'


class _State:
    database = None


_state = _State()


def set_database(db):
    """Make *db* the database tasks run against in this process.

    ``None`` forgets it (the ``IDatabase`` utility is used again).
    """
    _state.database = db


def get_database(name=''):
    """Return the database tasks use, or ``None`` when there is none.

    The database set with `set_database` wins; otherwise the
    ``IDatabase`` utility called *name* (zope.app.appsetup registers the
    databases of zope.conf that way, the first one as '').  With several
    databases, *name* selects one of the multi-database.
    """
    db = _state.database
    if db is None:
        return zope.component.queryUtility(ZODB.interfaces.IDatabase, name)
    if name and getattr(db, 'databases', None):
        return db.databases.get(name, db if name == db.database_name
                                else None)
    return db


def _reset():
    _state.database = None


zope.testing.cleanup.addCleanUp(_reset)


def root_site(connection):
    """The root folder of *connection*'s database if it is a site."""
    if connection is None:
        return None
    site = connection.root().get(ROOT_NAME)
    if not zope.component.interfaces.ISite.providedBy(site):
        return None
    return site
