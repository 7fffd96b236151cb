"""The ``_direct`` role: on ``go``, one ``curl -o`` from the origin, then BLAKE3 of the file
against the expected digest; reports ``done`` with its timings. One node, one download."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from cbench.channel import Control, emit
from cbench.common import blake3_file


def role_direct(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_direct")
    p.add_argument("--url", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--expect", required=True, help="BLAKE3 hex of the model")
    p.add_argument("--max-seconds", type=float, default=1800)
    a = p.parse_args(argv)
    control = Control()
    emit({"ready": True})
    deadline = time.monotonic() + a.max_seconds
    if not control.wait_go(deadline):
        return
    t_go = time.monotonic()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["curl", "-sS", "-f", "--max-time", str(int(a.max_seconds)), "-o", str(a.out), a.url],
        capture_output=True,
        text=True,
    )
    t_curl = time.monotonic()
    ok = r.returncode == 0 and blake3_file(a.out) == a.expect
    emit(
        {
            "done": True,
            "ok": ok,
            "t_go": t_go,
            "t_curl": t_curl,
            "t_done": time.monotonic(),
            "err": r.stderr.strip()[:200],
        }
    )
