"""Where tasks find the ZODB: the process's database, its root site, and
the connection a transaction writes through.

The worker bootstep sets the database it opened from zope.conf; a web
process that runs under zope.app.appsetup has its databases registered as
``IDatabase`` utilities, which are found without any call here.  Tests set
one with `set_database`.  The last functions read what the transaction
package keeps no public accessor for (a transaction's resources and
synchronizers): they are together here, to be checked on an upgrade.
"""
import transaction
import ZODB.interfaces
import zope.component
import zope.component.interfaces
import zope.testing.cleanup
from ZODB.Connection import Connection


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


def writes_to_zodb(txn):
    """Whether *txn* has ZODB changes to commit.

    A ZODB connection joins the transaction when its first object is
    changed or added, so a joined connection means a write.
    """
    return any(isinstance(resource, Connection)
               for resource in getattr(txn, '_resources', ()))


def _bound_connections(txn):
    """The open ZODB connections bound to *txn*'s transaction manager.

    A connection opened with a manager registers itself as one of its
    synchronizers (transaction's own ``WeakSet``: weak references).
    """
    synchronizers = getattr(txn, '_synchronizers', None)
    if synchronizers is None:
        return []
    found = []
    for ref in synchronizers.as_weakref_list():
        synchronizer = ref()
        if isinstance(synchronizer, Connection) and \
                synchronizer.opened is not None:
            found.append(synchronizer)
    return found


def bound_to_zodb(txn):
    """Whether a ZODB connection is open with *txn*'s manager (or joined)."""
    return writes_to_zodb(txn) or bool(_bound_connections(txn))


def connection_for(txn, db):
    """The connection of *db* to write through in *txn*.

    Returns ``(connection, opened)``; *opened* is true when the
    connection was opened here and must be closed after the transaction.
    A transaction must never have two connections of one database: at
    commit both would take the storage's commit lock, the second after
    the first, in one thread (a deadlock).  So, in this order: the
    connection of *db* already joined to *txn*; the one of *db* in the
    multi-database group of a joined connection; an open connection of
    *db* bound to the transaction's manager, which may join later (the
    request's, a task's: it has written nothing yet); only then one
    opened here, with the transaction's own manager.
    """
    name = getattr(db, 'database_name', None)
    for resource in getattr(txn, '_resources', ()):
        if not isinstance(resource, Connection):
            continue
        if resource.db() is db:
            return resource, False
        if resource.db().databases.get(name) is db:
            # A sibling of the multi-database group: opened (or reused)
            # with the same transaction manager, closed with its primary.
            return resource.get_connection(name), False
    for connection in _bound_connections(txn):
        if connection.db() is db:
            return connection, False
    manager = getattr(txn, '_manager', None) or transaction.manager
    return db.open(transaction_manager=manager), True
