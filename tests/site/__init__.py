"""A test site for real ``celery worker`` processes (see tests/workers.py).

`tests.workers.write_site` writes its site ZCML with
`z3c.celery.testing.site_zcml`: ``<celery:config>`` pointing at a given
Redis, the principals of `tests.workers.PRINCIPALS`, the task
registrations of ``tasks.zcml`` and (optionally) the event logger of
``events.zcml``.
"""
