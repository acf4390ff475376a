"""Our settings, kept in the Celery configuration beside Celery's own.

`DEFAULTS` names each with its default; ``<celery:config>`` accepts them
as attributes (see docs/zcml.rst).  The rest applies a site's settings
to the app and takes them back (tests).
"""
import logging
import os
import threading

import zope.testing.cleanup


log = logging.getLogger(__name__)

#: Our settings and their defaults.
DEFAULTS = {
    # How queued tasks leave at commit: 'outbox', 'after-commit' or 'inline'.
    # 'outbox' (durable) by default; a process without any ZODB database
    # falls back to 'after-commit' with a warning (see docs/dispatch.rst).
    'dispatch': 'outbox',
    # Outbox relay: records younger than the grace period are left to the
    # process that committed them; the worker's relay runs every interval
    # seconds (0: no relay in the worker); a record whose publishing
    # failed this many times (the broker being away does not count) goes
    # to the dead letters.
    'outbox_grace_period': 10.0,
    'outbox_relay_interval': 5.0,
    'outbox_max_attempts': 10,
    # Write conflicts: this many attempts of each delivery run again at
    # once in the same process (as Zope's publisher does), then the task
    # goes back to the broker with a countdown.
    'conflict_in_process': 6,
    # Conflict retry backoff (seconds): base * 2**retries, capped, jittered.
    'conflict_backoff_base': 0.05,
    'conflict_backoff_cap': 10.0,
    # Name of the IDatabase utility that holds outbox and done-markers.
    'zodb_database': '',
    # Done-markers (effectively once, see docs/worker.rst): on/off, and
    # how long (seconds) a marker is kept at least; it goes within twice.
    'done_markers': True,
    'done_marker_retention': 7 * 24 * 3600,
    # Message signing (z3c.celery.signing): a secret shared by senders and
    # workers; with it, workers refuse messages not signed with it.
    'signing_secret': None,
    # Largest serialized arguments of one task (bytes): delay() refuses
    # more, a worker refuses a message body of more (0: no limit).
    'message_size_limit': 4 * 1024 * 1024,
    # 1.x settings, still honoured.
    'ZOPE_CONF': None,
    'LOGGING_INI': None,
    'DEBUG_WORKER': False,
    'worker_boot_timeout': None,
}


def reset_connections(app):
    """Forget the broker pools and backend of *app*.

    Needed when its broker or backend setting changes after first use (a
    test that starts its own Redis, a reloaded ``<celery:config>``).
    """
    # kombu's pools are global and keyed by connection parameters: drop
    # our references only, closing them would break other users' pools.
    app._pool = None
    amqp = app.__dict__.get('amqp')
    if amqp is not None:
        amqp._producer_pool = None
    app._local = threading.local()  # drops the cached result backend
    app.__dict__.pop('_z3c_flags_redeliveries', None)   # see markers


class _ConfigState:
    """Remembers what the app's configuration was before ZCML changed it."""

    snapshot = None


_config_state = _ConfigState()


def loaded_conf(app):
    """*app*'s configuration, loaded (the first access only starts it)."""
    app.conf.broker_url   # noqa: B018 - reading a setting loads them
    return app.conf


def configure_app(app, settings):
    """Apply *settings* (from ``<celery:config>``) to *app*.

    Runs as a configuration action, so only once the whole site ZCML was
    read and conflicts were resolved.
    """
    if _config_state.snapshot is None:
        _config_state.snapshot = (app, dict(loaded_conf(app).changes))
    app.conf.update(settings)
    reset_connections(app)
    log.debug('Celery configured from ZCML: %s', sorted(settings))


def _reset_configuration():
    if _config_state.snapshot is None:
        return
    app, changes = _config_state.snapshot
    _config_state.snapshot = None
    app.conf.changes.clear()
    app.conf.changes.update(changes)
    reset_connections(app)


zope.testing.cleanup.addCleanUp(_reset_configuration)


def settings_from_module(module):
    """The public upper- and lower-case names of a celeryconfig module."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith('_')
            and not callable(value)
            and not isinstance(value, type(os))}


def settings_from_file(path):
    """Execute a celeryconfig Python file and return its settings."""
    namespace = {'__file__': path, '__name__': 'celeryconfig'}
    with open(path) as f:
        code = compile(f.read(), path, 'exec')
    exec(code, namespace)
    namespace.pop('__builtins__', None)
    return {name: value for name, value in namespace.items()
            if not name.startswith('_')
            and not callable(value)
            and not isinstance(value, type(os))}
