"""MkDocs hook: the API page of the package root, generated from ``healthfm.__all__``.

The root re-exports names defined elsewhere, some of them loaded lazily through a module
``__getattr__`` (``load``, ``save_pretrained``), which a static reader of the source cannot
follow. This hook imports the package at build time, finds where each public name is
defined (``obj.__module__``) and writes one mkdocstrings directive per name in place of the
marker ``<!-- api-root -->``; the page therefore follows the code when a name moves to
another module.
"""

from __future__ import annotations

import importlib
import inspect

MARKER = "<!-- api-root -->"


def _directives() -> list[str]:
    """The package docstring, then one ``::: module.name`` block per public function or class."""
    package = importlib.import_module("healthfm")
    lines = ["::: healthfm", "    options:", "      members: false", "      show_root_heading: false", ""]
    for name in sorted(package.__all__, key=str.lower):
        obj = getattr(package, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue  # __version__ and other plain values have no docstring to render
        lines += [f"::: {obj.__module__}.{obj.__qualname__}", "    options:"]
        lines += ["      show_root_heading: true", f"      heading: \"healthfm.{name}\"", ""]
    return lines


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker on the root's API page with its generated directives."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, "\n".join(_directives()))
