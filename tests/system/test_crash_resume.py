"""SIGKILL of the daemon: what is on disk stays correct, and a restart resumes instead of restarting.

The daemon is a ``python -m cached`` subprocess; the HTTP origin runs in the test's event loop, so
every ``cachectl`` call goes through ``asyncio.create_subprocess_exec`` and every blocking step
(starting, killing, hashing, scanning the cache) through ``asyncio.to_thread``.

"Never partial" is checked from the outside, by the layout in DESIGN.md: a file under
``blobs/`` (other than its ``.pieces`` sidecar) is a complete, read-only blob, and a view under
``models/`` exists only for a ready model and holds whole files.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.support.node import REPO, DaemonProcess
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

pytestmark = pytest.mark.system

MiB = 1 << 20
SIZE = 48 * MiB
# Per request; the daemon keeps about 8 ranged GETs in flight, so the whole file takes ~6 s.
RATE_BPS = 1 * MiB


def new_node(workdir: Path, *extra: str) -> DaemonProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return DaemonProcess(workdir, *extra)


async def cachectl(d: DaemonProcess, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cached.cli", "--api", d.api, *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


async def status(d: DaemonProcess, ref: str) -> dict:
    r = await cachectl(d, "status", ref, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def escaped(ref: str) -> str:
    """The name of a ref's view directory (``ModelRef.escaped`` for refs this short)."""
    return quote(ref, safe="")


def published_files(cache: Path) -> tuple[list[Path], list[Path]]:
    """(blob files under blobs/ without their sidecars, every file under models/)."""
    blobs = (
        [p for p in (cache / "blobs").rglob("*") if p.is_file() and not p.name.endswith(".pieces")]
        if (cache / "blobs").exists()
        else []
    )
    views = [p for p in (cache / "models").rglob("*") if p.is_file()] if (cache / "models").exists() else []
    return blobs, views


def assert_nothing_partial_published(cache: Path, full_sizes: set[int]) -> tuple[list[Path], list[Path]]:
    blobs, views = published_files(cache)
    for p in blobs + views:
        st = p.stat()
        assert st.st_size in full_sizes, f"{p} is published with {st.st_size} bytes: a partial file"
        assert stat.S_IMODE(st.st_mode) == 0o440, f"{p} is published writable ({oct(st.st_mode)})"
    return blobs, views


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


async def test_sigkill_mid_download_resumes_with_verified_pieces(tmp_path: Path) -> None:
    src = await asyncio.to_thread(write_random_file, tmp_path / "origin" / "big.gguf", SIZE, 7)
    want = await asyncio.to_thread(sha256, src)
    node = new_node(tmp_path / "node", "--piece-size", "1M")
    cache = node.cache_dir
    async with Origin(tmp_path / "origin") as origin:
        ref = origin.file_url("big.gguf")
        origin.faults.rate_bps = RATE_BPS
        waiter: asyncio.Task[subprocess.CompletedProcess[str]] | None = None
        try:
            await asyncio.to_thread(node.start)
            r = await cachectl(node, "prefetch", ref)
            assert r.returncode == 0, r.stderr
            # A launcher waiting on the same job when the daemon dies must hear about it.
            waiter = asyncio.create_task(cachectl(node, "prefetch", ref, "--wait"), name="cachectl-wait")

            async def far_enough() -> dict | None:
                # Checked on every poll: during the download nothing under blobs/ or models/.
                blobs, views = await asyncio.to_thread(assert_nothing_partial_published, cache, {SIZE})
                assert not blobs and not views, f"published before the download finished: {blobs + views}"
                m = await status(node, ref)
                assert m["state"] in ("queued", "fetching"), m
                return m if m["bytes_done"] >= SIZE // 4 else None

            model = await wait_until(far_enough, timeout_s=60, interval_s=0.1, what="a quarter of the file fetched")
            assert model["bytes_done"] <= SIZE * 3 // 4, f"the download ran past 75% before the kill: {model}"
            assert model["bytes_total"] == SIZE

            assert await asyncio.to_thread(node.kill, signal.SIGKILL) == -signal.SIGKILL
            sent_before_kill = origin.counters.bytes_sent
            w = await asyncio.wait_for(waiter, 30)
            assert w.returncode == 3, f"prefetch --wait across a daemon crash exited {w.returncode}: {w.stderr}"

            # On disk right after the kill: nothing published, no view, no ref.
            blobs, views = await asyncio.to_thread(assert_nothing_partial_published, cache, {SIZE})
            assert not blobs and not views, blobs + views
            assert not (cache / "models" / escaped(ref)).exists()

            origin.faults.rate_bps = None  # the rest may go at full speed
            await asyncio.to_thread(node.start)

            # After the restart and before any new prefetch: the model is not ready, has no view.
            p = await cachectl(node, "path", ref)
            assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
            assert p.stdout == ""
            assert (await status(node, ref))["state"] == "absent"
            assert not (cache / "models" / escaped(ref)).exists()
            blobs, views = await asyncio.to_thread(assert_nothing_partial_published, cache, {SIZE})
            assert not blobs and not views, blobs + views

            r = await cachectl(node, "prefetch", ref, "--wait")
            assert r.returncode == 0, r.stderr
            view = Path(r.stdout.strip())
            assert view == cache / "models" / escaped(ref)
        finally:
            if waiter is not None and not waiter.done():
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            await asyncio.to_thread(node.stop)

        total_sent = origin.counters.bytes_sent

    assert await asyncio.to_thread(sha256, view / "big.gguf") == want
    # Resumed: the verified pieces were kept; only the rest (and the pieces in flight at the
    # kill) came from the origin again.
    assert total_sent < 1.6 * SIZE, (
        f"origin sent {total_sent / SIZE:.2f}x the file ({sent_before_kill} before the kill)"
    )
    assert total_sent - sent_before_kill < SIZE

    blobs, views = await asyncio.to_thread(assert_nothing_partial_published, cache, {SIZE})
    assert len(blobs) == 1 and views == [view / "big.gguf"]
    assert os.path.samefile(blobs[0], views[0]), "the view is a hardlink to the blob"
    assert not any((cache / "partial").iterdir()), "the finished download left partial files"


