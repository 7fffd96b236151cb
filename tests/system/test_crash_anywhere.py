"""SIGKILL at random moments, again and again: the store is never left pointing at half a model.

``test_crash_resume.py`` kills once, at a chosen moment. Here a seeded ``random.Random`` picks
every kill delay in ``[0, download time)`` after a prefetch is submitted, so the kills land
anywhere: while the daemon resolves the ref, creates the partial, writes pieces, appends piece
records, finalizes the blob, builds the view, writes the ref, or after the model is ready. Several
files are downloaded this way, one after another (the next starts once the current one turned out
ready after a restart), with ``KILLS`` kills in total. The seed makes the sequence of delays
reproducible; the moments the kills hit still depend on the machine, which is the point.

After every kill, and again after every restart, the cache is audited from the outside:
- every file under ``refs/`` names a manifest whose blobs all exist in ``blobs/`` with their
  ``.pieces`` sidecar, and every piece of them re-hashes to the sidecar's digest (and the digests to
  the blob id);
- every blob under ``blobs/`` verifies the same way and is read-only;
- every file under ``models/`` is a hardlink to a verified blob (nothing partial is ever visible);
- every piece recorded in a ``partial/*.pieces`` log re-hashes to its record (a SIGKILL does not
  lose the page cache, so a recorded piece whose bytes do not match would mean the record was
  written before the bytes).
And each restarted download asks the origin for none of the pieces recorded before the kill.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cached.api.client import ApiClient, ApiError
from cached.errors import DaemonUnreachable
from cached.store.partial import read_piece_log
from cached.types import BlobId, Manifest, ModelRef, hash_piece, piece_count, piece_span
from tests.support.node import REPO, DaemonProcess
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

pytestmark = pytest.mark.system

SEED = 20240611
KILLS = 24
MiB = 1 << 20
SIZE = 6 * MiB
PIECE = 256 * 1024
CONNECTIONS = 4  # origins.http.connections: origin requests in flight for one blob, at most
RATE_BPS = 1280 * 1024  # per origin response body
# CONNECTIONS bodies at RATE_BPS each: an uninterrupted download takes about this long.
DOWNLOAD_S = SIZE / (CONNECTIONS * RATE_BPS)


@dataclass
class FileRun:
    name: str
    sha256: str
    kills_mid_download: int = 0  # kills after which the model was not ready
    kill_after_ready: bool = False
    origin_bytes: int = 0
    pieces_kept: list[int] = field(default_factory=list)  # verified pieces on disk at each kill


# --- the audit ---------------------------------------------------------------------------------


def verify_blob(path: Path) -> None:
    """A published blob: 0440, sidecar present, digests name the blob, every piece re-hashes."""
    sidecar = path.with_name(path.name + ".pieces")
    assert sidecar.is_file(), f"blob {path.name} has no .pieces sidecar"
    header, records = read_piece_log(sidecar)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o440, f"blob {path.name} is writable ({oct(st.st_mode)})"
    assert st.st_size == header.size, f"blob {path.name}: {st.st_size} bytes, sidecar says {header.size}"
    n = piece_count(header.size, header.piece_size)
    assert sorted(records) == list(range(n)), f"blob {path.name}: sidecar lists {len(records)} of {n} pieces"
    assert BlobId.compute(header.size, header.piece_size, [records[i] for i in range(n)]).hex == path.name
    with open(path, "rb") as f:
        for i in range(n):
            off, length = piece_span(i, header.size, header.piece_size)
            assert hash_piece(os.pread(f.fileno(), length, off)) == records[i], (
                f"blob {path.name}: piece {i} is corrupt"
            )


def recorded_pieces(cache: Path) -> dict[str, set[int]]:
    """Partial key -> indices recorded in its piece log; asserts each of them re-hashes."""
    out: dict[str, set[int]] = {}
    for log_path in (cache / "partial").glob("*.pieces"):
        if log_path.name.startswith("."):
            continue  # a compaction's temp file: never read by anyone
        data = log_path.with_name(log_path.name.removesuffix(".pieces"))
        if not data.exists():
            continue  # crash between the two files: swept at start
        header, records = read_piece_log(log_path)
        if data.stat().st_size != header.size:
            continue  # killed while preallocating: reopened from scratch
        with open(data, "rb") as f:
            for i, digest in records.items():
                off, length = piece_span(i, header.size, header.piece_size)
                got = hash_piece(os.pread(f.fileno(), length, off))
                assert got == digest, f"partial {data.name[:16]}: piece {i} is recorded but its bytes do not match"
        out[data.name] = set(records)
    return out


def audit(cache: Path, *, restarted: bool) -> dict[str, set[int]]:
    """The crash-safety rules of DESIGN.md, "Data on disk". Runs in a worker thread.

    ``restarted``: the daemon has opened the store since the kill, so its sweep has run and the
    layout must be exactly the published state (no temp files, one view per ref).
    Returns the partials' recorded pieces.
    """
    blobs_dir, refs_dir, models_dir = cache / "blobs", cache / "refs", cache / "models"
    verified: dict[str, tuple[int, int]] = {}  # blob hex -> (st_dev, st_ino)
    for sub in blobs_dir.iterdir() if blobs_dir.exists() else []:
        for p in sub.iterdir():
            if p.name.startswith("."):
                assert not restarted, f"temp file {p} survived the restart"
                continue
            if p.name.endswith(".pieces"):
                continue
            verify_blob(p)
            st = p.stat()
            verified[p.name] = (st.st_dev, st.st_ino)

    views: dict[str, dict[str, str]] = {}  # escaped ref -> {file path: blob hex}
    for ref_file in refs_dir.iterdir() if refs_dir.exists() else []:
        if ref_file.name.startswith("."):
            assert not restarted, f"temp file {ref_file} survived the restart"
            continue  # an atomic write that never got renamed: not a ref
        lines = ref_file.read_text().split("\n")
        ref = ModelRef.parse(lines[0])
        assert ref.escaped == ref_file.name
        digest = lines[1].removeprefix("blake3:")
        manifest = Manifest.from_bytes((cache / "manifests" / f"{digest}.json").read_bytes(), expect_digest=digest)
        for entry in manifest.files:
            assert entry.blob.hex in verified, (
                f"ref {ref} names blob {entry.blob.hex[:16]}, which is not a verified blob"
            )
        views[ref_file.name] = {entry.path: entry.blob.hex for entry in manifest.files}

    by_inode = {v: k for k, v in verified.items()}
    for p in models_dir.rglob("*") if models_dir.exists() else []:
        if p.is_file():
            st = p.stat()
            assert (st.st_dev, st.st_ino) in by_inode, f"{p} is in models/ but is not a published blob"
    if restarted:
        assert {p.name for p in models_dir.iterdir()} == set(views), (
            "a view without its ref (or a ref without its view)"
        )
        for escaped, files in views.items():
            for rel, blob_hex in files.items():
                assert os.path.samefile(models_dir / escaped / rel, blobs_dir / blob_hex[:2] / blob_hex)
        assert not any((cache / "tmp").iterdir()), "tmp/ was not swept at start"
    return recorded_pieces(cache)


# --- driving the subprocess ----------------------------------------------------------------------


async def start(node: DaemonProcess) -> None:
    """Spawn the daemon and wait until its API answers /readyz (no cachectl subprocess per poll)."""

    def spawn() -> subprocess.Popen[bytes]:
        node.socket.unlink(missing_ok=True)
        with open(node.log_path, "ab") as log:
            return subprocess.Popen(
                node.argv(), stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO
            )

    node.proc = await asyncio.to_thread(spawn)

    async def ready() -> bool:
        assert node.proc is not None
        if node.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {node.proc.returncode}:\n{node.log_path.read_text()[-3000:]}")
        if not node.socket.exists():
            return False
        try:
            async with ApiClient(node.api, timeout_s=5) as api:
                await api.request("GET", "/readyz")
            return True
        except (DaemonUnreachable, ApiError):
            return False

    await wait_until(ready, timeout_s=20, interval_s=0.02, what="the daemon to listen")


async def state(node: DaemonProcess, ref: str) -> str:
    async with ApiClient(node.api) as api:
        return (await api.request("GET", "/v1/models/status", params={"ref": ref}))["state"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def new_file(root: Path, i: int) -> FileRun:
    path = write_random_file(root / f"m{i}.gguf", SIZE, seed=1000 + i)
    return FileRun(name=path.name, sha256=sha256(path))


def piece_of(range_header: str) -> int:
    start = int(range_header.split("-")[0])
    assert start % PIECE == 0, f"origin asked for a range not on a piece boundary: {range_header}"
    return start // PIECE


async def test_sigkill_at_random_moments_never_publishes_half_a_model_and_resumes(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    config = tmp_path / "cached.toml"
    config.write_text(
        "[origins.http]\n"
        f"connections = {CONNECTIONS}\nbackoff_s = 0.05\nbackoff_max_s = 0.2\n"
        "[store]\nscrub_interval_s = 0\n"
    )
    (tmp_path / "node").mkdir()
    node = DaemonProcess(tmp_path / "node", "--config", str(config), "--piece-size", str(PIECE))
    cache = node.cache_dir
    runs: list[FileRun] = []
    kills = 0
    async with Origin(tmp_path / "origin") as origin:
        origin.faults.rate_bps = RATE_BPS
        try:
            await start(node)
            while True:
                run = await asyncio.to_thread(new_file, tmp_path / "origin", len(runs))
                runs.append(run)
                ref = origin.file_url(run.name)
                sent_before = origin.counters.bytes_sent
                kept: set[int] = set()  # pieces verified on disk when the daemon last died
                while kills < KILLS:
                    # The origin must not be asked again for any piece that was verified on disk.
                    mark = len(origin.counters.ranges)
                    async with ApiClient(node.api) as api:
                        await api.request("POST", "/v1/prefetch", body={"ref": ref})
                    await asyncio.sleep(rng.random() * DOWNLOAD_S)  # the fault: a kill at a random moment
                    assert await asyncio.to_thread(node.kill, signal.SIGKILL) == -signal.SIGKILL
                    kills += 1
                    asked = [piece_of(r) for r in origin.counters.ranges[mark:]]
                    assert not kept & set(asked), f"re-fetched verified pieces {sorted(kept & set(asked))}"

                    partials = await asyncio.to_thread(audit, cache, restarted=False)
                    await start(node)
                    after = await asyncio.to_thread(audit, cache, restarted=True)
                    assert after == partials, "the restart lost or invented verified pieces"
                    kept = set().union(*after.values()) if after else set()
                    run.pieces_kept.append(len(kept))
                    if await state(node, ref) == "ready":
                        run.kill_after_ready = True
                        break
                    run.kills_mid_download += 1
                if not run.kill_after_ready:
                    # Out of kills (or this file's turn is over): finish it without a kill.
                    mark = len(origin.counters.ranges)
                    async with ApiClient(node.api) as api:
                        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
                    assert model["state"] == "ready", model
                    asked = [piece_of(r) for r in origin.counters.ranges[mark:]]
                    assert not kept & set(asked), f"re-fetched verified pieces {sorted(kept & set(asked))}"
                run.origin_bytes = origin.counters.bytes_sent - sent_before
                async with ApiClient(node.api) as api:
                    model = await api.request("GET", "/v1/models/status", params={"ref": ref})
                assert model["state"] == "ready" and model["bytes_total"] == SIZE
                assert await asyncio.to_thread(sha256, Path(model["path"]) / run.name) == run.sha256
                if kills >= KILLS:
                    break
            await asyncio.to_thread(audit, cache, restarted=True)
        finally:
            await asyncio.to_thread(node.stop)

    for run in runs:
        # Resume, not restart: each kill can waste at most the requests in flight at that moment
        # -- CONNECTIONS ranged GETs of at most one piece each, whose bytes the origin may have sent
        # but the daemon had not yet verified and recorded. Everything recorded is kept (checked
        # above piece by piece), so the file costs its size plus that much per interrupting kill.
        # A restart from zero would cost about (kills + 1) x SIZE instead.
        bound = SIZE + run.kills_mid_download * CONNECTIONS * PIECE
        assert SIZE <= run.origin_bytes <= bound, (
            f"{run.name}: origin sent {run.origin_bytes} bytes over {run.kills_mid_download} kills; bound {bound}"
        )
    mid = sum(r.kills_mid_download for r in runs)
    total_origin = sum(r.origin_bytes for r in runs)
    print(
        f"\ncrash-anywhere: seed={SEED} kills={kills} mid_download={mid} after_ready={kills - mid} files={len(runs)} "
        f"origin_bytes={total_origin} ({total_origin / (len(runs) * SIZE):.3f}x the files) "
        f"worst_file={max(r.origin_bytes for r in runs) / SIZE:.3f}x "
        f"pieces_kept={[r.pieces_kept for r in runs]}"
    )
    assert kills == KILLS
    assert mid >= KILLS // 2, f"only {mid} of {kills} kills interrupted a download: the kills are not exercising resume"
