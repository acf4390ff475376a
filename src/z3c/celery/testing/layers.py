"""plone.testing layers (zope.testrunner) for the three test modes.

* `EagerLayer` / `EAGER_LAYER`: 1.x's ``task_always_eager``; 2.x runs the
  task in-process right after the commit of the transaction that queued it.
* `InlineLayer` / `INLINE_LAYER`: ``dispatch="inline"``: tasks are queued
  for real and run in-process after the commit, each in its own
  transaction and ZODB connection, as a worker runs them.  The mode to
  choose for unit tests.
* `EndToEndLayer`: a real ``celery worker`` process against a real broker,
  started when the layer is set up and stopped by its pid at tear-down.

The eager and inline layers find the database tasks run against as the
worker does (``z3c.celery.database``: the database set with
``set_database`` or the ``IDatabase`` utility); when the layer has a
``zodbDB`` resource (plone.testing.zodb) among its bases, that one is used.

Needs the ``layer`` extra: ``z3c.celery[layer]``.
"""
import gc
import os
import sys

import plone.testing

import z3c.celery
from z3c.celery import database
from z3c.celery import testing
from z3c.celery.testing.servers import RedisServer
from z3c.celery.testing.worker import check_celery_parameters


class _ModeLayer(plone.testing.Layer):
    """Put ``z3c.celery.CELERY`` into one test mode while set up."""

    mode = None

    def setUp(self):
        self._undo = testing.override_settings(
            z3c.celery.CELERY, testing.mode_settings(self.mode))

    def tearDown(self):
        self._undo()
        del self._undo

    def testSetUp(self):
        # A ZCML layer set up after this one may have configured the app
        # (<celery:config>): the mode of this layer wins in each test.
        z3c.celery.CELERY.conf.update(testing.mode_settings(self.mode))
        self._set_db = False
        db = self.get('zodbDB')
        if db is not None and database._state.database is None:
            database.set_database(db)
            self._set_db = True

    def testTearDown(self):
        if self._set_db:
            database.set_database(None)
            self._set_db = False


class EagerLayer(_ModeLayer):
    """1.x's eager mode: ``task_always_eager`` (and eager propagation).

    Unlike 1.x, ``delay()`` does not run the task: it runs right after the
    commit of the caller's transaction, in a transaction of its own; an
    error is kept in the result (``result.get()`` raises it).
    """

    mode = 'eager'


EAGER_LAYER = EagerLayer()


class InlineLayer(_ModeLayer):
    """Tasks queued for real and run in this process right after commit.

    Each runs through the worker's runner: its own transaction and
    connection, the principal who queued it, conflict retries, arguments
    passed through the serializer.  Combine with your ZCML layer (and a
    ZODB layer offering ``zodbDB``) as bases.
    """

    mode = 'inline'


INLINE_LAYER = InlineLayer()


class EndToEndLayer(plone.testing.Layer):
    """A real ``celery worker`` process for the tests of this layer.

    Expects the resources (from a base layer), as in 1.x:

    * ``celery_config``: dict of Celery settings for the app and the
      worker; must include ``ZOPE_CONF``, the zope.conf the worker loads
      (see `z3c.celery.testing.ZOPE_CONF_TEMPLATE`).  Without
      ``broker_url`` the layer starts a private Redis server.
    * ``celery_parameters``: 1.x's parameters to create the app; 2.x uses
      ``z3c.celery.CELERY`` itself, so they are only checked: ``task_cls``
      must be TransactionAwareTask, ``loader`` ZopeLoader;
      ``strict_typing`` is accepted and not used (2.x checks arguments
      against the task's signature at ``delay()``).
    * ``celery_worker_parameters``: dict of worker options (``queues``,
      ``concurrency``, ``pool``, ``loglevel``, ``hostname``, ...).
    * ``celery_includes``: dotted names of modules with tasks; imported
      here and in the worker.

    While set up, ``z3c.celery.CELERY`` publishes after commit to that
    broker and reads results from its backend; the worker is resource
    ``celery_worker`` (a `z3c.celery.testing.WorkerProcess`).
    """

    def setUp(self):
        config = dict(self['celery_config'])
        parameters = dict(self.get('celery_parameters') or {})
        check_celery_parameters(parameters)
        worker_parameters = dict(self.get('celery_worker_parameters') or {})
        includes = tuple(self.get('celery_includes') or ())
        if not config.get('ZOPE_CONF'):
            raise ValueError(
                'celery_config needs ZOPE_CONF: the zope.conf the worker '
                'loads (see z3c.celery.testing.ZOPE_CONF_TEMPLATE)')
        self._redis = None
        if not config.get('broker_url'):
            self._redis = RedisServer().start()
            config['broker_url'] = self._redis.url + '/0'
            config.setdefault('result_backend', self._redis.url + '/0')
        config.setdefault('broker_connection_retry_on_startup', True)
        self.app_settings = dict(config, **testing.mode_settings(
            'end-to-end'))
        self._undo = testing.override_settings(
            z3c.celery.CELERY, self.app_settings)
        for module in includes:
            __import__(module)
        worker = testing.WorkerProcess(
            config, includes=includes, parameters=worker_parameters,
            pythonpath=[p for p in sys.path if p and os.path.isdir(p)])
        try:
            worker.start()
        except BaseException:
            self._restore()
            raise
        self['celery_worker'] = worker

    def testSetUp(self):
        # A ZCML layer set up after this one may have configured the app
        # (<celery:config>); the broker of this layer's worker wins.
        conf = z3c.celery.CELERY.conf
        if any(conf.get(k) != v for k, v in self.app_settings.items()):
            testing.override_settings(z3c.celery.CELERY, self.app_settings)

    def tearDown(self):
        worker = self['celery_worker']
        del self['celery_worker']
        worker.close()
        self._restore()

    def _restore(self):
        # Results of the tests that were never fetched unsubscribe from
        # the result backend when collected: let them while it is there.
        gc.collect()
        testing.release_results(z3c.celery.CELERY)
        self._undo()
        if self._redis is not None:
            self._redis.close()
            self._redis = None
