"""A small application written only against the z3c.celery 1.x API.

Its tasks (`tasks`), celeryconfig (`celeryconfig`), site ZCML
(``ftesting.zcml``), logging configuration (``logging.ini``) and layers
(`layers`) are what a 1.x user wrote by following the 1.x documentation;
z3c.celery 2 must run them unchanged.  ``tests/test_compat*.py`` run them
in-process and against a real worker and Redis.
"""
