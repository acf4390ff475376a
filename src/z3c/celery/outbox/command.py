"""``celery -A z3c.celery.CELERY outbox show|flush|retry|purge``.

The outbox's command line: figures, publishing now, putting dead letters
back, deleting them.  ``--zope-conf`` (the app's preload option, also
``$Z3C_CELERY_ZOPE_CONF``) or ``--zodb-conf`` name the database, before or
after the subcommand.  See docs/dispatch.rst.
"""
import json

import click
import ZODB.config
from celery.bin.base import CeleryCommand
from celery.bin.base import handle_preload_options

from z3c.celery.outbox import store
from z3c.celery.outbox.relay import Relay
from z3c.celery.worker.zopeconf import open_own_database


class _CommandState:
    """Options of the ``outbox`` group and the database they opened."""

    def __init__(self, app, zope_conf, zodb_conf):
        self.app = app
        self.zope_conf = zope_conf or app.z3c_setting('ZOPE_CONF')
        self.zodb_conf = zodb_conf
        self.db = None
        self.close_db = None

    def choose(self, zope_conf=None, zodb_conf=None):
        """The options given after the subcommand win."""
        if zope_conf or zodb_conf:
            self.zope_conf, self.zodb_conf = zope_conf, zodb_conf

    def database(self):
        if self.db is not None:
            return self.db
        if self.zodb_conf:
            self.db = ZODB.config.databaseFromURL(self.zodb_conf)
            self.close_db = self.db.close
        elif self.zope_conf:
            self.db, self.close_db = open_own_database(
                self.app, self.zope_conf)
        else:
            self.db = store.database_for(self.app)
        if self.db is None:
            raise click.UsageError(
                'No ZODB database to read the outbox from: give '
                '--zope-conf (the site\'s zope.conf) or --zodb-conf (a ZODB '
                'configuration file with a <zodb> section), or set '
                'ZOPE_CONF.')
        return self.db

    def close(self):
        if self.close_db is not None:
            close, self.close_db = self.close_db, None
            close()


_STATE_KEY = 'z3c.celery.outbox'


def _database(ctx, zope_conf=None, zodb_conf=None):
    state = ctx.meta[_STATE_KEY]
    state.choose(zope_conf, zodb_conf)
    return state.database()


_ZOPE_CONF_HELP = ('The site\'s zope.conf (its database holds the outbox); '
                   'default: the ZOPE_CONF setting.')
_ZODB_CONF_HELP = ('Instead of --zope-conf: a ZODB configuration file '
                   '(<zodb> section, as ZODB.config reads it).')


def _site_options(command):
    """``--zope-conf`` / ``--zodb-conf`` after the subcommand too."""
    command = click.option(
        '--zodb-conf', type=click.Path(exists=True, dir_okay=False),
        help=_ZODB_CONF_HELP)(command)
    return click.option(
        '--zope-conf', type=click.Path(exists=True, dir_okay=False),
        help=_ZOPE_CONF_HELP)(command)


def _age(seconds):
    if seconds is None:
        return '-'
    if seconds < 120:
        return f'{seconds:.1f}s'
    if seconds < 7200:
        return f'{seconds / 60:.1f}min'
    return f'{seconds / 3600:.1f}h'


# --zope-conf before the subcommand is the app's preload option, which
# Celery adds to this group (and the site configuration it loads).
@click.group()
@click.option('--zodb-conf', type=click.Path(exists=True, dir_okay=False),
              help=_ZODB_CONF_HELP)
@click.pass_context
@handle_preload_options
def outbox(ctx, zope_conf=None, zodb_conf=None, **kwargs):
    """The z3c.celery outbox: figures, flush, retry dead letters, purge."""
    state = _CommandState(ctx.obj.app, zope_conf, zodb_conf)
    ctx.meta[_STATE_KEY] = state
    ctx.call_on_close(state.close)


@outbox.command(cls=CeleryCommand)
@click.option('--json', 'as_json', is_flag=True,
              help='Print the figures as JSON.')
@_site_options
@click.pass_context
def show(ctx, as_json=False, zope_conf=None, zodb_conf=None, **kwargs):
    """Show pending records, the oldest one's age and dead letters."""
    figures = store.figures(_database(ctx, zope_conf, zodb_conf))
    if as_json:
        click.echo(json.dumps(figures))
        return
    click.echo(f'pending:      {figures["pending"]}')
    click.echo(f'oldest age:   {_age(figures["oldest_age"])}')
    click.echo(f'dead letters: {figures["dead"]}')
    click.echo(f'lanes:        {figures["lanes"]}')


@outbox.command(cls=CeleryCommand)
@_site_options
@click.pass_context
def flush(ctx, zope_conf=None, zodb_conf=None, **kwargs):
    """Publish every pending record now (exit 1 if the broker is away)."""
    report = Relay(ctx.obj.app, _database(ctx, zope_conf, zodb_conf)).flush()
    click.echo(f'sent: {report.sent}  waiting: {report.waiting}  '
               f'failed: {report.failed}  dead letters: {report.dead}')
    if report.error is not None:
        click.echo(f'broker unavailable: {report.error}', err=True)
        ctx.exit(1)


@outbox.command(cls=CeleryCommand)
@click.argument('task_ids', nargs=-1)
@click.option('--no-flush', is_flag=True,
              help='Only put them back; the relay sends them later.')
@_site_options
@click.pass_context
def retry(ctx, task_ids, no_flush=False, zope_conf=None, zodb_conf=None,
          **kwargs):
    """Put dead letters (all, or TASK_IDS) back and publish them."""
    moved = store.retry_dead_letters(_database(ctx, zope_conf, zodb_conf),
                                     list(task_ids) or None)
    click.echo(f'{len(moved)} dead letter(s) back in the outbox')
    if moved and not no_flush:
        ctx.invoke(flush)


@outbox.command(name='purge', cls=CeleryCommand)
@click.option('--pending', is_flag=True,
              help='Also delete the pending records (those tasks are '
                   'then never sent).')
@click.option('-f', '--force', is_flag=True, help='Do not ask.')
@_site_options
@click.pass_context
def purge_command(ctx, pending=False, force=False, zope_conf=None,
                  zodb_conf=None, **kwargs):
    """Delete the dead letters (with --pending: all records)."""
    db = _database(ctx, zope_conf, zodb_conf)
    if not force:
        what = 'ALL dead letters and pending records' if pending \
            else 'all dead letters'
        click.confirm(f'Delete {what} of the outbox? There is no undo.',
                      abort=True)
    dead, removed = store.purge(db, pending)
    click.echo(f'deleted {dead} dead letter(s) and {removed} pending '
               f'record(s)')
