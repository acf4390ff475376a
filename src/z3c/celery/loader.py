"""The Celery loader of ``z3c.celery.CELERY``."""
import os

import celery.loaders.app

from z3c.celery.app import settings_from_file


class ZopeLoader(celery.loaders.app.AppLoader):
    """Reads a celeryconfig as 1.x did.

    ``CELERY_CONFIG_MODULE`` (also what ``celery --config`` sets) names an
    importable module; ``CELERY_CONFIG_FILE`` a Python file by path, for a
    configuration that is not on the Python path.
    """

    def read_configuration(self, env='CELERY_CONFIG_MODULE'):
        path = os.environ.get('CELERY_CONFIG_FILE')
        if path:
            return settings_from_file(path)
        module = os.environ.get(env)
        if module:
            return super().read_configuration(env)
        return {}

    def on_worker_process_init(self):
        """Load ``ZOPE_CONF`` and open its databases in this process.

        1.x's hook (Celery calls it in each prefork child).  A worker
        started by Celery sets up its processes with our bootstep and its
        signals (`z3c.celery.worker`), so this does nothing there; called
        by hand (as 1.x's tests did) it sets up the Zope environment of
        the current process: the site ZCML is executed, the databases are
        opened.  `on_worker_shutdown` undoes it.
        """
        from z3c.celery import worker
        from z3c.celery import zopeconf
        if worker._state.booted:
            return
        path = self.app.conf.get('ZOPE_CONF')
        if not path:
            raise ValueError(
                'Celery setting ZOPE_CONF not set, check celery worker '
                'config.')
        zopeconf.load_zope_conf(path)
        zopeconf.open_databases()
        self._z3c_loaded = True

    def on_worker_shutdown(self):
        """Close what `on_worker_process_init` opened and forget the
        zope.conf, so that it can be loaded again."""
        if not getattr(self, '_z3c_loaded', False):
            return
        from z3c.celery import zopeconf
        self._z3c_loaded = False
        zopeconf._reset()
