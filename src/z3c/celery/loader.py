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
