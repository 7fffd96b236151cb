"""One run of the benchmark: its settings, deadline and interpreters (``Bench``), the processes it
started, and the model file every method fetches (``Model``, written once per size and reused from
WORKDIR). The scenarios take a ``Bench``; nothing here touches the network."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbench.common import HTTP_PORT, MODEL_NAME, ORIGIN_IP, ORIGIN_NS, SCRIPT, blake3_file, fmt_size, log
from cbench.processes import Child, Processes
from cbench.role_torrent import make_torrent


@dataclass(frozen=True)
class Model:
    path: Path
    digest: str  # BLAKE3 hex of the whole file
    torrent: Path  # absent when libtorrent is not importable


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    deadline: float  # monotonic
    bench_py: str  # this interpreter: the roles run under it
    cached_py: str  # the daemons' interpreter
    procs: Processes

    @classmethod
    def create(cls, args: argparse.Namespace) -> Bench:
        return cls(
            args=args,
            work=args.workdir,
            deadline=time.monotonic() + args.timeout,
            bench_py=sys.executable,
            cached_py=os.path.abspath(args.cached_python),  # the daemons start in WORKDIR/cwd
            procs=Processes(args.workdir / "cwd"),
        )

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def method_budget(self, name: str) -> float:
        """How long one method may take before its unfinished nodes count as not done."""
        a = self.args
        if a.method_timeout:
            return min(a.method_timeout, self.remaining())
        bound = a.size * 8 / a.origin_rate
        want = bound * a.nodes * 1.5 + 60 if name == "direct" else bound * 4 + 60
        return min(want, self.remaining())

    def log_path(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    async def spawn_role(self, name: str, ns: str, role: str, *args: str, stdin: bool = False) -> Child:
        """A role of this script (``_origin``, ``_seed``, ...) in ``ns``, stderr to logs/NAME.log."""
        return await self.procs.spawn(
            name, ns, self.bench_py, str(SCRIPT), role, *args, stdin=stdin, log_to=self.log_path(name)
        )

    async def start_origin(self, model: Model, stats_file: Path) -> Child:
        stats_file.unlink(missing_ok=True)
        origin = await self.spawn_role(
            "origin",
            ORIGIN_NS,
            "_origin",
            str(model.path.parent),
            "--bind",
            ORIGIN_IP,
            "--port",
            str(HTTP_PORT),
            "--stats",
            str(stats_file),
        )
        await self.procs.expect(origin, "ready", 60)
        return origin


async def origin_stats(stats_file: Path) -> dict[str, Any]:
    await asyncio.sleep(0.5)  # the server writes its counters every 0.2 s
    return json.loads(stats_file.read_text())


def prepare_model(work: Path, size: int) -> Model:
    """WORKDIR/model/SIZE/model.bin (every MiB differs), its BLAKE3 and its .torrent; reused."""
    d = work / "model" / str(size)
    d.mkdir(parents=True, exist_ok=True)
    path, meta, torrent = d / MODEL_NAME, d / "blake3", d / "model.torrent"
    if not (path.exists() and path.stat().st_size == size and meta.exists() and torrent.exists()):
        log(f"writing a {fmt_size(size)} model file {path}")
        write_model(path, size)
        meta.write_text(blake3_file(path))
        torrent.unlink(missing_ok=True)
        make_torrent(path, torrent)
    return Model(path, meta.read_text().strip(), torrent)


def write_model(path: Path, size: int) -> None:
    block = hashlib.shake_256(b"cbench").digest(1 << 20)
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            n = min(len(block), left)
            f.write((i.to_bytes(8, "little") + block[8:])[:n])  # every MiB differs
            left -= n
            i += 1


def model_matches(path: Path, model: Model) -> bool:
    """The model's bytes are at ``path``: the file, ``path/model.bin``, or (an hf:// model of the
    shards scenario) its ``.safetensors`` files in name order, which are the model cut in order."""
    if path.is_file():
        return blake3_file(path) == model.digest
    if (path / MODEL_NAME).is_file():
        return blake3_file(path / MODEL_NAME) == model.digest
    parts = sorted(path.glob("*.safetensors"))
    if not parts:
        return False
    import blake3

    h = blake3.blake3()
    for part in parts:
        with open(part, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest() == model.digest


def prepare_shards(work: Path, model: Model, shards: int) -> tuple[Path, Path | None]:
    """The model cut into ``shards`` files (as the hub's ``bench/sharded`` serves them), in
    WORKDIR/model/SIZE/shards-N/bench-sharded/, and a multi-file .torrent of that directory
    (None without libtorrent); reused."""
    from cbench.role_hub import shard_bounds, shard_name
    from cbench.role_torrent import make_torrent

    top = model.path.parent / f"shards-{shards}"
    content = top / "bench-sharded"
    torrent = top / "sharded.torrent"
    size = model.path.stat().st_size
    if not (content / shard_name(shards - 1, shards)).exists():
        content.mkdir(parents=True, exist_ok=True)
        with open(model.path, "rb") as src:
            for k, (off, n) in enumerate(shard_bounds(size, shards)):
                src.seek(off)
                (content / shard_name(k, shards)).write_bytes(src.read(n))
        torrent.unlink(missing_ok=True)
    if not torrent.exists():
        make_torrent(content, torrent)
    return content, torrent if torrent.exists() else None
