"""Griffe extension for the API reference: the docstrings' reST habits, rendered as Markdown.

The docstrings are numpy style, written with two reST habits that Markdown does not read:
Sphinx roles (``:func:`name```, ``:class:`~pkg.Name```), which would show as typed, and
doctest lines (``>>>``) outside an Examples section, which Markdown takes for nested block
quotes. Before each docstring is parsed, a role becomes inline code (the last component when
the target starts with ``~``, as Sphinx shows it) and a run of doctest lines, with the output
lines after it, becomes a fenced ``pycon`` block. The source docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    target = target.strip()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def fence_doctests(text: str) -> str:
    """Wrap each run of ``>>>`` lines (and its output, up to a blank line) in a pycon fence."""
    out: list[str] = []
    indent: str | None = None  # the open doctest block's indentation
    in_fence = False
    for line in text.split("\n"):
        stripped = line.lstrip()
        if indent is None and stripped.startswith("```"):
            in_fence = not in_fence
        elif indent is None and not in_fence and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
        elif indent is not None and not stripped:
            out.append(f"{indent}```")
            indent = None
        out.append(line)
    if indent is not None:
        out.append(f"{indent}```")
    return "\n".join(out)


class ReSTHabits(Extension):
    """Rewrite Sphinx roles and bare doctest lines of every docstring as Markdown."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(ROLE.sub(_role, obj.docstring.value))
