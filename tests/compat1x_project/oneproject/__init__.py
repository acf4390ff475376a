"""A project that used z3c.celery 1.x."""
