"""The ZCML layer: <celery:config>, <celery:task> and <celery:schedule>."""
import pytest
import zope.component
from zope.configuration.config import ConfigurationConflictError
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.xmlconfig import ZopeXMLConfigurationError

import z3c.celery
from z3c.celery import metaconfigure
from z3c.celery.interfaces import IConflictPolicy
from z3c.celery.interfaces import ITask


class RecordingContext:
    """An action-recording configuration context for handler unit tests."""

    info = 'test.zcml line 1'

    def __init__(self):
        self.actions = []

    def action(self, discriminator, callable=None, args=(), kw=None,
               **rest):
        self.actions.append(dict(discriminator=discriminator,
                                 callable=callable, args=args))


class Policy:
    """A conflict policy factory for the tests."""

    def is_conflict(self, error):
        return False

    def countdown(self, task, error, retries):
        return None


# Handler unit tests: they only record actions.

def test_config_handler_records_one_action_and_changes_nothing():
    context = RecordingContext()
    from z3c.celery.settings import loaded_conf
    before = dict(loaded_conf(z3c.celery.CELERY).changes)
    metaconfigure.config(context, broker_url='memory://', task_default_queue='q')
    assert dict(z3c.celery.CELERY.conf.changes) == before
    [action] = context.actions
    assert action['discriminator'] == ('celery:config',)
    assert action['args'][1] == {'broker_url': 'memory://',
                                 'task_default_queue': 'q'}


def test_task_handler_records_actions_and_registers_nothing(zca):
    context = RecordingContext()
    metaconfigure.task(context, name='t.x', handler=len,
                       conflict_policy=Policy)
    assert [a['discriminator'] for a in context.actions] == [
        ('utility', ITask, 't.x'), ('utility', IConflictPolicy, 't.x')]
    assert zope.component.queryUtility(ITask, 't.x') is None
    assert 't.x' not in z3c.celery.CELERY.tasks


def test_task_handler_rejects_non_callable_handler():
    with pytest.raises(ConfigurationError, match='not callable'):
        metaconfigure.task(RecordingContext(), name='t', handler=42)


# Functional tests through xmlconfig.

def test_site_zcml_registers_task_as_utility_and_with_celery(load_zcml):
    load_zcml('''
      <celery:config broker_url="memory://" worker_prefetch_multiplier="2"
                     task_acks_on_failure_or_timeout="false"
                     broker_transport_options="{'visibility_timeout': 60}"
                     accept_content="json pickle" />
      <celery:task name="tests.record" handler="tests.tasks.record"
                   queue="zope" max_retries="3" rate_limit="10/m" />
      <celery:task name="tests.bound" handler="tests.tasks.bound_record"
                   bind="true" max_retries="None" />
    ''')
    app = z3c.celery.CELERY
    task = zope.component.getUtility(ITask, 'tests.record')
    assert app.tasks['tests.record'] is task
    assert (task.queue, task.max_retries, task.rate_limit) == (
        'zope', 3, '10/m')
    assert zope.component.getUtility(ITask, 'tests.bound').max_retries is None
    assert app.conf.broker_url == 'memory://'
    assert app.conf.worker_prefetch_multiplier == 2
    assert app.conf.task_acks_on_failure_or_timeout is False
    assert app.conf.broker_transport_options == {'visibility_timeout': 60}
    assert app.conf.accept_content == ('json', 'pickle')


def test_config_from_file_and_module_attributes_win(load_zcml, tmp_path):
    (tmp_path / 'celeryconfig.py').write_text(
        'broker_url = "memory://file"\nresult_expires = 77\n'
        'task_default_queue = "from-file"\n')
    (tmp_path / 'site.zcml').write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">'
        '<celery:config file="celeryconfig.py" module="tests.celeryconf" '
        'task_default_queue="attr" />'
        '</configure>')
    load_zcml(f'<include file="{tmp_path}/site.zcml" />')
    conf = z3c.celery.CELERY.conf
    assert conf.broker_url == 'memory://file'     # file beats module
    assert conf.result_expires == 77
    assert conf.task_default_queue == 'attr'      # attribute beats file
    assert conf.task_default_priority == 4        # only in the module


