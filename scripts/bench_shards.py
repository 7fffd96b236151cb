"""Many files: one file vs 16 shards of the same total, four loopback daemons asking at once.

Starts the Hugging Face hub double of the test suite on 127.0.0.1 (no rate cap) with a 64 MiB
model, as one file or as 16 shards of 4 MiB, and four in-process daemons (mDNS off, seeded from
the first) that prefetch it at once; prints the time until all four hold it and the hub's bytes
over the model's. Rounds alternate the two shapes. Loopback only, bounded (``--rounds``), every
cache directory temporary. Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_shards.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

from tests.support.cluster import TOKEN, cluster, prefetch
from tests.support.hub import Hub, random_bytes

MIB = 1 << 20
TOTAL = 64 * MIB
SHARDS = 16


async def run(kind: str, seed: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        tmp_path = Path(tmp)
        token = tmp_path / "token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        if kind == "one":
            files = {"model.safetensors": random_bytes(TOTAL, seed=seed)}
        else:
            files = {
                f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors": random_bytes(TOTAL // SHARDS, seed=seed * 100 + i)
                for i in range(SHARDS)
            }
        async with contextlib.AsyncExitStack() as stack:
            hub = await stack.enter_async_context(Hub())
            hub.add_repo("acme/m", files)
            flags = {"origins.hf.endpoint": hub.url, "peer.suspect_after_s": 3.0, "peer.dead_after_s": 6.0}
            nodes = await cluster(stack, tmp_path, token, "abcd", piece="4M", **flags)
            t0 = time.monotonic()
            await asyncio.gather(*(prefetch(d, "hf://acme/m@main") for d in nodes.values()))
            return time.monotonic() - t0, hub.counters.file_bytes / sum(len(b) for b in files.values())


async def main(rounds: int) -> None:
    for r in range(rounds):
        for kind in ("one", "shards"):
            t, ratio = await run(kind, r + 1)
            print(f"{kind:6s} round {r}: {t:.2f} s, hub bytes {ratio:.3f}x", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    asyncio.run(main(p.parse_args().rounds))
