"""A full disk, for real: the cache lives on a 24 MiB tmpfs that the test mounts.

Two ways to run out of space. The store's own accounting (capacity = ``store.max_bytes``, else 90%
of the filesystem) refuses a model that can never fit before any I/O, and evicts the least recently
used model when that makes room. And the filesystem itself: with ``store.max_bytes`` set far above
the tmpfs (a wrong setting, or a disk shared with other data), the store believes there is room and
the preallocation of the partial file (``posix_fallocate``) hits ENOSPC. Either way the failure is
``store_full`` (507) with a message naming the lack of space, no partial file is left behind, the
models already there stay intact, and the daemon keeps serving.

Needs root (mount); skipped with the reason otherwise. The tmpfs is unmounted at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from cached.daemon import Daemon
from tests.integration.test_bitrot import assert_store_sound
from tests.support.cluster import metric
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file

pytestmark = pytest.mark.system

MiB = 1 << 20
DISK = 24 * MiB
PIECE_FLAG = "1M"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs at ``tmp_path/disk`` (a sync fixture: mount runs outside the event loop)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK // MiB}m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def make_models(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    out = {}
    for i, (name, size) in enumerate(sizes.items()):
        path = write_random_file(root / name, size, seed=600 + i)
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


async def prefetch(d: Daemon, ref: str) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    assert model["state"] == "ready", model
    return model


async def prefetch_fails(d: Daemon, ref: str) -> ApiError:
    async with ApiClient(d.api_address) as api:
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    return e.value


async def status(d: Daemon, ref: str) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        return await api.request("GET", "/v1/models/status", params={"ref": ref})


async def sha_of(model: dict[str, Any], name: str) -> str:
    return await asyncio.to_thread(lambda: hashlib.sha256((Path(model["path"]) / name).read_bytes()).hexdigest())


def debris(cache: Path) -> list[str]:
    """Anything a failed fetch could leave: partial files, temp files."""
    return sorted(os.listdir(cache / "partial")) + sorted(os.listdir(cache / "tmp"))


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def serves(d: Daemon) -> None:
    async with ApiClient(d.api_address) as api:
        assert (await api.request("GET", "/healthz"))["status"] == "ok"
        node = await api.request("GET", "/v1/node")
        assert node["reserved_bytes"] == 0, "a failed fetch left space reserved"


# --- the filesystem is full: ENOSPC from fallocate -----------------------------------------------------


async def test_enospc_fails_clearly_leaves_nothing_and_the_daemon_keeps_serving(
    tmp_path: Path, small_disk: Path
) -> None:
    want = await asyncio.to_thread(
        make_models, tmp_path / "origin", {"old.bin": 8 * MiB, "huge.bin": 30 * MiB, "small.bin": 4 * MiB}
    )
    cache = small_disk / "cache"
    flags = {"store.piece_size_bytes": PIECE_FLAG, "store.max_bytes": "1G"}  # the store believes it has 1 GiB
    async with Origin(tmp_path / "origin") as origin, running_daemon(cache, **flags) as d:
        assert d.store.capacity_bytes > DISK
        old = await prefetch(d, origin.file_url("old.bin"))
        free_before, gets = disk_free(small_disk), origin.counters.gets

        err = await prefetch_fails(d, origin.file_url("huge.bin"))
        assert (err.status, err.code) == (507, "store_full"), (err.status, err.code, err.message)
        assert "no space left" in err.message, err.message
        st = await status(d, origin.file_url("huge.bin"))
        assert st["state"] == "failed" and st["error_code"] == "store_full" and "no space left" in st["error"], st
        assert debris(cache) == [], "the failed fetch left files behind"
        assert disk_free(small_disk) == free_before, "the space the failed fetch took was given back"
        assert origin.counters.gets == gets, "it failed when preallocating, before fetching a byte"

        # The model already there is intact, and the daemon goes on serving and fetching.
        await serves(d)
        assert (await status(d, old["ref"]))["state"] == "ready"
        assert await sha_of(old, "old.bin") == want["old.bin"]
        small = await prefetch(d, origin.file_url("small.bin"))
        assert await sha_of(small, "small.bin") == want["small.bin"]
        await asyncio.to_thread(assert_store_sound, d)


async def test_enospc_evicts_the_lru_model_when_that_makes_room(tmp_path: Path, small_disk: Path) -> None:
    """The disk is smaller than ``store.max_bytes`` says: the old model must go to make room for a
    new one that fits once it is gone -- the same promise as within the configured capacity."""
    want = await asyncio.to_thread(make_models, tmp_path / "origin", {"old.bin": 8 * MiB, "new.bin": 18 * MiB})
    cache = small_disk / "cache"
    flags = {"store.piece_size_bytes": PIECE_FLAG, "store.max_bytes": "1G"}
    async with Origin(tmp_path / "origin") as origin, running_daemon(cache, **flags) as d:
        old = await prefetch(d, origin.file_url("old.bin"))
        assert disk_free(small_disk) < 18 * MiB < disk_free(small_disk) + 8 * MiB, (
            "new.bin fits only once old.bin is gone"
        )

        async with ApiClient(d.api_address) as api:
            try:
                new = await api.request("POST", "/v1/prefetch", body={"ref": origin.file_url("new.bin"), "wait": True})
            except ApiError as e:
                pytest.fail(f"the prefetch failed instead of evicting the LRU model: {e.code}: {e.message}")
        assert await sha_of(new, "new.bin") == want["new.bin"]
        assert (await status(d, old["ref"]))["state"] == "absent"
        assert debris(cache) == []
        await asyncio.to_thread(assert_store_sound, d)
        assert await metric(d, "cached_evictions_total") == 1


# --- the store's own accounting: capacity = 90% of the tmpfs ----------------------------------------


async def test_within_capacity_the_lru_model_is_evicted_and_a_model_that_can_never_fit_evicts_nothing(
    tmp_path: Path, small_disk: Path
) -> None:
    want = await asyncio.to_thread(
        make_models,
        tmp_path / "origin",
        {"old.bin": 8 * MiB, "new.bin": 14 * MiB, "huge.bin": 30 * MiB, "small.bin": 2 * MiB},
    )
    cache = small_disk / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **{"store.piece_size_bytes": PIECE_FLAG}) as d,
    ):
        capacity = d.store.capacity_bytes
        assert capacity == int(DISK * 0.9)
        old = await prefetch(d, origin.file_url("old.bin"))
        assert 8 * MiB + 14 * MiB > capacity >= 14 * MiB, "new.bin fits only once old.bin is gone"

        new = await prefetch(d, origin.file_url("new.bin"))
        assert await sha_of(new, "new.bin") == want["new.bin"]
        assert (await status(d, old["ref"]))["state"] == "absent", "the LRU model made room"
        assert not Path(old["path"]).exists()

        # Larger than the whole cache: refused before any I/O, and nothing is evicted for it.
        gets = origin.counters.gets
        err = await prefetch_fails(d, origin.file_url("huge.bin"))
        assert (err.status, err.code) == (507, "store_full"), (err.status, err.code)
        assert "not enough cache space" in err.message and "30.0 MiB" in err.message, err.message
        assert origin.counters.gets == gets, "no byte was fetched for a model that cannot fit"
        assert (await status(d, new["ref"]))["state"] == "ready", "a model that can never fit must not empty the cache"
        assert debris(cache) == []

        await serves(d)
        small = await prefetch(d, origin.file_url("small.bin"))
        assert await sha_of(small, "small.bin") == want["small.bin"]
        await asyncio.to_thread(assert_store_sound, d)
        assert await metric(d, "cached_evictions_total") == 1, (
            "the eviction a prefetch made is not counted in cached_evictions_total"
        )
