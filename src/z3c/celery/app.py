"""The Celery application of a Zope site: ``z3c.celery.CELERY``."""
import logging
import os
import threading

import celery
import zope.testing.cleanup


log = logging.getLogger(__name__)

_MISSING = object()

#: Settings of ours that live in the Celery configuration next to Celery's
#: own, with their defaults.  ``<celery:config>`` accepts each of them.
Z3C_DEFAULTS = {
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
    # Conflict retry backoff (seconds): base * 2**retries, capped, jittered.
    'conflict_backoff_base': 0.05,
    'conflict_backoff_cap': 10.0,
    # Name of the IDatabase utility that holds outbox and done-markers.
    'zodb_database': '',
    # Done-markers (effectively once, see z3c.celery.markers): on/off, and
    # how long (seconds) a marker is kept at least; it goes within twice.
    'done_markers': True,
    'done_marker_retention': 7 * 24 * 3600,
    # Message signing (z3c.celery.signing): a secret shared by senders and
    # workers; with it, workers refuse messages not signed with it.
    'signing_secret': None,
    # 1.x settings, still honoured.
    'ZOPE_CONF': None,
    'LOGGING_INI': None,
    'DEBUG_WORKER': False,
    'worker_boot_timeout': None,
}


class ZopeCelery(celery.Celery):
    """Celery app whose tasks run in the Zope environment.

    Tasks it creates are :class:`z3c.celery.task.TransactionAwareTask`: they
    are queued in the current transaction and sent at commit.
    """

    task_cls = 'z3c.celery.task:TransactionAwareTask'
    loader_cls = 'z3c.celery.loader:ZopeLoader'

    def __init__(self, *args, **kw):
        kw.setdefault('task_cls', self.task_cls)
        kw.setdefault('loader', self.loader_cls)
        kw.setdefault('set_as_current', False)
        super().__init__(*args, **kw)

    def z3c_setting(self, name):
        """Return one of our settings (see `Z3C_DEFAULTS`)."""
        # Read several times per task run: a plain look-up in each layer
        # (changes, celeryconfig, Celery's defaults) costs a fraction of
        # Settings.get, which also tries Celery's old setting names; and
        # no KeyError raised per layer that lacks it.
        for layer in self.conf.maps:
            value = layer.get(name, _MISSING)
            if value is not _MISSING:
                return value
        return Z3C_DEFAULTS[name]

    def z3c_settings(self, *names):
        """Several of our settings at once, in a tuple."""
        return tuple(self.z3c_setting(name) for name in names)

    def send_task(self, name, args=None, kwargs=None, **options):
        """Celery's ``send_task``, with our message headers.

        Every message leaves through here (dispatch, outbox relay, Celery
        retries): each carries the last transaction id this process knows
        of its database (so that the worker reads at least that state) and,
        when ``signing_secret`` is set, a signature.
        """
        from z3c.celery.worker import commit_token
        token = commit_token(self)
        if token:
            options['headers'] = dict(options.get('headers') or {},
                                      z3c_tid=token)
        secret = self.z3c_setting('signing_secret')
        if secret:
            from celery.utils import uuid

            from z3c.celery.signing import sign_options
            options['task_id'] = options.get('task_id') or uuid()
            sign_options(secret, name, options['task_id'], args, kwargs,
                         options)
        return super().send_task(name, args, kwargs, **options)


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
