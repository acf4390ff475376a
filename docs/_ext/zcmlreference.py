"""Sphinx extension: the reference of ZCML directives, from their schemas.

``.. zcml-directives:: package.name`` loads the package's ``meta.zcml``
(without executing it), asks zope.configuration which directives it
defined, and renders each with every attribute of its schema: name, type,
whether it is required, its default and the field's title and
description.  The page therefore cannot fall behind the schemas: a new
field shows up in the next build, and a description that is not valid
reStructuredText fails the (``-W``) build.
"""
import importlib

import zope.configuration.fields
import zope.schema
import zope.schema.interfaces
from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from zope.configuration import xmlconfig
from zope.configuration.docutils import makeDocStructures


def directive_schemas(package_name, namespace=None):
    """``{(namespace, name): schema}`` of the directives *package* defines.

    Only the directives defined by the package's own ``meta.zcml`` are
    returned, not those of the packages it includes.
    """
    package = importlib.import_module(package_name)
    context = xmlconfig.file('meta.zcml', package=package, execute=False)
    namespaces, _subdirs = makeDocStructures(context)
    found = {}
    for ns, entries in namespaces.items():
        if namespace is not None and ns != namespace:
            continue
        for name, (schema, handler, _info) in entries.items():
            if handler.__module__.startswith(package_name + '.'):
                found[(ns, name)] = schema
    return found


def attribute_name(field_name):
    """The XML attribute of a schema field (``class_`` -> ``class``)."""
    return field_name[:-1] if field_name.endswith('_') else field_name


def schema_fields(schema):
    """``(attribute, field)`` of *schema* in definition order."""
    fields = zope.schema.getFieldsInOrder(schema)
    return [(attribute_name(name), field) for name, field in fields]


def field_type(field):
    """A short description of the values *field* accepts (reST)."""
    if isinstance(field, zope.schema.Choice):
        values = field.vocabulary and [t.value for t in field.vocabulary]
        return 'one of ' + ', '.join(f'``{v}``' for v in values)
    if isinstance(field, zope.configuration.fields.GlobalObject):
        return 'dotted name of a Python object'
    if isinstance(field, zope.configuration.fields.Path):
        return 'file path (relative to the ZCML file)'
    if isinstance(field, zope.configuration.fields.Tokens):
        return 'space-separated words'
    if isinstance(field, zope.schema.Bool):
        return 'boolean (``true`` / ``false``)'
    if isinstance(field, zope.schema.Int):
        return 'whole number'
    if isinstance(field, zope.schema.Float):
        return 'number'
    if getattr(field, 'text_fallback', None) is not None:
        return ('Python literal, else text' if field.text_fallback
                else 'Python literal')
    if isinstance(field, (zope.schema.ASCIILine, zope.schema.TextLine,
                          zope.schema.Text)):
        return 'text'
    return type(field).__name__


def field_notes(field):
    """Required / default / bounds of *field*, as reST."""
    notes = []
    if field.required:
        notes.append('**required**')
    elif isinstance(field.default, bool):
        notes.append(f'default: ``{str(field.default).lower()}``')
    elif field.default is not None:
        notes.append(f'default: ``{field.default!r}``')
    minimum = getattr(field, 'min', None)
    if minimum is not None:
        notes.append(f'at least ``{minimum!r}``')
    return '; '.join(notes)


def target_id(directive_name, attribute):
    return nodes.make_id(f'{directive_name}-{attribute}')


class ZCMLDirectives(SphinxDirective):
    """Render the directives of a package from their schemas."""

    required_arguments = 1
    option_spec = {
        'namespace': directives.unchanged,
        'prefix': directives.unchanged,
    }

    def run(self):
        package = self.arguments[0]
        namespace = self.options.get('namespace')
        prefix = self.options.get('prefix', '')
        schemas = directive_schemas(package, namespace)
        if not schemas:
            raise self.error(f'{package} defines no ZCML directives'
                             + (f' in {namespace}' if namespace else ''))
        self.env.note_dependency(
            importlib.import_module(package).__file__)
        result = []
        for (ns, name), schema in sorted(schemas.items()):
            result.extend(self.directive_section(ns, name, schema, prefix))
        return result

    def parse(self, text):
        container = nodes.container()
        self.state.nested_parse(
            StringList(text.splitlines(), source=self.get_source_info()[0]),
            self.content_offset, container)
        return container.children

    def directive_section(self, namespace, name, schema, prefix):
        title = f'<{prefix}{name}>'
        section = nodes.section(ids=[nodes.make_id(f'directive-{name}')])
        section += nodes.title(title, '', nodes.literal(title, title))
        section += self.parse(
            f'Namespace ``{namespace}``; schema '
            f'``{schema.__module__}.{schema.__name__}``.')
        doc = next((i.__doc__ for i in schema.__iro__ if i.__doc__), '')
        if doc:
            section += self.parse(_dedent(doc))
        by_interface = {}
        for attribute, field in schema_fields(schema):
            by_interface.setdefault(field.interface, []).append(
                (attribute, field))
        for interface, fields in by_interface.items():
            if len(by_interface) > 1:
                section += self.parse(self.group_label(
                    interface, schema, len(fields)))
            section += self.table(name, fields)
        return [section]

    @staticmethod
    def group_label(interface, schema, count):
        if interface is not schema:
            return f'**Settings of z3c.celery** ({count})'
        # The generated part of <celery:config>: Celery's own settings.
        return (f'**Celery settings** ({count}): what each does is in '
                '`Celery\'s configuration reference <https://docs.celeryq'
                '.dev/en/stable/userguide/configuration.html>`__; '
                'the default shown is Celery\'s.')

    def table(self, directive_name, fields):
        table = nodes.table(classes=['zcml-attributes'])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (25, 25, 50):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self.row(['Attribute', 'Type', 'Description'])
        body = nodes.tbody()
        group += body
        for attribute, field in fields:
            row = nodes.row(ids=[target_id(directive_name, attribute)])
            row += self.cell(nodes.paragraph(
                '', '', nodes.literal(attribute, attribute)))
            notes = field_notes(field)
            row += self.cell(*self.parse(
                field_type(field) + (f'; {notes}' if notes else '')))
            text = str(field.title or '').strip()
            description = str(field.description or '').strip()
            if description:
                text = f'{text}: {description}' if text and not \
                    description.startswith('Celery setting') else description
            row += self.cell(*self.parse(text or ' '))
            body += row
        return table

    def row(self, texts):
        row = nodes.row()
        for text in texts:
            row += self.cell(nodes.paragraph(text, text))
        return row

    @staticmethod
    def cell(*children):
        entry = nodes.entry()
        entry.extend(children)
        return entry


def _dedent(doc):
    import inspect
    return inspect.cleandoc(doc)


def setup(app):
    app.add_directive('zcml-directives', ZCMLDirectives)
    return {'parallel_read_safe': True, 'parallel_write_safe': True,
            'version': '1'}
