"""The ``_hub`` role (``--scenario shards``): the project's Hugging Face Hub double
(``tests/support/hub.py``, the one the test suite and the demo use) in the origin namespace,
serving two repos built from the same bytes: ``bench/one`` (the model as one ``.safetensors``
file) and ``bench/sharded`` (the model cut into N shards, in order). It counts the body bytes and
GETs it sent into a stats file (every 0.2 s) in the ``_origin`` role's format, so the driver
reads both the same way. The files are held in memory (2x the model size)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

from cbench.channel import emit

ONE_REPO = "bench/one"
SHARDED_REPO = "bench/sharded"


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def shard_bounds(size: int, n: int) -> list[tuple[int, int]]:
    """(offset, length) of each of ``n`` shards of ``size`` bytes: equal, the last takes the rest."""
    step = size // n
    return [(k * step, step if k < n - 1 else size - k * step) for k in range(n)]


async def serve(a: argparse.Namespace) -> None:
    from tests.support import hub as hub_module

    hub_module.HOST = a.bind  # the double binds its module's HOST (127.0.0.1 in the tests)
    data = a.model.read_bytes()
    hub = hub_module.Hub()
    hub.add_repo(ONE_REPO, {"model.safetensors": data})
    hub.add_repo(
        SHARDED_REPO,
        {shard_name(k, a.shards): data[off : off + n] for k, (off, n) in enumerate(shard_bounds(len(data), a.shards))},
    )
    del data
    await hub.start(a.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit({"ready": True, "url": hub.url})

    def dump() -> None:
        c = hub.counters
        tmp = a.stats.with_suffix(".tmp")
        stats = {"t": time.monotonic(), "bytes": c.file_bytes, "gets": c.count("GET"), "heads": c.count("HEAD")}
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, a.stats)

    while not stop.is_set():  # ends on SIGTERM; the driver bounds its life
        dump()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    dump()
    await hub.stop()


def role_hub(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="_hub")
    p.add_argument("model", type=Path)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--stats", type=Path, required=True)
    asyncio.run(serve(p.parse_args(argv)))
