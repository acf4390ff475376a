"""A test site for real ``celery worker`` processes (see tests/workers.py).

The templates here are filled in by `tests.workers.write_site`:
``zope-filestorage.conf.in`` / ``zope-zeo.conf.in`` (the zope.conf),
``site.zcml.in`` (the site ZCML: ``<celery:config>`` pointing at a given
Redis, the principals and the task registrations of ``tasks.zcml``).
"""
