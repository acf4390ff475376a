"""Done-markers: a task's ZODB effects are applied once per task id.

With late acknowledgement a message is acknowledged only after its task
finished, so a worker killed between the commit and the ack leaves it to
be delivered again; an outbox relay may also send a message a second time.
To make that harmless the runner commits a marker for the task id in the
*same transaction* as the task's writes, and skips a task whose id is
marked.  A transaction that writes nothing gets no marker: there is no
ZODB effect to protect, and such tasks pay nothing but the look-up.

Layout (in the root of the tasks' database, under `CONTAINER_KEY`): an
``LOBTree`` of generations, each an ``OLBTree`` mapping task id to the
time of the commit.  A generation covers one retention period
(``done_marker_retention`` seconds); the current and the previous one are
consulted, older ones are dropped whole when a new one begins.  So a
marker lives between one and two retention periods, lookups cost two
B-tree searches and pruning never walks the markers.  Task ids are
random, so concurrent markers land in different buckets or are merged by
the B-trees' conflict resolution.
"""
import logging
import time

import celery.exceptions
import celery.states
from BTrees.LOBTree import LOBTree
from BTrees.OLBTree import OLBTree
from ZODB.Connection import Connection


log = logging.getLogger(__name__)

#: Key of the markers in the ZODB root.
CONTAINER_KEY = 'z3c.celery.done_markers'


def generation(now, retention):
    """The generation number of time *now*."""
    return int(now // max(retention, 1))


def container(connection, create=False):
    """The generations tree of *connection*'s root (``None`` if none)."""
    root = connection.root()
    tree = root.get(CONTAINER_KEY)
    if tree is None and create:
        tree = root[CONTAINER_KEY] = LOBTree()
    return tree


def done_at(connection, task_id, retention, now=None):
    """When *task_id* was marked done (seconds since the epoch), or None."""
    tree = container(connection)
    if not tree:
        return None
    current = generation(time.time() if now is None else now, retention)
    for number in (current, current - 1):
        markers = tree.get(number)
        if markers is not None:
            when = markers.get(task_id)
            if when is not None:
                return when
    return None


def mark_done(connection, task_id, retention, now=None):
    """Record *task_id* as done in *connection*'s current transaction.

    Starting a new generation drops those older than the previous one.
    """
    now = time.time() if now is None else now
    tree = container(connection, create=True)
    current = generation(now, retention)
    markers = tree.get(current)
    if markers is None:
        markers = tree[current] = OLBTree()
        for old in list(tree.keys(max=current - 2)):
            del tree[old]
            log.info('Pruned done-markers of generation %d', old)
    markers[task_id] = int(now)


def writes_to_zodb(txn):
    """Whether *txn* has ZODB changes to commit.

    A ZODB connection joins the transaction when its first object is
    changed or added, so a joined connection means a write.  (The
    transaction package offers no public accessor for its resources.)
    """
    return any(isinstance(resource, Connection)
               for resource in getattr(txn, '_resources', ()))


def mark_at_commit(txn, connection, task_id, retention):
    """Mark *task_id* done in *txn* if *txn* writes to the ZODB.

    Called when the task's work is done, right before the commit.  When
    before-commit hooks are still to run (an outbox writes there, say),
    the decision waits for them: a hook that puts itself behind any other
    hook decides at commit.
    """
    if not any(True for _ in txn.getBeforeCommitHooks()):
        if writes_to_zodb(txn):
            mark_done(connection, task_id, retention)
        return

    def hook():
        # transaction >= 5 keeps the hooks that ran in the list (older
        # versions pop them): the ones still to run follow our entry.
        hooks = list(txn.getBeforeCommitHooks())
        ours = [i for i, entry in enumerate(hooks) if entry[0] is hook]
        if len(hooks) > (ours[-1] + 1 if ours else 0):
            txn.addBeforeCommitHook(hook)
            return
        if writes_to_zodb(txn):
            mark_done(connection, task_id, retention)
    txn.addBeforeCommitHook(hook)


class AlreadyDone(Exception):
    """The task id is marked done: its effects are already committed."""

    def __init__(self, task_name, task_id, when):
        self.task_name = task_name
        self.task_id = task_id
        self.when = when
        super().__init__(
            f'Task {task_name}[{task_id}] was already done (committed at '
            f'{time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))} '
            f'UTC); skipped')


def skip(task, already_done):
    """What a skipped task ends with.

    When the result backend already holds the first run's outcome it is
    kept (``Ignore``: no new state is stored).  Otherwise the first run
    died before storing it: the task is reported successful, with
    ``None`` as result, so nobody waits for it forever.
    """
    log.warning('%s', already_done)
    backend = task.backend
    try:
        state = backend.get_state(already_done.task_id)
    except Exception:
        state = None
    if state in celery.states.READY_STATES:
        raise celery.exceptions.Ignore()
    return None
