"""The worker side: where a task runs.

``bootsteps`` (the ``celery worker`` options, bootstep and signals) and
``zopeconf`` (loading the site) set the process up; ``runner`` runs each
task with ``connection`` (the thread's ZODB connection), ``markers``
(effectively once) and the default ``components``.  Imported by workers,
and by in-process runs (inline and eager test modes).
"""
