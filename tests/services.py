"""The machine's services for the tests marked ``rabbitmq`` / ``relstorage``.

Where they are found (environment variables, with their defaults):

``Z3C_CELERY_RABBITMQ_URL``
    a RabbitMQ the tests may use, ``amqp://guest:guest@127.0.0.1:5672//``.
    Each test module consumes a queue of its own and deletes it afterwards.
``Z3C_CELERY_POSTGRES_DSN``
    a PostgreSQL role that may create databases,
    ``host=127.0.0.1 port=5432 user=postgres dbname=postgres``.  Each
    RelStorage test creates a database ``z3c_test_<random>`` and drops it.
``Z3C_CELERY_RABBITMQ_SERVER``
    the ``rabbitmq-server`` script for a test that starts (and stops) a
    RabbitMQ of its own (default: Debian's, see
    ``servers.rabbitmq_server_binary``).

A service that does not answer skips the test with a reason naming it;
with ``Z3C_CELERY_REQUIRE_SERVICES=1`` (CI) the test fails instead.
"""
import contextlib
import os
import uuid

import pytest

from z3c.celery.testing import servers


RABBITMQ_URL = 'amqp://guest:guest@127.0.0.1:5672//'
POSTGRES_DSN = 'host=127.0.0.1 port=5432 user=postgres dbname=postgres'


def required():
    return os.environ.get('Z3C_CELERY_REQUIRE_SERVICES', '') not in (
        '', '0', 'no', 'false')


def missing(what):
    """Skip the test (fail it if services are required): *what* is gone."""
    message = f'{what} (Z3C_CELERY_REQUIRE_SERVICES=1 makes this a failure)'
    if required():
        pytest.fail(f'Required service missing: {what}', pytrace=False)
    pytest.skip(message)


def rabbitmq_url():
    return os.environ.get('Z3C_CELERY_RABBITMQ_URL', RABBITMQ_URL)


def postgres_dsn():
    return os.environ.get('Z3C_CELERY_POSTGRES_DSN', POSTGRES_DSN)


def check_rabbitmq(url):
    """None if RabbitMQ answers at *url*, else why not."""
    import kombu
    try:
        with kombu.Connection(url, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as e:
        return f'{type(e).__name__}: {e}'
    return None


def postgres_connect(dsn, **kw):
    import psycopg2
    connection = psycopg2.connect(dsn, connect_timeout=5, **kw)
    connection.autocommit = True
    return connection


def check_postgres(dsn):
    """None if PostgreSQL answers at *dsn*, else why not."""
    try:
        import psycopg2  # noqa: F401
        import relstorage  # noqa: F401
    except ImportError as e:
        return f'{e} (pip install -e .[test])'
    try:
        postgres_connect(dsn).close()
    except Exception as e:
        return f'{type(e).__name__}: {str(e).strip()}'
    return None


@pytest.fixture(scope='session')
def machine_rabbitmq():
    """The URL of the machine's RabbitMQ (skip or fail without one)."""
    url = rabbitmq_url()
    problem = check_rabbitmq(url)
    if problem:
        missing(f'RabbitMQ at {url} (Z3C_CELERY_RABBITMQ_URL): {problem}')
    return url


def delete_queues(url, names):
    import kombu
    with contextlib.suppress(Exception), kombu.Connection(
            url, connect_timeout=5) as connection:
        channel = connection.channel()
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_delete(name)


def own_queue():
    """A queue name of this test run alone on a shared RabbitMQ."""
    return f'z3c-test-{uuid.uuid4().hex[:10]}'


@pytest.fixture(scope='session')
def postgres_admin_dsn():
    """A DSN of the machine's PostgreSQL (skip or fail without one)."""
    dsn = postgres_dsn()
    problem = check_postgres(dsn)
    if problem:
        missing(f'PostgreSQL at "{dsn}" (Z3C_CELERY_POSTGRES_DSN): {problem}')
    return dsn


def replace_dbname(dsn, name):
    """*dsn* (key=value form) with ``dbname`` set to *name*."""
    words = [w for w in dsn.split() if not w.startswith('dbname=')]
    return ' '.join(words + [f'dbname={name}'])


@contextlib.contextmanager
def new_database(admin_dsn):
    """Create an empty database ``z3c_test_<random>``; its DSN; drop it."""
    name = f'z3c_test_{uuid.uuid4().hex[:12]}'
    admin = postgres_connect(admin_dsn)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE {name}')
        try:
            yield replace_dbname(admin_dsn, name)
        finally:
            with admin.cursor() as cursor:
                # Connections a killed worker left behind go too.
                cursor.execute(f'DROP DATABASE IF EXISTS {name} '
                               'WITH (FORCE)')
    finally:
        admin.close()


def database_exists(admin_dsn, name):
    with contextlib.closing(postgres_connect(admin_dsn)) as admin, \
            admin.cursor() as cursor:
        cursor.execute('SELECT 1 FROM pg_database WHERE datname = %s',
                       (name,))
        return cursor.fetchone() is not None


@pytest.fixture
def own_rabbitmq(tmp_path):
    """A RabbitMQ node of this test's own, which it may stop and start."""
    if servers.rabbitmq_server_binary() is None:
        missing('rabbitmq-server (Debian package rabbitmq-server, or '
                'Z3C_CELERY_RABBITMQ_SERVER) to run a RabbitMQ of our own')
    try:
        import mirakuru  # noqa: F401
    except ImportError:
        missing('the mirakuru package (pip install -e .[test])')
    server = servers.RabbitMQServer(directory=str(tmp_path / 'rabbitmq'))
    os.makedirs(server.directory)
    try:
        server.start()
        yield server
    finally:
        server.close()
