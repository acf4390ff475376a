"""Done-markers: a task's ZODB effects are applied once per task id.

The runner commits a marker for the task id in the same transaction as
the task's writes and skips a task whose id is marked, so a redelivered
or resent message changes nothing twice.  Markers live in generations
(pruned whole) of partitions (one per process, and a shared one in shards
for runs that may repeat).  See docs/worker.rst, "Effectively once".
"""
import logging
import os
import socket
import time
import zlib

import celery.exceptions
import celery.states
from BTrees.LOBTree import LOBTree
from BTrees.OLBTree import OLBTree
from BTrees.OOBTree import OOBTree

from z3c.celery import database
from z3c.celery import signing
from z3c.celery.exceptions import AlreadyDone
from z3c.celery.message import RESENT_HEADER


log = logging.getLogger(__name__)

#: Key of the markers in the ZODB root.
CONTAINER_KEY = 'z3c.celery.done_markers'

#: The shared partition (of runs that may repeat an earlier delivery) is
#: split by task id into this many shards, so that a first delivery,
#: which reads its shard as current, conflicts only with markers of the
#: same shard.
SHARDS = 64
_SHARD_NAMES = [f'~{number:02d}' for number in range(SHARDS)]


def shard_name(task_id):
    """The shard of the shared partition that holds *task_id*."""
    return _SHARD_NAMES[zlib.crc32(task_id.encode()) % SHARDS]


def _is_shard(name):
    return name[:1] == '~'

#: Broker URL schemes whose transports flag a message delivered again
#: (``delivery_info['redelivered']``): the Redis transport when it
#: restores an unacknowledged message, AMQP brokers for every redelivery.
#: With other transports every run looks in all partitions.
FLAGGING_SCHEMES = frozenset({
    'redis', 'rediss', 'sentinel', 'amqp', 'amqps', 'pyamqp',
    'librabbitmq'})


class _Partition:
    pid = None
    name = None


_partition = _Partition()


def partition_name():
    """This process's partition: ``host:pid`` (new after a fork)."""
    pid = os.getpid()
    if _partition.pid != pid:
        _partition.name = f'{socket.gethostname()}:{pid}'
        _partition.pid = pid
    return _partition.name


def transport_flags_redeliveries(app):
    """Whether *app*'s broker flags the messages it delivers again.

    Remembered on the app until its connections are reset (a changed
    ``<celery:config>``).
    """
    answer = app.__dict__.get('_z3c_flags_redeliveries')
    if answer is None:
        conf = app.conf
        url = conf.broker_read_url or conf.broker_url or 'amqp://'
        urls = url if isinstance(url, (list, tuple)) else url.split(';')
        answer = app._z3c_flags_redeliveries = all(
            u.strip().partition('://')[0].partition('+')[0].lower()
            in FLAGGING_SCHEMES for u in urls)
    return answer


def maybe_repeated(task, request, secret=None):
    """Whether this run may repeat an earlier delivery of its message.

    True for a message the broker or the outbox relay flagged as sent
    again, an in-process run, a broker that does not flag redeliveries,
    and under message signing (a replayed message can lose its flags, its
    signature stays valid).  Only the other runs may skip looking in every
    partition: those of the one copy of a message that nobody flagged.

    A retry is such a copy too: the run that sent it did not commit, and
    once that run's message is acknowledged the retry is the only copy;
    if that message comes back (a worker died before acknowledging it),
    it comes flagged.
    """
    if secret or signing.is_in_process():
        return True
    info = request.delivery_info
    if info and info.get('redelivered'):
        return True
    if getattr(request, RESENT_HEADER, None) or \
            getattr(request, 'redelivered', None):
        return True
    return not transport_flags_redeliveries(task.app)


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


def _generations(connection, retention, now):
    """The current and the previous generation that exist."""
    tree = container(connection)
    if not tree:
        return ()
    current = generation(time.time() if now is None else now, retention)
    return [g for g in (tree.get(current), tree.get(current - 1))
            if g is not None]


def done_at(connection, task_id, retention, now=None, everywhere=True):
    """When *task_id* was marked done (seconds since the epoch), or None.

    Looks in every partition, or only in the shared one
    (``everywhere=False``: what a first delivery needs, when it marks).
    """
    shard = shard_name(task_id)
    for partitions in _generations(connection, retention, now):
        if everywhere:
            places = [markers for name, markers in partitions.items()
                      if name == shard or not _is_shard(name)]
        else:
            places = [partitions.get(shard)]
        for markers in places:
            if markers is not None:
                when = markers.get(task_id)
                if when is not None:
                    return when
    return None


