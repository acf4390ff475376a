"""The fixtures 1.x projects got from Celery 4's pytest plugin.

Celery 4 loaded its plugin (``celery.contrib.pytest``) automatically, and
a 1.x project's ``conftest.py`` only defined ``celery_config``,
``celery_parameters``, ``celery_includes``, ``celery_worker_pool`` ...
and used ``celery_session_worker``.  Celery's own worker fixture starts a
worker thread in the test process on a test app of its own; that is not
how a Zope worker runs (the zope.conf is loaded, the databases opened, the
tasks queued in the transaction), so here ``celery_session_worker`` is a
real ``celery worker`` process for ``z3c.celery.CELERY``, set up from
those fixtures, as soon as ``celery_config`` names a ``ZOPE_CONF``.
Without ``ZOPE_CONF`` (a plain Celery project), Celery's own worker fixture
runs, when Celery's plugin is loaded.

The pytest plugin of z3c.celery registers this module after every other
plugin (Celery's included, however it was loaded), so that its fixture
wins; fixtures of a ``conftest.py`` win over both.  The other ``celery_*``
fixtures keep their definitions (Celery's defaults, z3c.celery.conftest's,
the project's).
"""
import os
import sys

import celery._state
import pytest

from z3c.celery.testing.pytest_plugin import _testing


@pytest.fixture(scope='session')
def celery_session_worker(request, celery_config):
    """A real worker for the session; ``z3c.celery.CELERY`` publishes to it.

    The worker loads ``celery_config['ZOPE_CONF']`` (and creates the root
    folder in its database); when that is a FileStorage, read the worker's
    writes with ``z3c.celery.testing.open_zodb_copy``.  While it runs,
    ``z3c.celery.CELERY`` publishes after commit to its broker and reads
    results from its result backend.
    """
    if not celery_config.get('ZOPE_CONF'):
        yield from _celery_worker(request)
        return
    # Celery's plugin (or z3c.celery.conftest) defines the defaults of
    # these; a project may have neither.
    celery_parameters = _value(request, 'celery_parameters', {})
    celery_includes = _value(request, 'celery_includes', ())
    celery_worker_pool = _value(request, 'celery_worker_pool', 'solo')
    celery_worker_parameters = _value(
        request, 'celery_worker_parameters', {})
    testing = _testing()
    testing.check_celery_parameters(celery_parameters)
    parameters = dict(celery_worker_parameters)
    parameters.setdefault('pool', celery_worker_pool)
    parameters.setdefault('concurrency', 1)
    worker = testing.WorkerProcess(
        celery_config, includes=celery_includes, parameters=parameters,
        pythonpath=[p for p in sys.path if p and os.path.isdir(p)])
    for module in celery_includes:
        __import__(module)
    app = testing.CELERY
    undo = testing.override_settings(
        app, dict(celery_config, **testing.mode_settings('end-to-end')))
    # Shared tasks are looked up in the current app: ours (another
    # fixture may have made a test app current).
    saved = celery._state.default_app, celery._state._tls.current_app
    app.set_default()
    app.set_current()
    try:
        worker.start()
        yield worker
    finally:
        testing.release_results(app)
        worker.close()
        undo()
        celery._state.default_app = saved[0]
        celery._state._set_current_app(saved[1])


def _value(request, name, default):
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return default


def _celery_worker(request):
    """Celery's own session worker (a thread on Celery's test app)."""
    if not request.config.pluginmanager.hasplugin('celery.contrib.pytest'):
        raise RuntimeError(
            'celery_session_worker: celery_config has no ZOPE_CONF, so no '
            'Zope worker can be started (see z3c.celery.testing.'
            'ZOPE_CONF_TEMPLATE); for a plain Celery worker load Celery\'s '
            'plugin (-p celery.contrib.pytest)')
    # Celery's plugin is loaded (checked above): so are these.
    import celery.contrib.pytest
    from celery.contrib.testing import worker
    app = request.getfixturevalue('celery_session_app')
    if celery.contrib.pytest.NO_WORKER:
        yield None
        return
    for module in request.getfixturevalue('celery_includes'):
        app.loader.import_task_module(module)
    for task in request.getfixturevalue('celery_class_tasks'):
        app.register_task(task)
    with worker.start_worker(
            app, pool=request.getfixturevalue('celery_worker_pool'),
            **request.getfixturevalue('celery_worker_parameters')) as w:
        yield w
