"""The package's layout holds: who may import whom, no import cycles, and a
web process that only queues tasks loads no worker or command-line code.

See docs/design.rst.
"""
import ast
import os
import subprocess
import sys

import pytest


SRC = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'src')
PACKAGE = 'z3c.celery'

#: The modules every part may import.
SHARED = {'interfaces', 'exceptions', 'message', 'signing', 'database',
          'events', 'logging', 'settings'}

#: What each part may import besides the shared modules (and itself).
ALLOWED = {
    'shared': set(),
    'sending': set(),
    # A run queues its follow-ups through the sending side.
    'worker': {'sending'},
    'outbox': {'sending', 'worker'},
    'app': {'sending', 'outbox', 'worker'},
    'zcml': {'app', 'package'},
    'package': {'app', 'shim'},
    'testing': {'app', 'sending', 'outbox', 'worker', 'package'},
    'shim': {'app', 'sending', 'worker', 'testing', 'package', 'shim'},
}

SHIMS = {'celery', 'session', 'loader', 'layer', 'conftest', 'task'}

#: Imports of our own modules inside functions, each for a reason the
#: code gives: our command-line options are built when the ``celery``
#: command asks for them; the pytest plugin imports z3c.celery (which
#: makes its app Celery's default) only when a test asks for a fixture.
LATE_IMPORTS = {
    ('z3c.celery.app', 'z3c.celery.worker.bootsteps'),
    ('z3c.celery.testing.pytest_plugin', 'z3c.celery.testing'),
}


def modules():
    """``{dotted name: path}`` of every module of the package."""
    found = {}
    top = os.path.join(SRC, *PACKAGE.split('.'))
    for directory, _, files in os.walk(top):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(directory, name)
            dotted = os.path.relpath(path, SRC)[:-3].replace(os.sep, '.')
            found[dotted.removesuffix('.__init__')] = path
    return found


MODULES = modules()


def own_imports(path, dotted):
    """``[(imported module, inside a function?)]`` of our own modules."""
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, inner))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ''
                if child.level:
                    parts = dotted.split('.')
                    if not path.endswith('__init__.py'):
                        parts = parts[:-1]
                    base = '.'.join(parts[:len(parts) - child.level + 1]
                                    + ([base] if base else []))
                for alias in child.names:
                    candidate = f'{base}.{alias.name}'
                    found.append((candidate if candidate in MODULES
                                  else base, inner))
            visit(child, inner)
    visit(tree, False)
    return [(name, inner) for name, inner in found
            if name == PACKAGE or name.startswith(PACKAGE + '.')]


GRAPH = {dotted: own_imports(path, dotted)
         for dotted, path in MODULES.items()}


def part(dotted):
    rest = dotted[len(PACKAGE) + 1:].split('.') if dotted != PACKAGE \
        else []
    if not rest:
        return 'package'
    if rest[0] in ('sending', 'outbox', 'worker', 'testing'):
        return rest[0]
    if rest[0] in SHARED:
        return 'shared'
    if rest[0] in SHIMS:
        return 'shim'
    if rest[0] in ('metadirectives', 'metaconfigure'):
        return 'zcml'
    return rest[0]


def test_every_module_belongs_to_a_known_part():
    assert {part(m) for m in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize('module', sorted(MODULES))
def test_each_part_imports_only_what_it_may(module):
    mine = part(module)
    wrong = sorted(
        name for name, _ in GRAPH[module]
        if part(name) not in ALLOWED[mine] | {'shared', mine})
    assert wrong == [], f'{module} ({mine}) may not import {wrong}'


def test_no_import_cycles_counting_imports_inside_functions():
    edges = {m: {n for n, _ in GRAPH[m] if n in MODULES and n != m}
             for m in MODULES}
    state = {}
    cycles = []

    def visit(node, stack):
        state[node] = 'open'
        for target in sorted(edges[node]):
            if state.get(target) == 'open':
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 'done'
    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_inside_functions_are_the_known_few():
    late = {(m, n) for m in MODULES for n, inner in GRAPH[m] if inner}
    assert late == LATE_IMPORTS


#: What a web process must not load when it imports z3c.celery.
WORKER_ONLY = ['ZConfig', 'zope.app.appsetup', 'ZEO',
               'z3c.celery.worker.bootsteps', 'z3c.celery.worker.zopeconf',
               'z3c.celery.worker.beat', 'celery.beat',
               'z3c.celery.outbox.relay', 'z3c.celery.outbox.command',
               'z3c.celery.testing', 'celery.bin.celery']

PROBE = '''
import sys
import z3c.celery
import z3c.celery.celery, z3c.celery.session
from z3c.celery.interfaces import ITask
app = z3c.celery.CELERY
app.conf.broker_url
print(' '.join(sorted(m for m in {modules!r} if m in sys.modules)))
'''


def test_a_web_process_loads_no_worker_or_command_line_code():
    output = subprocess.run(
        [sys.executable, '-c', PROBE.format(modules=WORKER_ONLY)],
        capture_output=True, text=True, check=True).stdout
    assert output.split() == []


def test_the_celery_command_gets_the_worker_options():
    output = subprocess.run(
        [sys.executable, '-m', 'celery', '-A', 'z3c.celery.CELERY',
         'worker', '--help'], capture_output=True, text=True, check=True,
        timeout=60).stdout
    assert '--zope-conf' in output and '--logging-ini' in output
