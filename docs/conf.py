"""Sphinx configuration of the z3c.celery documentation.

Built by the test suite (``tests/test_docs.py``) with ``-W``: a warning
fails the build.  The ``doctest`` builder runs the examples.
"""
import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The local extension, and the example site's code (``exampleapp``) for
# the doctests, as its zope.conf puts it on the path of a worker.
sys.path[:0] = [os.path.join(HERE, '_ext'), os.path.join(ROOT, 'examples')]

project = 'z3c.celery'
author = 'z3c.celery developers'
copyright = '2016-2018 ZEIT ONLINE GmbH, since 2024 z3c.celery developers'
release = version = '2.0.0.dev0'

extensions = [
    'sphinx.ext.doctest',
    'zcmlreference',
]

root_doc = 'index'
exclude_patterns = ['_build', '_ext', 'Thumbs.db', '.DS_Store']
templates_path = []
html_static_path = []
html_theme = 'alabaster'
pygments_style = 'sphinx'

# Every page's doctests run in a clean component registry and Celery
# configuration, with no transaction or interaction left over.
doctest_global_setup = '''
import transaction
import zope.component.testing
import zope.security.management
zope.component.testing.setUp()
transaction.abort()
'''
doctest_global_cleanup = '''
transaction.abort()
zope.security.management.endInteraction()
zope.component.testing.tearDown()
'''
doctest_test_doctest_blocks = 'default'
