"""Test support for sites that use z3c.celery (and z3c.celery's own tests).

Usable in any test runner; the pytest fixtures (`pytest_plugin`, loaded
automatically) and the zope.testrunner layers (`layers`) build on it.
Everything a helper starts (a worker, a server) listens on 127.0.0.1 and
is stopped by its pid.  See docs/testing.rst.

* `site`: site ZCML and zope.conf of a test site (the 1.x templates);
* `zodb`: databases with a root folder, reading a worker's FileStorage;
* `queued`: what a transaction queued, sent, ran, left in the outbox;
* `modes`: the eager, inline and end-to-end test modes;
* `worker`: a real ``celery worker`` process;
* `servers`: real Redis and ZEO servers.
"""
from z3c.celery import CELERY  # noqa: F401
from z3c.celery.database import set_database  # noqa: F401
from z3c.celery.testing.modes import MODE_SETTINGS  # noqa: F401
from z3c.celery.testing.modes import mode_settings  # noqa: F401
from z3c.celery.testing.modes import override_settings  # noqa: F401
from z3c.celery.testing.modes import release_results  # noqa: F401
from z3c.celery.testing.queued import QueuedTask  # noqa: F401
from z3c.celery.testing.queued import TaskRecorder  # noqa: F401
from z3c.celery.testing.queued import outbox_dead_letters  # noqa: F401
from z3c.celery.testing.queued import outbox_figures  # noqa: F401
from z3c.celery.testing.queued import outbox_tasks  # noqa: F401
from z3c.celery.testing.queued import queued_task_names  # noqa: F401
from z3c.celery.testing.queued import queued_tasks  # noqa: F401
from z3c.celery.testing.servers import RedisServer  # noqa: F401
from z3c.celery.testing.servers import ZEOServer  # noqa: F401
from z3c.celery.testing.site import PRINCIPALS  # noqa: F401
from z3c.celery.testing.site import SITE_ZCML_TEMPLATE  # noqa: F401
from z3c.celery.testing.site import ZEO_ZOPE_CONF_TEMPLATE  # noqa: F401
from z3c.celery.testing.site import ZOPE_CONF_TEMPLATE  # noqa: F401
from z3c.celery.testing.site import site_zcml  # noqa: F401
from z3c.celery.testing.site import write_zope_conf  # noqa: F401
from z3c.celery.testing.worker import WorkerError  # noqa: F401
from z3c.celery.testing.worker import WorkerProcess  # noqa: F401
from z3c.celery.testing.worker import check_celery_parameters  # noqa: F401
from z3c.celery.testing.worker import worker_options  # noqa: F401
from z3c.celery.testing.worker import write_celeryconfig  # noqa: F401
from z3c.celery.testing.zodb import ROOT_NAME  # noqa: F401
from z3c.celery.testing.zodb import ensure_root_folder  # noqa: F401
from z3c.celery.testing.zodb import filestorage_db  # noqa: F401
from z3c.celery.testing.zodb import last_transaction_info  # noqa: F401
from z3c.celery.testing.zodb import open_zodb_copy  # noqa: F401
from z3c.celery.testing.zodb import zeo_db  # noqa: F401
from z3c.celery.worker.components import get_principal  # noqa: F401
from z3c.celery.worker.components import login_principal  # noqa: F401
