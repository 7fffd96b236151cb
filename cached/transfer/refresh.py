"""Keeps branch-tracking ``hf://`` models current: every ``origins.hf.refresh_interval_s``, each
stored hf model whose revision is a branch or tag (not a 40-hex commit) is submitted again as a
low-priority refresh, which re-resolves it and fetches only the files that changed.

Jobs sit above this rung, so the job queue is handed in as a ``Submitter``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Protocol

from cached.periodic import every
from cached.store import Store
from cached.types import ModelRef, Priority, RefKind

COMMIT = re.compile(r"[0-9a-f]{40}")


class Submitter(Protocol):
    def submit(self, ref: ModelRef, priority: Priority = ..., *, refresh: bool = ...) -> Any: ...


class HfRefresh:
    def __init__(self, store: Store, jobs: Submitter, *, interval_s: float) -> None:
        self._store = store
        self._jobs = jobs
        self._interval_s = interval_s

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self._interval_s, stopping, self.once)

    def once(self) -> None:
        for rec in self._store.models():
            ref = ModelRef.parse(rec.ref)
            if ref.kind is RefKind.HF and not COMMIT.fullmatch(ref.revision):
                self._jobs.submit(ref, Priority.LOW, refresh=True)
