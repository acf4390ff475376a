"""ZODB helpers for tests: databases with a root folder, reading them."""
import contextlib
import os
import shutil
import tempfile

import ZODB
import ZODB.FileStorage

from z3c.celery.database import ROOT_NAME
from z3c.celery.worker.zopeconf import ensure_root_folder as _ensure


def ensure_root_folder(db):
    """Create the root folder (a site) in *db* unless it exists.

    Tasks run with the root folder as their site, as the worker sets it;
    this is what a worker does at start.
    """
    _ensure(db)
    return db


def filestorage_db(path):
    """A database on the FileStorage *path*, with a root folder."""
    return ensure_root_folder(ZODB.DB(ZODB.FileStorage.FileStorage(path)))


def zeo_db(address, timeout=30):
    """A database on the ZEO server at *address*, with a root folder."""
    import ZEO  # only for ZEO: a test of a FileStorage site needs none
    return ensure_root_folder(
        ZEO.DB(tuple(address), wait_timeout=timeout))


@contextlib.contextmanager
def open_zodb_copy(zodb_path):
    """Open a copy of the FileStorage *zodb_path*; yield its root folder.

    For a database another process (a worker) holds open.  The copy and
    its index files are removed afterwards.
    """
    directory = tempfile.mkdtemp(prefix='z3c-zodb-copy-')
    copy = os.path.join(directory, os.path.basename(zodb_path))
    try:
        shutil.copyfile(zodb_path, copy)
        db = ZODB.DB(ZODB.FileStorage.FileStorage(copy, read_only=True))
        try:
            connection = db.open()
            try:
                yield connection.root()[ROOT_NAME]
            finally:
                connection.close()
        finally:
            db.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def last_transaction_info(db):
    """The extended info of *db*'s last committed transaction (a dict).

    The ids of the tasks it queued are under
    ``z3c.celery.message.TASK_IDS_KEY`` (the first `TASK_IDS_KEPT`), how
    many under ``TASK_COUNT_KEY``; a task's own transaction has
    ``task_name`` and ``task_id``.
    """
    storage = db.storage
    tid = storage.lastTransaction()
    for record in storage.iterator(tid, tid):
        return dict(record.extension)
    return {}