def mark_done(connection, task_id, retention, now=None, shared=True):
    """Record *task_id* as done in *connection*'s current transaction.

    *shared* runs (those that `maybe_repeated`) mark in the shared
    partition, the others in this process's own.  Raises `AlreadyDone`
    when the partition holds the id already, or, for a first delivery
    (not *shared*), when the shared partition does.  Starting a new
    generation drops those older than the previous one.
    """
    now = time.time() if now is None else now
    tree = container(connection, create=True)
    current = generation(now, retention)
    partitions = tree.get(current)
    if partitions is None:
        partitions = tree[current] = OOBTree()
        for number in range(SHARDS):
            partitions[_SHARD_NAMES[number]] = OLBTree()
        for old in list(tree.keys(max=current - 2)):
            del tree[old]
            log.info('Pruned done-markers of generation %d', old)
    if not shared:
        # A first delivery looks for its id now, not before it ran: in
        # the shared partition, where a run that may repeat it marks.
        when = done_at(connection, task_id, retention, now,
                       everywhere=False)
        if when is not None:
            raise AlreadyDone(None, task_id, when)
    shard = shard_name(task_id)
    name = shard if shared else partition_name()
    markers = partitions.get(name)
    if markers is None:
        markers = partitions[name] = OLBTree()
    if not markers.insert(task_id, int(now)):
        raise AlreadyDone(None, task_id, markers[task_id])
    # Read as current what a run of the other kind writes to, so that
    # two runs of one message at the same time do not both commit.
    for consulted in _generations(connection, retention, now):
        if shared:
            _read_current(connection, consulted)
            for name, others in consulted.items():
                if not _is_shard(name):
                    _read_current(connection, others, task_id)
        else:
            _read_current(connection, consulted[shard], task_id)


def _read_current(connection, tree, key=None):
    """``readCurrent`` for the B-tree nodes where *key* is or would be.

    Without *key*: every node (for the small tree of partitions, where a
    partition added anywhere counts).
    """
    nodes = [tree]
    while nodes:
        node = nodes.pop()
        if node._p_jar is None:
            continue      # new in this transaction: its parent conflicts
        connection.readCurrent(node)
        if type(node) is not type(tree):
            continue                    # a bucket
        state = node.__getstate__()
        if state is None or len(state) == 1:
            continue    # empty, or a single bucket kept inside the node
        children = state[0][::2]
        if key is None:
            nodes.extend(children)
            continue
        keys = state[0][1::2]
        index = 0
        while index < len(keys) and keys[index] <= key:
            index += 1
        nodes.append(children[index])


def mark_at_commit(txn, connection, task_id, retention, shared=True):
    """Mark *task_id* done in *txn* if *txn* writes to the ZODB.

    Called when the task's work is done, right before the commit.  When
    before-commit hooks are still to run (an outbox writes there, say),
    the decision waits for them: a hook that puts itself behind any other
    hook decides at commit.
    """
    if not any(True for _ in txn.getBeforeCommitHooks()):
        if database.writes_to_zodb(txn):
            mark_done(connection, task_id, retention, shared=shared)
        return

    def hook():
        # transaction >= 5 keeps the hooks that ran in the list (older
        # versions pop them): the ones still to run follow our entry.
        hooks = list(txn.getBeforeCommitHooks())
        ours = [i for i, entry in enumerate(hooks) if entry[0] is hook]
        if len(hooks) > (ours[-1] + 1 if ours else 0):
            txn.addBeforeCommitHook(hook)
            return
        if database.writes_to_zodb(txn):
            mark_done(connection, task_id, retention, shared=shared)
    txn.addBeforeCommitHook(hook)


def skip(task, already_done):
    """What a skipped task ends with.

    When the result backend already holds the first run's outcome it is
    kept (``Ignore``: no new state is stored).  Otherwise the first run
    died before storing it: the task is reported successful, with
    ``None`` as result, so nobody waits for it forever.
    """
    if already_done.task_name is None:
        already_done.task_name = task.name
    log.warning('%s', already_done)
    backend = task.backend
    try:
        state = backend.get_state(already_done.task_id)
    except Exception:
        state = None
    if state in celery.states.READY_STATES:
        raise celery.exceptions.Ignore()
    return None