def test_our_settings_come_from_zcml_then_celeryconfig_then_defaults(
        load_zcml):
    from z3c.celery.settings import DEFAULTS as Z3C_DEFAULTS
    app = z3c.celery.CELERY
    load_zcml('<celery:config done_marker_retention="60" '
              'conflict_backoff_cap="2.5" />')
    # A celeryconfig layer under the ZCML one (as --config would load).
    celeryconfig = {'done_markers': False, 'conflict_backoff_cap': 3.0}
    app.conf.maps.append(celeryconfig)
    try:
        names = ('done_marker_retention', 'conflict_backoff_cap',
                 'done_markers', 'signing_secret')
        expected = (60, 2.5, False, Z3C_DEFAULTS['signing_secret'])
        assert app.z3c_settings(*names) == expected
        assert tuple(app.z3c_setting(name) for name in names) == expected
    finally:
        app.conf.maps.remove(celeryconfig)


def test_configuration_is_reset_by_cleanup(load_zcml):
    load_zcml('<celery:config task_default_queue="temporary" />')
    assert z3c.celery.CELERY.conf.task_default_queue == 'temporary'
    import zope.component.testing
    zope.component.testing.tearDown()
    assert z3c.celery.CELERY.conf.task_default_queue == 'celery'
    zope.component.testing.setUp()


def test_two_configs_conflict_naming_both_places(load_zcml, tmp_path):
    zcml = tmp_path / 'two.zcml'
    zcml.write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n'
        '<celery:config broker_url="memory://a" />\n'
        '<celery:config broker_url="memory://b" />\n'
        '</configure>\n')
    with pytest.raises(ConfigurationConflictError) as info:
        load_zcml(f'<include file="{zcml}" />')
    text = str(info.value)
    assert 'line 2' in text and 'line 3' in text and 'memory://a' in text


def test_include_overrides_replaces_config(load_zcml, tmp_path):
    (tmp_path / 'overrides.zcml').write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">'
        '<celery:config broker_url="memory://override" /></configure>')
    (tmp_path / 'app.zcml').write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">'
        '<celery:config broker_url="memory://site" /></configure>')
    load_zcml(f'''
      <include file="{tmp_path}/app.zcml" />
      <includeOverrides file="{tmp_path}/overrides.zcml" />
    ''')
    assert z3c.celery.CELERY.conf.broker_url == 'memory://override'


@pytest.mark.parametrize('snippet, expected', [
    ('<celery:task name="t" handler="tests.tasks.no_such_function" />',
     'no_such_function'),
    ('<celery:task name="t" handler="no.such.module.f" />', 'no.such'),
    ('<celery:task name="t" handler="tests.tasks.record" colour="red" />',
     'colour'),
    ('<celery:task name="t" handler="tests.tasks.SITE" />', 'not callable'),
    ('<celery:task name="t" handler="tests.tasks.record" max_retries="x" />',
     'max_retries'),
    ('<celery:task name="t" handler="tests.tasks.record" bind="maybe" />',
     'bind'),
    ('<celery:config worker_prefetch_multiplier="many" />',
     'worker_prefetch_multiplier'),
    ('<celery:config brokr_url="redis://" />', 'brokr_url'),
    ('<celery:config dispatch="carrier-pigeon" />', 'dispatch'),
    ('<celery:config broker_transport_options="{oops" />',
     'broker_transport_options'),
    ('<celery:config file="missing.py" />', 'missing.py'),
    ('<celery:task name="t" handler="tests.tasks.record" '
     'conflict_policy="tests.tasks.SITE" />', 'conflict_policy'),
])
def test_bad_zcml_fails_at_configuration_time_with_file_and_line(
        load_zcml, tmp_path, snippet, expected):
    zcml = tmp_path / 'bad.zcml'
    zcml.write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n'
        f'  {snippet}\n</configure>\n')
    with pytest.raises((ZopeXMLConfigurationError, ConfigurationError)) as i:
        load_zcml(f'<include file="{zcml}" />')
    text = str(i.value)
    assert f'{zcml}' in text and 'line 2' in text, text
    assert expected in text, text


def test_non_callable_handler_names_file_and_line(load_zcml, tmp_path):
    zcml = tmp_path / 'bad.zcml'
    zcml.write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n\n'
        '<celery:task name="t" handler="tests.tasks.SITE" />\n'
        '</configure>\n')
    with pytest.raises(ConfigurationError) as info:
        load_zcml(f'<include file="{zcml}" />')
    assert 'line 3' in str(info.value)
    assert 'not callable' in str(info.value)


