"""Which cached code the daemons run, and how the report names it: this checkout (``git_info``),
a ``git archive`` copy of HEAD's ``cached/`` (``export_head``), or a directory given with
``--cached-src``. Read-only git commands only."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cbench.common import REPO


def git_info() -> str:
    """Which code the daemons ran (read-only git commands)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "cached"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + (" (cached/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_head(workdir: Path) -> tuple[str, str]:
    """A copy of the committed cached/ package at HEAD (read-only git commands), for PYTHONPATH."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    dest = workdir / f"src-{sha[:12]}"
    if not (dest / "cached" / "__init__.py").exists():
        tmp = workdir / f"src-{sha[:12]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "HEAD", "cached"], capture_output=True, timeout=60, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, timeout=60, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return str(dest), f"{sha[:7]} (HEAD, committed code exported to {dest})"


def daemon_code(scenario: str, cached_src: str, workdir: Path, git: str) -> tuple[str, str]:
    """(PYTHONPATH for the daemons, the report's name for their code); ValueError when unusable.
    Only the failover scenario honours --cached-src."""
    if scenario == "failover" and cached_src == "head":
        try:
            return export_head(workdir)
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            raise ValueError(f"cannot export HEAD's cached/: {e}") from None
    if scenario == "failover" and cached_src != "tree":
        src = Path(cached_src).absolute()
        if not (src / "cached" / "__init__.py").is_file():
            raise ValueError(f"--cached-src {cached_src}: no cached/ package there")
        return str(src), f"cached/ from {src} (not this checkout; HEAD is {git})"
    return "", git
