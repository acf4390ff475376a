"""What travels with a task: the message, its headers, its stored form.

Both sides import this module and nothing else of each other: the sending
side builds a `TaskMessage` and publishes it with these headers; the
outbox stores it as a record and turns the record back into a message; the
worker reads the headers.  See docs/design.rst.
"""
import datetime
import weakref

from z3c.celery import database


#: Extended-info key under which a transaction records the ids of the
#: tasks it queued: the first `TASK_IDS_KEPT` of them.
TASK_IDS_KEY = 'z3c.celery.task_ids'

#: Extended-info key: how many tasks the transaction queued (all of them).
TASK_COUNT_KEY = 'z3c.celery.task_count'

#: At most this many task ids go into a transaction's extended info.
#: FileStorage stores at most 65,535 bytes of it per transaction (ZEO and
#: RelStorage pass it on alike), shared with the application's own
#: entries: about 1,450 ids would fill it, and the commit would fail.
#: 100 ids take about 4 KB.
TASK_IDS_KEPT = 100


def record_task_ids(extension, task_ids):
    """Add *task_ids* to a transaction's *extension* (bounded)."""
    count = extension.get(TASK_COUNT_KEY, 0) + len(task_ids)
    ids = list(extension.get(TASK_IDS_KEY, ()))
    room = TASK_IDS_KEPT - len(ids)
    if room > 0:
        ids.extend(task_ids[:room])
    extension[TASK_IDS_KEY] = ids
    extension[TASK_COUNT_KEY] = count

#: Header: the last transaction id the sender knew of its database (hex),
#: so that the worker reads at least that state (`commit_token`).
TID_HEADER = 'z3c_tid'

#: Header: the message may have left before (an outbox relay's resend, a
#: publish that kombu tried again), so the worker looks for its done-marker
#: everywhere.
RESENT_HEADER = 'z3c_resent'

#: Header: how many times a conflict sent the task back to the broker
#: (the exponent of the next countdown; retries in the process do not
#: count here).
BROKER_RETRIES_HEADER = 'z3c_broker_retries'

#: Header: the HMAC signature of the message (see `z3c.celery.signing`).
SIGNATURE_HEADER = 'z3c_signature'

#: The keyword argument (and ``apply_async`` option, and schedule entry
#: option) that names the principal a task runs as.
PRINCIPAL_KEY = '_principal_id_'


class TaskMessage:
    """One queued task: everything needed to publish it (or run it)."""

    __slots__ = ('name', 'args', 'kwargs', 'options', 'task_id',
                 'principal_id', '_result')

    def __init__(self, name, args, kwargs, options, task_id, principal_id):
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.options = options
        self.task_id = task_id
        self.principal_id = principal_id
        self._result = None

    @property
    def result(self):
        """The result object ``delay()`` returned, while its caller keeps
        it (``None`` after; a weak reference: a transaction queuing many
        tasks whose results nobody keeps does not hold them all)."""
        ref = self._result
        return None if ref is None else ref()

    @result.setter
    def result(self, result):
        self._result = None if result is None else weakref.ref(result)

    @property
    def message_kwargs(self):
        """The keyword arguments as they travel (with the principal)."""
        if self.principal_id is None:
            return self.kwargs
        return dict(self.kwargs, _principal_id_=self.principal_id)

    def __repr__(self):
        return (f'<TaskMessage {self.name} id={self.task_id} '
                f'principal={self.principal_id!r}>')


def describe(messages):
    """``name[id], ...`` of *messages*, for log lines."""
    return ', '.join(f'{m.name}[{m.task_id}]' for m in messages)


def resent(message):
    """Flag *message* as possibly sent before (`RESENT_HEADER`)."""
    options = message.options
    options['headers'] = dict(options.get('headers') or {},
                              **{RESENT_HEADER: True})
    return message


def commit_token(app):
    """The last transaction id this process knows of *app*'s database.

    Sent with each message (hex text, `TID_HEADER`), so that a worker
    reading through ZEO can make sure it has seen that transaction before
    the task runs.  ``None`` without a database.
    """
    db = database.get_database(app.z3c_setting('zodb_database'))
    if db is None:
        return None
    try:
        tid = db.lastTransaction()
    except Exception:
        return None
    return tid.hex() if tid else None


# The stored form (outbox records).  A record is a plain dict; only this
# module and `z3c.celery.outbox.store` know its keys.


def absolute_times(options, now):
    """*options* with ``countdown`` and an ``expires`` in seconds made
    absolute from *now* (the commit's time for a stored record): a copy
    if it has any, else *options* itself.

    So a message that leaves late (the outbox relay after an outage) runs
    and expires when it would have had it left at commit: ``countdown=60``
    becomes an ``eta`` a minute after the commit, ``expires=15`` a time
    15 seconds after the commit, and a relay that sends it later still
    sends these times.
    """
    countdown = options.get('countdown')
    expires = options.get('expires')
    if countdown is None and not isinstance(expires, (int, float)):
        return options
    options = dict(options)
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if countdown is not None:
        del options['countdown']
        if options.get('eta') is None:
            options['eta'] = start + datetime.timedelta(seconds=countdown)
    if isinstance(expires, (int, float)) and not isinstance(expires, bool):
        options['expires'] = start + datetime.timedelta(seconds=expires)
    return options


def make_record(message, now, seq=0):
    """The stored form of *message*.

    *seq* is the message's place among those of its transaction: with
    ``created`` it keeps the order in which they were queued.  A record
    never changes once written; what the relay knows of it (claims,
    failed attempts) is kept apart (`z3c.celery.outbox.store`).  It
    shares the message's arguments and options (``delay()`` made them
    for the message; nobody changes them afterwards): a transaction of
    many tasks holds them once.
    """
    return {
        'name': message.name,
        'args': message.args,
        'kwargs': message.kwargs,
        'options': absolute_times(message.options, now),
        'principal_id': message.principal_id,
        'created': now,
        'seq': seq,
    }


def message_of(task_id, record):
    """The `TaskMessage` a record stands for (a fresh copy)."""
    return TaskMessage(
        record['name'], tuple(record['args']), dict(record['kwargs']),
        dict(record['options']), task_id, record['principal_id'])


def queue_order(record):
    """Sort key of a record: the order in which its task was queued."""
    return (record['created'], record.get('seq', 0))
