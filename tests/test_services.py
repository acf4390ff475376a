"""Service discovery of the rabbitmq/relstorage tests: a missing service
is a skip naming it, or a failure with Z3C_CELERY_REQUIRE_SERVICES=1."""
import pytest

from tests import services


def test_missing_service_is_a_skip_naming_it(monkeypatch):
    monkeypatch.delenv('Z3C_CELERY_REQUIRE_SERVICES', raising=False)
    with pytest.raises(pytest.skip.Exception, match='RabbitMQ at amqp://x'):
        services.missing('RabbitMQ at amqp://x')


@pytest.mark.parametrize('value', ['1', 'yes', 'true'])
def test_missing_service_is_a_failure_when_required(monkeypatch, value):
    monkeypatch.setenv('Z3C_CELERY_REQUIRE_SERVICES', value)
    with pytest.raises(pytest.fail.Exception,
                       match='Required service missing: PostgreSQL'):
        services.missing('PostgreSQL at "host=nowhere"')


def test_services_are_found_through_the_environment(monkeypatch):
    monkeypatch.delenv('Z3C_CELERY_RABBITMQ_URL', raising=False)
    monkeypatch.delenv('Z3C_CELERY_POSTGRES_DSN', raising=False)
    assert services.rabbitmq_url() == 'amqp://guest:guest@127.0.0.1:5672//'
    assert 'port=5432' in services.postgres_dsn()
    monkeypatch.setenv('Z3C_CELERY_RABBITMQ_URL', 'amqp://a:b@h:1//')
    monkeypatch.setenv('Z3C_CELERY_POSTGRES_DSN', 'host=db user=u')
    assert services.rabbitmq_url() == 'amqp://a:b@h:1//'
    assert services.postgres_dsn() == 'host=db user=u'


def test_a_service_that_does_not_answer_says_why():
    assert 'refused' in services.check_rabbitmq(
        'amqp://guest:guest@127.0.0.1:1//').lower()
    assert services.check_postgres('host=127.0.0.1 port=1 user=x')


def test_replace_dbname():
    assert services.replace_dbname(
        'host=h dbname=postgres user=u', 'z3c_test_1') == \
        'host=h user=u dbname=z3c_test_1'
