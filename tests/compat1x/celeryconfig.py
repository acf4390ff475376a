"""The celeryconfig of the 1.x application (1.x docs, "Worker setup").

In production these are fixed paths; the tests put the zope.conf, the
broker and the task log of a test run into the environment.
"""
import os


_here = os.path.dirname(os.path.abspath(__file__))

ZOPE_CONF = os.environ.get('COMPAT1X_ZOPE_CONF', '/path/to/zope.conf')
LOGGING_INI = os.path.join(_here, 'logging.ini')
broker_url = os.environ.get('COMPAT1X_BROKER', 'redis://localhost:6379/0')
result_backend = broker_url
imports = ['tests.compat1x.tasks']
worker_boot_timeout = 30
DEBUG_WORKER = False
