"""MkDocs hook: the API page of the package root, generated from ``healthfm.__all__``.

The root re-exports names defined elsewhere, some of them loaded lazily through a module
``__getattr__`` (``load``, ``save_pretrained``), which a static reader of the source cannot
follow. This hook imports the package at build time, finds where each public name is
defined (``obj.__module__``) and writes, in place of the marker ``<!-- api-root -->``, one
mkdocstrings directive per name, or a cross-reference where the defining module has its
own API page (``::: module`` in ``docs/api/``), so that no object is documented twice. The
page therefore follows the code when a name moves to another module.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

MARKER = "<!-- api-root -->"


def _documented_modules(api_dir: Path) -> set[str]:
    """The modules that have a page of their own: ``::: module`` directives under docs/api/."""
    found: set[str] = set()
    for page in api_dir.glob("*.md"):
        found.update(re.findall(r"^:::\s+(\S+)\s*$", page.read_text(encoding="utf-8"), re.M))
    return found


def _directives(api_dir: Path) -> list[str]:
    """The package docstring, its names rendered here, then those documented elsewhere."""
    package = importlib.import_module("healthfm")
    documented = _documented_modules(api_dir)
    lines = ["::: healthfm", "    options:", "      members: false", ""]
    elsewhere = []
    for name in sorted(package.__all__, key=str.lower):
        obj = getattr(package, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue  # __version__ and other plain values have no docstring to render
        target = f"{obj.__module__}.{obj.__qualname__}"
        if obj.__module__ in documented:
            elsewhere.append(f"- [`healthfm.{name}`][{target}]")
            continue
        lines += [f"::: {target}", "    options:", "      show_root_heading: true"]
        lines += [f'      heading: "healthfm.{name}"', ""]
    if elsewhere:
        lines += ["## Also exported here", "", "Documented on their module's page:", ""]
        lines += [*elsewhere, ""]
    return lines


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker on the root's API page with its generated directives."""
    if MARKER not in markdown:
        return markdown
    api_dir = Path(config["docs_dir"]) / "api"
    return markdown.replace(MARKER, "\n".join(_directives(api_dir)))
