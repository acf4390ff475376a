"""``buildout.cfg`` refers to things that exist.

A full buildout run downloads every dependency from PyPI and takes minutes,
too slow for the test suite; it was run by hand (see the closing note of
issue 5 and the tutorial).  This test checks the file itself: each part
has a known recipe, each script it asks for is an entry point of an egg
it lists (zc.recipe.egg makes scripts of the listed eggs only), the extras
exist, and the zope.conf it writes is a valid zope.conf for the worker.
"""
import configparser
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys

import pytest
import ZConfig

from tests.conftest import ROOT


BUILDOUT_CFG = os.path.join(ROOT, 'buildout.cfg')
RECIPES = {'zc.recipe.egg', 'collective.recipe.template'}


def read_buildout(path=BUILDOUT_CFG):
    """Parse *path* as zc.buildout does (comments only at column 0)."""
    with open(path) as f:
        text = ''.join(line for line in f if not line.startswith(('#', ';')))
    parser = configparser.ConfigParser(
        interpolation=None, comment_prefixes=(), strict=True)
    parser.optionxform = str
    parser.read_string(text, path)
    return parser


def substitute(parser, section, value, directory='/srv/site', depth=0):
    """Expand ``${section:option}`` as buildout does."""
    assert depth < 10, f'recursive substitution in {value!r}'

    def one(match):
        ref_section = match.group(1) or section
        option = match.group(2)
        if (ref_section, option) == ('buildout', 'directory'):
            return directory
        assert parser.has_option(ref_section, option), match.group(0)
        return substitute(parser, ref_section,
                          parser.get(ref_section, option), directory,
                          depth + 1)
    return re.sub(r'\$\{([^:}]*):([^}]+)\}', one, value)


def words(value):
    return [w for w in value.split() if w]


def eggs_of(value):
    """``[(distribution, extras)]`` of an ``eggs`` option."""
    found = []
    for line in value.strip().splitlines():
        match = re.match(r'\s*([\w.\-]+)\s*(?:\[([^\]]*)\])?\s*$', line)
        assert match, f'cannot read egg line {line!r}'
        extras = [e.strip() for e in (match.group(2) or '').split(',')
                  if e.strip()]
        found.append((match.group(1), extras))
    return found


@pytest.fixture(scope='module')
def buildout():
    return read_buildout()


def test_every_part_is_a_section_with_a_known_recipe(buildout):
    parts = words(buildout.get('buildout', 'parts'))
    assert {'celery', 'test', 'worker'} <= set(parts)
    for part in parts:
        assert buildout.has_section(part), part
        assert buildout.get(part, 'recipe') in RECIPES, part
    assert buildout.get('buildout', 'develop').strip() == '.'


def test_scripts_are_entry_points_of_the_listed_eggs(buildout):
    expected = {'celery': {'celery', 'runzeo'}, 'test': {'test'},
                'worker': {'worker'}}
    for part, names in expected.items():
        eggs = eggs_of(buildout.get(part, 'eggs'))
        scripts = {}
        for entry in words(buildout.get(part, 'scripts')):
            original, _, renamed = entry.partition('=')
            scripts[renamed or original] = original
        assert set(scripts) == names, part
        available = {}
        for name, extras in eggs:
            dist = importlib.metadata.distribution(name)
            provided = set(dist.metadata.get_all('Provides-Extra') or ())
            assert set(extras) <= provided, (part, name, extras)
            for ep in dist.entry_points.select(group='console_scripts'):
                available[ep.name] = ep
        for script, original in scripts.items():
            assert original in available, (part, script)


def test_test_script_runs_pytest_in_the_checkout(buildout):
    init = substitute(buildout, 'test',
                      buildout.get('test', 'initialization'), ROOT)
    assert f"os.chdir('{ROOT}')" in init
    assert 'pytest=test' in buildout.get('test', 'scripts')


def test_worker_starts_celery_worker_with_the_generated_zope_conf(buildout):
    init = substitute(buildout, 'worker',
                      buildout.get('worker', 'initialization'))
    match = re.search(r"sys\.argv\[1:1\] = (\[.*?\]) \+ shlex\.split\("
                      r"'([^']*)'\)", init)
    assert match, init
    argv = eval(match.group(1)) + shlex.split(match.group(2))  # noqa: S307
    assert argv[:5] == ['-A', 'z3c.celery.CELERY', 'worker', '--zope-conf',
                        '/srv/site/etc/zope.conf']
    assert substitute(buildout, 'zope-conf', buildout.get(
        'zope-conf', 'output')) == '/srv/site/etc/zope.conf'


def test_generated_zope_conf_is_valid_and_names_the_example_site(
        buildout, tmp_path):
    import zope.app.appsetup
    schema = os.path.join(os.path.dirname(zope.app.appsetup.__file__),
                          'schema', 'schema.xml')
    template = substitute(buildout, 'zope-conf',
                          buildout.get('zope-conf', 'input'), ROOT)
    assert template.startswith('inline:')
    conf = tmp_path / 'zope.conf'
    conf.write_text(template[len('inline:'):].strip() + '\n')
    options, _ = ZConfig.loadConfig(ZConfig.loadSchema(schema),
                                    str(conf))
    assert options.site_definition == os.path.join(
        ROOT, 'examples', 'site.zcml')
    assert os.path.isfile(options.site_definition)
    assert options.path == [os.path.join(ROOT, 'examples')]
    assert os.path.isdir(os.path.join(options.path[0], 'exampleapp'))
    storage = options.databases[0].config.storage.config
    assert storage.server[0].address == ('127.0.0.1', 8100)


def test_the_worker_command_accepts_the_options_bin_worker_passes(
        buildout):
    init = substitute(buildout, 'worker',
                      buildout.get('worker', 'initialization'))
    match = re.search(r"sys\.argv\[1:1\] = (\[.*?\]) \+ shlex\.split\("
                      r"'([^']*)'\)", init)
    argv = eval(match.group(1)) + shlex.split(match.group(2))  # noqa: S307
    options = [a for a in argv if a.startswith('--')]
    process = subprocess.run(
        [sys.executable, '-m', 'celery', *argv[:3], '--help'],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert process.returncode == 0, process.stderr
    for option in options:
        assert option in process.stdout, option


def test_versions_pin_what_an_extra_requires_exactly():
    """zc.buildout picks each distribution once, the newest first: a
    requirement pinned exactly by an extra (kombu's redis extra pins
    packaging) conflicts with the newest version picked before, unless
    ``[versions]`` pins it to the same."""
    versions = dict(read_buildout().items('versions'))
    pinned = {}
    for requirement in importlib.metadata.requires('kombu') or ():
        match = re.match(r'([A-Za-z0-9_.-]+)\s*==\s*([^;\s]+)\s*;.*extra\s*'
                         r'==\s*"redis"', requirement)
        if match:
            pinned[match.group(1)] = match.group(2)
    assert pinned, 'kombu[redis] pins nothing exactly any more: drop ' \
        'the pins of [versions] that were there for it'
    assert {name: versions.get(name) for name in pinned} == pinned