def test_duplicate_task_name_conflicts_naming_both_lines(load_zcml, tmp_path):
    zcml = tmp_path / 'dup.zcml'
    zcml.write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n'
        '<celery:task name="t" handler="tests.tasks.record" />\n'
        '<celery:task name="t" handler="tests.tasks.read" />\n'
        '</configure>\n')
    with pytest.raises(ConfigurationConflictError) as info:
        load_zcml(f'<include file="{zcml}" />')
    text = str(info.value)
    assert 'line 2' in text and 'line 3' in text and str(zcml) in text


def test_task_name_taken_by_a_python_task_is_an_error(load_zcml):
    @z3c.celery.CELERY.task(name='tests.python_defined')
    def python_defined():
        pass
    try:
        with pytest.raises(ConfigurationError, match='already defined'):
            load_zcml('<celery:task name="tests.python_defined" '
                      'handler="tests.tasks.record" />')
    finally:
        z3c.celery.CELERY.tasks.unregister('tests.python_defined')


def test_zcml_tasks_are_forgotten_by_cleanup(load_zcml):
    load_zcml('<celery:task name="tests.gone" handler="tests.tasks.noop" />')
    assert 'tests.gone' in z3c.celery.CELERY.tasks
    import zope.component.testing
    zope.component.testing.tearDown()
    assert 'tests.gone' not in z3c.celery.CELERY.tasks
    zope.component.testing.setUp()


def test_config_schema_knows_every_celery_setting():
    from celery.app.defaults import NAMESPACES
    from celery.app.defaults import flatten

    from z3c.celery.metadirectives import ICeleryConfigDirective
    names = set(ICeleryConfigDirective.names(all=True))
    assert {name for name, _ in flatten(NAMESPACES)} <= names


# <celery:schedule>

def test_schedule_handler_records_one_action_and_changes_nothing():
    context = RecordingContext()
    before = dict(z3c.celery.CELERY.conf.beat_schedule or {})
    metaconfigure.schedule(context, name='every-second', task='t.record',
                           seconds=1.0, args=['k', 1], principal='zope.alice',
                           queue='slow')
    assert dict(z3c.celery.CELERY.conf.beat_schedule or {}) == before
    [action] = context.actions
    assert action['discriminator'] == ('celery:schedule', 'every-second')
    app, name, entry = action['args']
    assert entry['task'] == 't.record' and entry['args'] == ('k', 1)
    assert entry['options'] == {'queue': 'slow',
                                '_principal_id_': 'zope.alice'}
    assert entry['schedule'].run_every.total_seconds() == 1.0


def test_schedule_feeds_beat_schedule_with_the_sites_own(load_zcml):
    import celery.schedules
    load_zcml('''
      <celery:config beat_schedule="{'own': {'task': 't.noop',
                                            'schedule': 30.0}}" />
      <celery:schedule name="weekdays" task="t.record"
                       crontab="*/5 8-18 * * mon-fri"
                       args="('k', 2)" kwargs="{'extra': 1}"
                       options="{'expires': 60}" />
      <celery:schedule name="fast" task="t.record" seconds="0.5" />''')
    schedule = z3c.celery.CELERY.conf.beat_schedule
    assert sorted(schedule) == ['fast', 'own', 'weekdays']
    weekdays = schedule['weekdays']
    assert isinstance(weekdays['schedule'], celery.schedules.crontab)
    assert weekdays['schedule'] == celery.schedules.crontab(
        minute='*/5', hour='8-18', day_of_week='mon-fri')
    assert weekdays['args'] == ('k', 2)
    assert weekdays['kwargs'] == {'extra': 1}
    assert weekdays['options'] == {'expires': 60}
    assert schedule['own'] == {'task': 't.noop', 'schedule': 30.0}


def test_schedule_entries_are_forgotten_by_cleanup(load_zcml):
    load_zcml('<celery:schedule name="gone" task="t.noop" seconds="1" />')
    assert 'gone' in z3c.celery.CELERY.conf.beat_schedule
    import zope.component.testing
    zope.component.testing.tearDown()
    assert 'gone' not in (z3c.celery.CELERY.conf.beat_schedule or {})
    zope.component.testing.setUp()