async def test_sigkill_after_ready_keeps_the_model(tmp_path: Path) -> None:
    src = await asyncio.to_thread(write_random_file, tmp_path / "models" / "m" / "weights.bin", 3 * MiB + 5, 3)
    ref = f"file://{src.parent}"
    node = new_node(tmp_path / "node", "--piece-size", "256K")
    try:
        await asyncio.to_thread(node.start)
        r = await cachectl(node, "prefetch", ref, "--wait")
        assert r.returncode == 0, r.stderr
        view = Path(r.stdout.strip())
        assert await asyncio.to_thread(node.kill, signal.SIGKILL) == -signal.SIGKILL

        await asyncio.to_thread(node.start)
        p = await cachectl(node, "path", ref)
        assert p.returncode == 0, p.stderr
        assert Path(p.stdout.strip()) == view
        assert (view / "weights.bin").read_bytes() == src.read_bytes()
        v = await cachectl(node, "verify", ref, "--json")
        assert v.returncode == 0, v.stderr
        assert json.loads(v.stdout)["bad_pieces"] == 0
    finally:
        await asyncio.to_thread(node.stop)


async def test_restart_sweeps_debris_of_an_interrupted_publish(tmp_path: Path) -> None:
    """A kill while a view was being built leaves a staging dir in tmp/ (hardlinks to a 0440 blob)
    and possibly a view with no ref yet; the next start must sweep both and still serve the rest."""
    src = await asyncio.to_thread(write_random_file, tmp_path / "models" / "kept" / "weights.bin", 1 * MiB + 3, 4)
    ref = f"file://{src.parent}"
    node = new_node(tmp_path / "node")
    cache = node.cache_dir
    try:
        await asyncio.to_thread(node.start)
        r = await cachectl(node, "prefetch", ref, "--wait")
        assert r.returncode == 0, r.stderr
        view = Path(r.stdout.strip())
        assert await asyncio.to_thread(node.kill, signal.SIGKILL) == -signal.SIGKILL

        blob = next(p for p in (cache / "blobs").rglob("*") if p.is_file() and not p.name.endswith(".pieces"))
        staging = cache / "tmp" / f"view-{secrets.token_hex(6)}"
        (staging / "sub").mkdir(parents=True)
        os.link(blob, staging / "sub" / "weights.bin")
        orphan_ref = f"file://{tmp_path}/models/never-committed"
        orphan = cache / "models" / escaped(orphan_ref)
        orphan.mkdir(parents=True)
        os.link(blob, orphan / "weights.bin")

        await asyncio.to_thread(node.start)
        assert not staging.exists(), "tmp/ debris survived the restart"
        assert not orphan.exists(), "a view without a ref survived the restart"
        p = await cachectl(node, "path", ref)
        assert p.returncode == 0, p.stderr
        assert Path(p.stdout.strip()) == view
        assert (view / "weights.bin").read_bytes() == src.read_bytes()
        assert (await cachectl(node, "path", orphan_ref)).returncode == 1
    finally:
        await asyncio.to_thread(node.stop)
