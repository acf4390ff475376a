"""The Celery configuration of ``z3c.celery.CELERY`` for a while: test modes.
"""
from z3c.celery import settings as settings_module


_ABSENT = object()


def override_settings(app, settings):
    """Apply *settings* to *app*'s configuration; return an undo function.

    The undo function restores each key to what it was (or removes it),
    and drops cached broker connections when the broker changed.
    """
    conf = settings_module.loaded_conf(app)
    saved = {key: conf.changes.get(key, _ABSENT) for key in settings}
    conf.update(settings)
    settings_module.reset_connections(app)

    def undo():
        for key, value in saved.items():
            if value is _ABSENT:
                conf.changes.pop(key, None)
            else:
                conf.changes[key] = value
        settings_module.reset_connections(app)
    return undo


def release_results(app):
    """Stop waiting for the results *app* still waits for.

    A ``result.get(timeout=...)`` that timed out leaves its result
    subscribed at the result backend; when it is garbage collected after
    the test's Redis stopped, Celery tries to reconnect for a long while.
    Call this while the backend is still reachable (the end-to-end layer
    and fixtures do).
    """
    backend = getattr(app._local, 'backend', None)
    pending = getattr(backend, '_pending_results', None)
    if not pending:
        return
    for mapping in pending:
        for waiters in list(mapping.values()):
            for result in list(waiters.values()):
                backend.remove_pending_result(result)


#: The settings of each test mode.
MODE_SETTINGS = {
    # 1.x: task_always_eager; 2.x runs the task right after the commit.
    'eager': {'task_always_eager': True, 'task_eager_propagates': True},
    # Queued for real, run in-process after commit, like a worker would.
    'inline': {'task_always_eager': False, 'dispatch': 'inline'},
    # Published to the broker after commit; a worker runs them.
    'end-to-end': {'task_always_eager': False, 'dispatch': 'after-commit'},
}


def mode_settings(mode):
    try:
        return dict(MODE_SETTINGS[mode])
    except KeyError:
        raise ValueError(
            f'Unknown test mode {mode!r}; choose one of '
            f'{", ".join(sorted(MODE_SETTINGS))}') from None
