"""The guide's site for the fixtures of z3c.celery's pytest plugin."""
import os

import pytest


@pytest.fixture(scope='session')
def zope_celery_site_zcml():
    """The site ZCML every fixture (and the worker) loads."""
    path = os.path.join(os.path.dirname(__file__), 'site.zcml')
    with open(path) as f:
        return f.read()
