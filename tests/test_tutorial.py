"""docs/tutorial.rst works when followed literally, step by step.

The steps are taken from the page itself, in order: each ``$`` command
of a ``console`` block, each ``python`` block with a ``:caption:`` (a
file the reader saves), and the ``>>>`` session typed into the Python
started by a lone ``../.venv/bin/python`` command.  They run as one shell
script in a fresh temporary directory, with ``$CHECKOUT`` set to this
source tree, against real processes (Redis, ZEO, a worker) that the page
starts in the background and stops at its end.  The output lines a
``console`` block shows after a command must appear in that command's
output (``...`` matches anything).  The only change to the page's text:
the ports of its ``export REDIS_PORT=... ZEO_PORT=...`` line are free
ones, so that the run does not meet a service of the machine.
"""
import os
import re
import shlex
import sys
import textwrap

import pytest

from z3c.celery.testing.servers import free_port

from tests.processes import run_bounded


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, 'docs', 'tutorial.rst')
TIMEOUT = 900
MARK = '@@tutorial-step '
INTERPRETER = '../.venv/bin/python'
#: Where the page ends for this test (see the note in that section).
END = 'Deploying with buildout'


def indented_block(lines, i):
    """The body of the directive on line *i*; and the line after it."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    block = []
    i += 1
    while i < len(lines) and (
            not lines[i].strip()
            or len(lines[i]) - len(lines[i].lstrip()) > indent):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
    indents = [len(line) - len(line.lstrip()) for line in block
               if line.strip()]
    cut = min(indents) if indents else 0
    return [line[cut:] for line in block], i


def steps(text):
    """The page's steps: ('shell', command, expected lines),
    ('file', name, text) and ('session', doctest text)."""
    lines = text[:text.index(END)].splitlines()
    result = []
    session = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        directive = re.match(r'\.\. code-block:: (\w+)', stripped)
        if directive:
            language = directive.group(1)
            body, i = indented_block(lines, i)
            options = {}
            while body and body[0].startswith(':'):
                name, _, value = body.pop(0)[1:].partition(':')
                options[name] = value.strip()
            body = textwrap.dedent('\n'.join(body)).strip('\n')
            body = body.splitlines()
            if language == 'console':
                for entry in body:
                    if entry.startswith('$ '):
                        result.append(['shell', entry[2:], []])
                    elif entry.strip():
                        result[-1][2].append(entry)
            elif language == 'python' and 'caption' in options:
                result.append(['file', options['caption'],
                               '\n'.join(body) + '\n'])
            continue
        if stripped.startswith('>>>') and not line.startswith(' '):
            while i < len(lines) and lines[i].strip():
                session.append(lines[i])
                i += 1
            session.append('')
            continue
        i += 1
    shells = [step for step in result if step[0] == 'shell']
    starts = [step for step in shells if step[1] == INTERPRETER]
    assert len(starts) == 1, 'one Python session expected'
    starts[0][0] = 'session'
    starts[0].append('\n'.join(session))
    return result


def script(page_steps, session_file, redis_port, zeo_port):
    out = ['set -e',
           # Ours, not the page's: whatever fails, the background jobs go.
           "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for number, step in enumerate(page_steps):
        out.append(f'echo "{MARK}{number}"')
        kind = step[0]
        if kind == 'file':
            out.append(f"cat > {shlex.quote(step[1])} <<'TUTORIAL_EOF'")
            out.append(step[2].rstrip('\n'))
            out.append('TUTORIAL_EOF')
        elif kind == 'session':
            out.append(
                f'{INTERPRETER} -c "import doctest, sys; '
                f'r = doctest.testfile(sys.argv[1], module_relative=False, '
                f'optionflags=doctest.ELLIPSIS); sys.exit(bool(r.failed))" '
                f'{shlex.quote(session_file)}')
        else:
            command = step[1]
            if command.startswith('export REDIS_PORT='):
                command = re.sub(r'REDIS_PORT=\d+', f'REDIS_PORT={redis_port}',
                                 command)
                command = re.sub(r'ZEO_PORT=\d+', f'ZEO_PORT={zeo_port}',
                                 command)
            out.append(command)
    out.append(f'echo "{MARK}end"')
    return '\n'.join(out) + '\n'


def test_page_steps_are_found():
    with open(PAGE) as f:
        page_steps = steps(f.read())
    kinds = [step[0] for step in page_steps]
    assert kinds.count('session') == 1
    assert kinds.count('file') == 2
    commands = [step[1] for step in page_steps if step[0] == 'shell']
    assert any('celery -A z3c.celery.CELERY worker' in c for c in commands)
    assert any('runzeo' in c for c in commands)
    assert commands[-1] == 'kill $(jobs -p)'


@pytest.mark.timeout(TIMEOUT + 120)
def test_the_tutorial_runs_as_written(tmp_path):
    with open(PAGE) as f:
        page_steps = steps(f.read())
    session = tmp_path / 'session.txt'
    session.write_text(
        [step for step in page_steps if step[0] == 'session'][0][-1])
    fresh = tmp_path / 'fresh'
    fresh.mkdir()
    text = script(page_steps, str(session), free_port(), free_port())
    (tmp_path / 'tutorial.sh').write_text(text)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(('CELERY_', 'EXAMPLE_', 'VIRTUAL_ENV',
                                  'PYTHON'))}
    env['CHECKOUT'] = ROOT
    # The reader's python3, not this virtualenv's.
    env['PATH'] = os.pathsep.join(
        p for p in env.get('PATH', '').split(os.pathsep)
        if os.path.dirname(sys.executable) != p)
    returncode, output = run_bounded(
        ['bash', str(tmp_path / 'tutorial.sh')], TIMEOUT, 'The tutorial',
        cwd=str(fresh), env=env)
    logs = ''
    for name in ('worker.log', 'zeo.log', 'redis.log'):
        path = fresh / 'mysite' / 'var' / name
        if path.exists():
            logs += f'\n--- {name}\n{path.read_text()[-4000:]}'
    assert returncode == 0, output + logs
    assert f'{MARK}end' in output, output + logs
    parts = output.split(MARK)
    by_step = {}
    for part in parts[1:]:
        number, _, text = part.partition('\n')
        by_step[number] = text
    for number, step in enumerate(page_steps):
        if step[0] != 'shell':
            continue
        got = by_step[str(number)].splitlines()
        for expected in step[2]:
            pattern = '.*'.join(re.escape(piece)
                                for piece in expected.split('...'))
            assert any(re.fullmatch(pattern, line.strip()) for line in got), (
                f'step {step[1]!r}: {expected!r} not in its output:\n'
                f'{by_step[str(number)]}{logs}')
    worker_log = (fresh / 'mysite' / 'var' / 'worker.log').read_text()
    assert 'exampleapp.publish' in worker_log and 'succeeded' in worker_log, \
        worker_log
