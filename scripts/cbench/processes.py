"""Child processes in the namespaces, seen from the driver: start one with ``ip netns exec`` in its
own session, read its JSON lines, wait for a given one, say ``go``, stop it (quit, SIGTERM, then
SIGKILL to its process group), and kill whatever is left when the run ends. It does not know
what the children are (roles, daemons, curl); ``bench`` and ``daemons`` build their commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    lines: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    pump: asyncio.Task[None] | None = None


class Processes:
    """Every child started for this run; all start in ``cwd``."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.children: list[Child] = []

    async def spawn(self, name: str, ns: str, *cmd: str, log_to: Path | None = None, stdin: bool = False) -> Child:
        err = open(log_to, "ab") if log_to else asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            ns,
            *cmd,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            start_new_session=True,
            cwd=str(self.cwd),  # empty: `python -m cached` imports ./cached before PYTHONPATH
        )
        if log_to:
            err.close()
        child = Child(name, proc)
        self.children.append(child)
        child.pump = asyncio.create_task(_pump(child))
        return child

    async def expect(self, child: Child, key: str, timeout: float) -> dict[str, Any]:
        """The child's next JSON line that has ``key`` (others are dropped), within ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{child.name}: no '{key}' within {timeout:.0f}s")
            try:
                msg = await asyncio.wait_for(child.lines.get(), min(left, 1.0))
            except TimeoutError:
                if child.proc.returncode is not None:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before '{key}'") from None
                continue
            if key in msg:
                return msg

    @staticmethod
    async def go(children: list[Child]) -> None:
        """The common start: ``go`` to every child at once."""
        for k in children:
            assert k.proc.stdin is not None
            k.proc.stdin.write(b"go\n")
        await asyncio.gather(*(k.proc.stdin.drain() for k in children if k.proc.stdin))

    async def stop(self, children: list[Child], grace_s: float = 5.0) -> None:
        for c in children:
            if c.proc.returncode is None:
                _ask_to_stop(c)
        for c in children:
            try:
                await asyncio.wait_for(c.proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(c.proc.wait(), 2.0)
            if c in self.children:
                self.children.remove(c)

    def kill_all_sync(self) -> None:
        for c in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)


async def _pump(child: Child) -> None:
    assert child.proc.stdout is not None
    async for raw in child.proc.stdout:
        with contextlib.suppress(ValueError):
            child.lines.put_nowait(json.loads(raw))


def _ask_to_stop(c: Child) -> None:
    """``quit`` on stdin (roles that read it) and SIGTERM (everyone)."""
    if c.proc.stdin is not None and not c.proc.stdin.is_closing():
        with contextlib.suppress(Exception):
            c.proc.stdin.write(b"quit\n")
            c.proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        c.proc.send_signal(signal.SIGTERM)
