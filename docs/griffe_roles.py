"""A griffe extension for the API reference: Sphinx roles in flowdiff's docstrings as code.

The docstrings name other objects the Sphinx way (``:class:`EDMGrid```, ``:func:`parse_grid```,
``:mod:`.base```), which Markdown would print as they are; this turns each into a code span
(`EDMGrid`). Loaded by mkdocs.yml (mkdocstrings' ``extensions`` option) at build time only.
"""

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`~?([^`]+)`")


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
