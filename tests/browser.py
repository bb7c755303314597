"""Headless Chromium for the tests that look at rendered pages (the report, the docs site)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium_or_skip() -> str:
    """The chromium binary; installed with apt-get when missing (skipped only if impossible)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(
            "chromium is not installed and cannot be installed here (needs root and apt-get): "
            "apt-get install chromium"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(
        "apt-get update -q && apt-get install -y -q chromium",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
    )
    exe = shutil.which("chromium")
    if not exe:
        pytest.skip(f"installing chromium with apt-get failed: {proc.stderr[-400:]}")
    return exe


def run_browser(
    exe: str, profile: Path, *args: str, allow_host: str | None = None
) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile; console messages go to its stderr.

    No host name resolves except ``allow_host`` (a local test server's address).
    """
    rules = "MAP * ~NOTFOUND" + (f", EXCLUDE {allow_host}" if allow_host else "")
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",  # root in CI containers
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            # Nothing resolves: a request that left the machine could not succeed anyway.
            f"--host-resolver-rules={rules}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
