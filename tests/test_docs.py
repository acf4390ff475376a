"""The documentation builds without a warning and its examples run.

Sphinx runs in a subprocess (as a user would run it), once with the HTML
builder and ``-W`` (a warning fails the build: a broken reference, a page
missing from the table of contents, invalid reST in a directive schema's
description), once with the doctest builder.
"""
import html
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


DOCS = os.path.join(ROOT, 'docs')


def sphinx(builder, out, *options):
    """Run sphinx-build; return (returncode, combined output)."""
    process = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-b', builder, '-E', '-q',
         '-d', str(out / 'doctrees'), *options, DOCS, str(out / builder)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    return process.returncode, process.stdout + process.stderr


@pytest.fixture(scope='module')
def html_build(tmp_path_factory):
    out = tmp_path_factory.mktemp('docs')
    returncode, output = sphinx('html', out, '-W', '--keep-going')
    return returncode, output, out / 'html'


def test_html_builds_without_warnings(html_build):
    returncode, output, _ = html_build
    assert returncode == 0, output
    assert 'WARNING' not in output, output


def test_every_page_is_in_the_table_of_contents(html_build):
    _, _, out = html_build
    pages = sorted(name[:-4] for name in os.listdir(DOCS)
                   if name.endswith('.rst') and name != 'index.rst')
    with open(out / 'index.html') as f:
        index = f.read()
    linked = set(re.findall(r'href="([\w-]+)\.html"', index))
    assert [page for page in pages if page not in linked] == []


def test_zcml_reference_lists_every_attribute_of_each_directive(html_build):
    from z3c.celery.metadirectives import ICeleryConfigDirective
    from z3c.celery.metadirectives import IScheduleDirective
    from z3c.celery.metadirectives import ITaskDirective
    _, _, out = html_build
    with open(out / 'zcml.html') as f:
        page = html.unescape(f.read())
    for directive, schema in (('config', ICeleryConfigDirective),
                              ('task', ITaskDirective),
                              ('schedule', IScheduleDirective)):
        names = list(schema.names(all=True))
        assert len(names) > (5 if directive == 'schedule' else 10)
        for name in names:
            anchor = re.sub(r'[^a-z0-9]+', '-', f'{directive}-{name}'.lower())
            assert f'id="{anchor}"' in page, (directive, name)
        # Each row names its attribute as the user writes it in ZCML.
        rows = re.findall(
            rf'<tr class="[^"]*" id="{directive}-[^"]*">\s*<td>\s*<p>'
            r'<code[^>]*><span class="pre">([^<]+)</span>', page)
        assert sorted(rows) == sorted(names), directive


def test_doctests_in_the_docs_pass(tmp_path):
    returncode, output = sphinx('doctest', tmp_path)
    with open(tmp_path / 'doctest' / 'output.txt') as f:
        summary = f.read()
    assert returncode == 0, output + summary
    tests = int(re.search(r'(\d+) tests?\n', summary).group(1))
    assert tests >= 20, summary
    assert ' 0 failures in tests' in summary, summary
