"""Benchmarks of z3c.celery against plain Celery (not tests: CI times nothing).

Run them all with one command from the root of the source tree::

    .venv/bin/python -m benchmarks

Each ``bench_<topic>.py`` module here exposes ``main()``.  The runner
(``__main__.py``) calls it in a fresh Python process of its own, shows its
output as it comes, and writes ``RESULTS.md``: date, machine, versions, and
for each module the Markdown that ``main()`` returned (a ``str``) or else
what it printed.  A benchmark compares against plain Celery measured in the
same run, on the same Redis, and reports ratios.
"""
