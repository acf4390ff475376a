"""The files of a test site: site ZCML and zope.conf, from templates.

One site template (`SITE_ZCML_TEMPLATE`) with the principals as a
parameter, and the zope.conf templates of 1.x (FileStorage) and for a
ZEO client.
"""
import html


#: A zope.conf for a test worker (1.x name and placeholders):
#: ``ftesting_path`` is the site ZCML, ``zodb_path`` a FileStorage file,
#: ``product_config`` extra text (e.g. ``<product-config>`` sections).
ZOPE_CONF_TEMPLATE = """\
site-definition {ftesting_path}

<zodb>
  <filestorage>
    path {zodb_path}
  </filestorage>
</zodb>

{product_config}

# zope.app.appsetup's schema requires an eventlog section.
<eventlog>
</eventlog>
"""

#: The same with a ZEO client: worker and tests share the database.
#: ``zeo_address`` is ``host:port``.
ZEO_ZOPE_CONF_TEMPLATE = """\
%import ZEO

site-definition {ftesting_path}

<zodb>
  <clientstorage>
    server {zeo_address}
    # How long a call waits for a (re)connection before it fails.
    wait-timeout {wait_timeout}
  </clientstorage>
</zodb>

{product_config}

<eventlog>
</eventlog>
"""

#: The same with RelStorage on PostgreSQL (needs the ``relstorage``
#: extra): ``dsn`` is a libpq connection string.
RELSTORAGE_ZOPE_CONF_TEMPLATE = """\
%import relstorage

site-definition {ftesting_path}

<zodb>
  <relstorage>
    # Lock waits fail fast, so that lock errors reach the conflict policy.
    commit-lock-timeout {wait_timeout}
    <postgresql>
      dsn {dsn}
    </postgresql>
  </relstorage>
</zodb>

{product_config}

<eventlog>
</eventlog>
"""

#: The principals of the test site: ``(id, title, login, password)``.
PRINCIPALS = (
    ('zope.user', 'User', 'user', 'u'),
    ('zope.editor', 'Editor', 'editor', 'e'),
)

#: A site ZCML for tests: z3c.celery, the principal registry as the
#: ``IAuthentication`` utility with ``{principals}``, and ``{body}`` (task
#: registrations, ``<celery:config>``, includes of your packages).
SITE_ZCML_TEMPLATE = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:celery="http://namespaces.zope.org/celery">
  <include package="zope.component" file="meta.zcml" />
  <include package="zope.security" file="meta.zcml" />
  <include package="zope.principalregistry" file="meta.zcml" />
  <include package="z3c.celery" />
{principals}
  <utility
      component="zope.principalregistry.principalregistry.principalRegistry"
      provides="zope.authentication.interfaces.IAuthentication" />
  {body}
</configure>
"""


def site_zcml(body='', principals=PRINCIPALS):
    """The text of `SITE_ZCML_TEMPLATE` with *body* and *principals*.

    *principals* are ``(id, title, login, password)`` tuples.
    """
    esc = html.escape
    lines = [f'  <principal id="{esc(pid)}" title="{esc(title)}" '
             f'login="{esc(login)}" password="{esc(password)}" />'
             for pid, title, login, password in principals]
    return SITE_ZCML_TEMPLATE.replace('{principals}', '\n'.join(lines)) \
        .replace('{body}', body)


def write_zope_conf(path, site_zcml_path, zodb_path=None, zeo_address=None,
                    product_config='', wait_timeout=30, relstorage_dsn=None):
    """Write a zope.conf for a worker to *path* and return *path*.

    Give one of *zodb_path* (a FileStorage file; only one process may open
    it), *zeo_address* (``(host, port)`` or ``'host:port'``) or
    *relstorage_dsn* (RelStorage on PostgreSQL).  *wait_timeout* is how
    long ZEO waits for a connection, or RelStorage for its commit lock.
    """
    if [zodb_path, zeo_address, relstorage_dsn].count(None) != 2:
        raise ValueError('write_zope_conf: give either zodb_path or '
                         'zeo_address or relstorage_dsn')
    common = dict(ftesting_path=site_zcml_path, product_config=product_config,
                  wait_timeout=wait_timeout)
    if zeo_address is not None:
        if not isinstance(zeo_address, str):
            zeo_address = '{}:{}'.format(*zeo_address)
        text = ZEO_ZOPE_CONF_TEMPLATE.format(zeo_address=zeo_address,
                                             **common)
    elif relstorage_dsn is not None:
        text = RELSTORAGE_ZOPE_CONF_TEMPLATE.format(dsn=relstorage_dsn,
                                                    **common)
    else:
        text = ZOPE_CONF_TEMPLATE.format(zodb_path=zodb_path, **common)
    with open(path, 'w') as f:
        f.write(text)
    return path