@pytest.mark.parametrize('attributes, expected', [
    ('', 'give either seconds or crontab (neither was given)'),
    ('seconds="1" crontab="* * * * *"', 'both were given'),
    ('seconds="0"', 'seconds must be more than 0'),
    ('seconds="-2.5"', 'seconds must be more than 0'),
    ('seconds="soon"', 'seconds'),
    ('seconds="1e400"', 'seconds must be more than 0 (and finite)'),
    ('seconds="nan"', 'seconds must be more than 0'),
    ('crontab="61 * * * *"', "crontab '61 * * * *' is not valid"),
    ('crontab="* * * *"', 'must have five fields'),
    ('crontab="* * * * someday"', 'is not valid'),
    ('seconds="1" args="{\'a\': 1}"', 'args must be a list or tuple'),
    ('seconds="1" args="\'k\'"', 'args must be a list or tuple'),
    ('seconds="1" kwargs="[1]"', 'kwargs must be a dict'),
    ('seconds="1" kwargs="{1: 2}"', 'kwargs must be a dict'),
    ('seconds="1" kwargs="{oops"', 'kwargs'),
    ('seconds="1" options="(1,)"', 'options must be a dict'),
    ('seconds="1" colour="red"', 'colour'),
])
def test_bad_schedule_fails_at_configuration_time_with_file_and_line(
        load_zcml, tmp_path, attributes, expected):
    zcml = tmp_path / 'bad.zcml'
    zcml.write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n\n'
        f'  <celery:schedule name="e" task="t.noop" {attributes} />\n'
        '</configure>\n')
    with pytest.raises((ZopeXMLConfigurationError, ConfigurationError)) as i:
        load_zcml(f'<include file="{zcml}" />')
    text = str(i.value)
    assert f'{zcml}' in text and 'line 3' in text, text
    assert expected in text, text


def test_schedule_without_name_or_task_fails(load_zcml):
    with pytest.raises(ConfigurationError, match='name'):
        load_zcml('<celery:schedule task="t.noop" seconds="1" />')
    with pytest.raises(ConfigurationError, match='task'):
        load_zcml('<celery:schedule name="e" seconds="1" />')


def test_duplicate_schedule_entry_conflicts_naming_both_lines(
        load_zcml, tmp_path):
    zcml = tmp_path / 'dup.zcml'
    zcml.write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n'
        '<celery:schedule name="e" task="t.noop" seconds="1" />\n'
        '<celery:schedule name="e" task="t.record" crontab="0 * * * *" />\n'
        '</configure>\n')
    with pytest.raises(ConfigurationConflictError) as info:
        load_zcml(f'<include file="{zcml}" />')
    text = str(info.value)
    assert 'line 2' in text and 'line 3' in text and str(zcml) in text
    assert "('celery:schedule', 'e')" in text


def test_schedule_entry_also_in_beat_schedule_setting_is_an_error(
        load_zcml, tmp_path):
    zcml = tmp_path / 'twice.zcml'
    zcml.write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n'
        '<celery:config beat_schedule="{\'e\': {\'task\': \'t.noop\', '
        '\'schedule\': 5}}" />\n'
        '<celery:schedule name="e" task="t.noop" seconds="1" />\n'
        '</configure>\n')
    with pytest.raises(ConfigurationError) as info:
        load_zcml(f'<include file="{zcml}" />')
    text = str(info.value)
    assert 'defined both by <celery:schedule> and in the beat_schedule' \
        in text and 'line 3' in text, text


def test_overrides_replace_a_schedule_entry(load_zcml, tmp_path):
    (tmp_path / 'overrides.zcml').write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n'
        '<celery:schedule name="e" task="t.record" seconds="60" />\n'
        '</configure>\n')
    (tmp_path / 'app.zcml').write_text(
        '<configure xmlns:celery="http://namespaces.zope.org/celery">\n'
        '<celery:schedule name="e" task="t.noop" seconds="1" />\n'
        '</configure>\n')
    load_zcml(f'''
      <include file="{tmp_path}/app.zcml" />
      <includeOverrides file="{tmp_path}/overrides.zcml" />''')
    entry = z3c.celery.CELERY.conf.beat_schedule['e']
    assert entry['task'] == 't.record'
    assert entry['schedule'].run_every.total_seconds() == 60
