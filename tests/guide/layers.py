"""zope.testrunner layers of the guide: site ZCML, a database, a mode."""
import plone.testing
import plone.testing.zca
import plone.testing.zodb
import zope.principalregistry.principalregistry

import z3c.celery.layer
import z3c.celery.testing

import tests.guide


class SiteZCML(plone.testing.zca.ZCMLSandbox):
    """The site ZCML; the principals it defines go with it."""

    def tearDown(self):
        super().tearDown()
        # The principal registry is module state, outside the stacked
        # component registry the sandbox pops.
        zope.principalregistry.principalregistry.principalRegistry._clear()


ZCML_LAYER = SiteZCML(
    name='GuideZCML', filename='site.zcml', package=tests.guide)


class SiteDatabase(plone.testing.Layer):
    """A database with a root folder (the site tasks run in), fresh for
    each test: a DemoStorage stacked on plone.testing's empty ZODB, as the
    ``zodbDB`` resource."""

    defaultBases = (plone.testing.zodb.EMPTY_ZODB,)

    def testSetUp(self):
        self['zodbDB'] = plone.testing.zodb.stackDemoStorage(
            self.get('zodbDB'), name='GuideSite')
        z3c.celery.testing.ensure_root_folder(self['zodbDB'])

    def testTearDown(self):
        self['zodbDB'].close()
        del self['zodbDB']


SITE_DATABASE = SiteDatabase()

# The mode layers take the database from the ``zodbDB`` resource.
INLINE_LAYER = z3c.celery.layer.InlineLayer(
    bases=(SITE_DATABASE, ZCML_LAYER), name='GuideInlineLayer')
EAGER_LAYER = z3c.celery.layer.EagerLayer(
    bases=(SITE_DATABASE, ZCML_LAYER), name='GuideEagerLayer')
