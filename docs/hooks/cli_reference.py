"""MkDocs hook: the CLI reference rendered from ``healthfm --help`` at build time.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with one
section per sub-command (and per modality of ``tokenize`` / ``pretrain``), each the exact
``--help`` text the installed CLI prints, so the page cannot go stale. The help is produced in
this process through ``healthfm.cli.main`` (the console-script entry point), at a fixed
width, so the page is the same on every machine.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

MARKER = "<!-- cli-reference -->"
WIDTH = "100"


def _help(path: list[str]) -> str:
    """What ``healthfm PATH --help`` prints."""
    from healthfm.cli import main

    out = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to the terminal width
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*path, "--help"])
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    text = out.getvalue()
    if not text.startswith("usage:"):
        raise RuntimeError(f"`healthfm {' '.join(path)} --help` printed no usage: {text[:200]!r}")
    return text


def _subcommands(text: str) -> list[str]:
    """The sub-command names an argparse help lists under its positional arguments."""
    section = text.split("positional arguments:", 1)[-1].split("\n\n", 1)[0]
    # Sub-commands sit four spaces in (their metavar, e.g. COMMAND, two spaces in).
    return re.findall(r"^    ([a-z][a-z0-9-]*)(?:\s|$)", section, re.M)


def _render(path: list[str], level: int) -> list[str]:
    text = _help(path)
    title = " ".join(["healthfm", *path])
    lines = [f"{'#' * level} `{title}`", "", "```text", text.rstrip(), "```", ""]
    for name in _subcommands(text):
        lines += _render([*path, name], min(level + 1, 6))
    return lines


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker on the CLI page with the rendered help of every sub-command."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, "\n".join(_render([], 3)))
