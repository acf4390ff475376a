"""The components the runner looks up, and the three levels of override:
the default, one task (attribute or named utility), the whole site
(overrides.zcml)."""
import pytest
import transaction
import zope.component
from zope.interface.verify import verifyObject

from z3c.celery.interfaces import IAfterAbortHandler
from z3c.celery.interfaces import IConflictPolicy
from z3c.celery.interfaces import IDispatcher
from z3c.celery.interfaces import IPrincipalResolver
from z3c.celery.interfaces import ITask
from z3c.celery.sending import dispatchers
from z3c.celery.worker import components

from .conftest import read_data
from tests import tasks


@pytest.mark.parametrize('interface, component', [
    (IPrincipalResolver, components.AuthenticationPrincipalResolver()),
    (IConflictPolicy, components.BackoffConflictPolicy()),
    (IAfterAbortHandler, components.AfterAbortHandler()),
    (IDispatcher, dispatchers.AfterCommitDispatcher()),
    (IDispatcher, dispatchers.InlineDispatcher()),
    (IDispatcher, dispatchers.EagerDispatcher()),
])
def test_components_provide_their_interface(interface, component):
    assert verifyObject(interface, component)


def test_configure_zcml_registers_the_defaults(load_zcml):
    load_zcml()
    for interface, cls in [
            (IPrincipalResolver, components.AuthenticationPrincipalResolver),
            (IConflictPolicy, components.BackoffConflictPolicy),
            (IAfterAbortHandler, components.AfterAbortHandler)]:
        assert isinstance(zope.component.getUtility(interface), cls)
    names = {n for n, _ in zope.component.getUtilitiesFor(IDispatcher)}
    assert {'after-commit', 'inline', 'eager'} <= names


def test_task_verifies_as_itask(load_zcml):
    load_zcml('<celery:task name="t.record" handler="tests.tasks.record"/>')
    assert verifyObject(ITask, zope.component.getUtility(ITask, 't.record'))


TASKS = '''
  <celery:config dispatch="inline" />
  <celery:task name="t.default" handler="tests.tasks.{handler}" />
  <celery:task name="t.attribute" handler="tests.tasks.{handler}"
               {attribute}="tests.components.{factory}" />
  <celery:task name="t.named" handler="tests.tasks.{handler}" />
  <utility name="t.named" factory="tests.components.{factory}"
           provides="{interface}" />
'''

CASES = {
    'principal_resolver': dict(
        handler='record', factory='AlwaysBob',
        interface='z3c.celery.interfaces.IPrincipalResolver'),
    'conflict_policy': dict(
        handler='conflict_then_record', factory='NeverRetry',
        interface='z3c.celery.interfaces.IConflictPolicy'),
    'after_abort': dict(
        handler='fail', factory='RecordFailure',
        interface='z3c.celery.interfaces.IAfterAbortHandler'),
}


def run(name, db):
    """Queue task *name* as alice, commit, return (result, data)."""
    task = zope.component.getUtility(ITask, name)
    handler = task.__wrapped__.__name__
    args = {'record': ('k', 1), 'conflict_then_record': ('k', 1),
            'fail': ('k',)}[handler]
    tasks._conflicts.clear()
    result = task.delay(*args)
    transaction.commit()
    data = read_data(db)
    with db.transaction() as conn:
        conn.root()['data'].clear()
    return result, data


def behaviour(case, result, data):
    """Which behaviour ran: 'default' or 'custom'."""
    if case == 'principal_resolver':
        return {'zope.alice': 'default', 'zope.bob': 'custom'}[
            data['k'][1]]
    if case == 'conflict_policy':
        return 'default' if result.successful() else 'custom'
    if case == 'after_abort':
        assert result.failed()
        return 'custom' if 'failure' in data else 'default'


@pytest.mark.parametrize('case', sorted(CASES))
def test_default_then_per_task_override(case, load_zcml, db, login):
    load_zcml(TASKS.format(attribute=case, **CASES[case]))
    login('zope.alice')
    assert behaviour(case, *run('t.default', db)) == 'default'
    assert behaviour(case, *run('t.attribute', db)) == 'custom'
    assert behaviour(case, *run('t.named', db)) == 'custom'


@pytest.mark.parametrize('case', sorted(CASES))
def test_overrides_zcml_replaces_the_default_site_wide(
        case, load_zcml, db, login, tmp_path):
    spec = CASES[case]
    (tmp_path / 'overrides.zcml').write_text(
        '<configure xmlns="http://namespaces.zope.org/zope">'
        f'<utility factory="tests.components.{spec["factory"]}" '
        f'provides="{spec["interface"]}" /></configure>')
    load_zcml(f'''
      <celery:config dispatch="inline" />
      <celery:task name="t.default" handler="tests.tasks.{spec["handler"]}"/>
      <includeOverrides file="{tmp_path}/overrides.zcml" />
    ''')
    login('zope.alice')
    assert behaviour(case, *run('t.default', db)) == 'custom'


def test_per_task_factory_must_provide_the_interface(load_zcml, db):
    from zope.configuration.exceptions import ConfigurationError
    with pytest.raises(ConfigurationError,
                       match='does not provide IConflictPolicy'):
        load_zcml('<celery:task name="t" handler="tests.tasks.record" '
                  'conflict_policy="tests.components.AlwaysBob" />')
