"""1.x import path of the 1.x pytest fixtures (`z3c.celery.testing.compat`).

Load them as 1.x users did, in your ``conftest.py``::

    pytest_plugins = ['z3c.celery.conftest']
"""
from z3c.celery.testing.compat import BROKER_ENV  # noqa: F401
from z3c.celery.testing.compat import ZODBConnection  # noqa: F401
from z3c.celery.testing.compat import _celery_config  # noqa: F401
from z3c.celery.testing.compat import _celery_parameters  # noqa: F401
from z3c.celery.testing.compat import _zope_conf  # noqa: F401
from z3c.celery.testing.compat import celery_config  # noqa: F401
from z3c.celery.testing.compat import celery_enable_logging  # noqa: F401
from z3c.celery.testing.compat import celery_includes  # noqa: F401
from z3c.celery.testing.compat import celery_parameters  # noqa: F401
from z3c.celery.testing.compat import celery_worker_parameters  # noqa
from z3c.celery.testing.compat import celery_worker_pool  # noqa: F401
from z3c.celery.testing.compat import storage_file  # noqa: F401
from z3c.celery.testing.compat import zope_conf  # noqa: F401


# The fixtures themselves.
pytest_plugins = ['z3c.celery.testing.compat']
