"""Eviction under pressure, ``POST /v1/gc`` and ``POST /v1/evict`` against a real daemon.

The store is made tiny (3 MiB) so that a third model of 1.2 MiB does not fit beside two others:
the prefetch must evict the least recently used model, and never a pinned or a leased one. A
prefetch that cannot fit fails with ``store_full`` (507) and leaves nothing in ``partial/``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

MiB = 1024 * 1024
MODEL = 1258291  # 1.2 MiB: two fit in 3 MiB, three do not
FLAGS = {"store.piece_size_bytes": "64K", "store.max_bytes": "3M"}


def make_models(root: Path, *names: str, size: int = MODEL) -> None:
    for i, name in enumerate(names):
        write_random_file(root / name, size, seed=100 + i)


async def prefetch(api: ApiClient, ref: str) -> dict[str, Any]:
    model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    assert model["state"] == "ready", model
    return model


async def held(api: ApiClient, *refs: str) -> list[bool]:
    """Whether each model is on disk here: a path that exists (independent of job bookkeeping)."""
    out = []
    for r in refs:
        path = (await api.request("GET", "/v1/models/status", params={"ref": r}))["path"]
        out.append(path is not None and Path(path).is_dir())
    return out


def partial_files(cache: Path) -> list[str]:
    return sorted(os.listdir(cache / "partial"))


async def test_prefetch_under_pressure_evicts_lru_never_pinned_or_leased(tmp_path: Path) -> None:
    make_models(tmp_path / "origin", "a.bin", "b.bin", "c.bin", "d.bin")
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        a, b, c, dd = (origin.file_url(n) for n in ("a.bin", "b.bin", "c.bin", "d.bin"))
        await prefetch(api, a)
        model_b = await prefetch(api, b)
        await prefetch(api, a)  # a is used again: b is now the least recently used

        await prefetch(api, c)
        assert await held(api, a, b, c) == [True, False, True]
        assert not Path(model_b["path"]).exists(), "the evicted model's view is gone"

        # a is now the LRU one, but pinned: c goes instead.
        await api.request("POST", "/v1/pin", body={"ref": a})
        await prefetch(api, dd)
        assert await held(api, a, c, dd) == [True, False, True]

        # a is leased, and the LRU one again (d is used after the lease was taken): d goes instead.
        await api.request("POST", "/v1/unpin", body={"ref": a})
        await api.request("POST", "/v1/leases", body={"ref": a, "holder": "vllm@pod-1", "ttl_s": 600})
        await prefetch(api, dd)
        await prefetch(api, b)
        assert await held(api, a, b, dd) == [True, True, False]

        node = await api.request("GET", "/v1/node")
        assert node["used_bytes"] == 2 * MODEL <= node["capacity_bytes"] == 3 * MiB
        assert partial_files(cache) == []
        blobs = [p for p in (cache / "blobs").rglob("*") if p.is_file() and not p.name.endswith(".pieces")]
        assert len(blobs) == 2, "evicted models leave no blobs behind"


async def test_prefetch_that_cannot_fit_beside_protected_models_fails_store_full(tmp_path: Path) -> None:
    make_models(tmp_path / "origin", "a.bin", "b.bin", "c.bin")
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        a, b, c = (origin.file_url(n) for n in ("a.bin", "b.bin", "c.bin"))
        await prefetch(api, a)
        await prefetch(api, b)
        await api.request("POST", "/v1/pin", body={"ref": a})
        await api.request("POST", "/v1/leases", body={"ref": b, "holder": "sglang", "ttl_s": 600})
        gets = origin.counters.gets

        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": c, "wait": True})
        assert (e.value.status, e.value.code) == (507, "store_full")
        assert "space" in e.value.message
        assert e.value.body["model"]["state"] == "failed"
        failed = await api.request("GET", "/v1/models/status", params={"ref": c})
        assert failed["state"] == "failed" and failed["error"] and failed["error_code"] == "store_full"
        assert await held(api, a, b) == [True, True]
        assert partial_files(cache) == []
        assert origin.counters.gets == gets, "no byte of c was read"


async def test_prefetch_larger_than_the_whole_store_fails_and_evicts_nothing(tmp_path: Path) -> None:
    make_models(tmp_path / "origin", "a.bin")
    write_random_file(tmp_path / "origin" / "huge.bin", 4 * MiB, seed=7)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        a, huge = origin.file_url("a.bin"), origin.file_url("huge.bin")
        await prefetch(api, a)

        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": huge, "wait": True})
        assert (e.value.status, e.value.code) == (507, "store_full")
        assert partial_files(cache) == []
        assert origin.counters.bytes_sent == MODEL, "nothing of huge.bin was downloaded"
        # 4 MiB can never fit in 3 MiB: evicting a (which could not make room) only loses a model.
        assert await held(api, a) == [True]


async def test_gc_brings_usage_under_the_low_watermark_and_spares_pinned(tmp_path: Path) -> None:
    make_models(tmp_path / "origin", "a.bin", "b.bin")
    cache = tmp_path / "cache"
    flags = {**FLAGS, "store.high_watermark": 0.5, "store.low_watermark": 0.4}
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **flags) as d,
        ApiClient(d.api_address) as api,
    ):
        a, b = origin.file_url("a.bin"), origin.file_url("b.bin")
        idle = await api.request("POST", "/v1/gc")
        assert idle == {"freed_bytes": 0, "evicted": []}
        await prefetch(api, a)
        await prefetch(api, b)  # 2.4 MiB used: above the 1.5 MiB high watermark

        await api.request("POST", "/v1/pin", body={"ref": a})
        await api.request("POST", "/v1/pin", body={"ref": b})
        nothing = await api.request("POST", "/v1/gc")
        assert nothing == {"freed_bytes": 0, "evicted": []}
        assert await held(api, a, b) == [True, True]

        await api.request("POST", "/v1/unpin", body={"ref": a})
        await api.request("POST", "/v1/unpin", body={"ref": b})
        result = await api.request("POST", "/v1/gc")
        assert result == {"freed_bytes": MODEL, "evicted": [a]}, "only the LRU model goes, down to the low watermark"
        assert await held(api, a, b) == [False, True]
        node = await api.request("GET", "/v1/node")
        assert node["used_bytes"] == MODEL


async def test_evict_is_refused_while_pinned_or_leased_unless_forced(tmp_path: Path) -> None:
    make_models(tmp_path / "origin", "a.bin", size=300 * 1024)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        a = origin.file_url("a.bin")
        model = await prefetch(api, a)

        await api.request("POST", "/v1/pin", body={"ref": a})
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/evict", body={"ref": a})
        assert (e.value.status, e.value.code) == (409, "conflict") and "pinned" in e.value.message
        await api.request("POST", "/v1/unpin", body={"ref": a})

        lease = await api.request("POST", "/v1/leases", body={"ref": a, "holder": "llama.cpp@gpu0", "ttl_s": 600})
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/evict", body={"ref": a})
        assert (e.value.status, e.value.code) == (409, "conflict") and "llama.cpp@gpu0" in e.value.message
        assert await held(api, a) == [True]

        await api.request("POST", "/v1/pin", body={"ref": a})
        forced = await api.request("POST", "/v1/evict", body={"ref": a, "force": True})
        assert forced["state"] == "absent" and forced["freed_bytes"] == 300 * 1024
        assert forced["pinned"] is False and forced["leases"] == []
        assert await api.request("GET", "/v1/leases") == []
        assert lease["lease_id"] not in os.listdir(cache / "claims" / "leases")
        assert not Path(model["path"]).exists()
        assert [p for p in (cache / "blobs").rglob("*") if p.is_file()] == []
        assert (await api.request("GET", "/v1/node"))["used_bytes"] == 0

        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/evict", body={"ref": a})
        assert (e.value.status, e.value.code) == (404, "not_found")
        # It can be fetched again afterwards.
        await prefetch(api, a)


async def test_evicting_an_in_progress_fetch_cancels_it_and_removes_partial_files(tmp_path: Path) -> None:
    size = 2 * MiB
    write_random_file(tmp_path / "origin" / "slow.bin", size, seed=40)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("slow.bin")
        origin.faults.rate_bps = 64 * 1024  # each 64 KiB piece takes about a second
        accepted = await api.request("POST", "/v1/prefetch", body={"ref": ref})
        assert accepted["state"] in ("queued", "fetching")
        waiter = asyncio.create_task(api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True}))

        async def fetching() -> bool:
            s = await api.request("GET", "/v1/models/status", params={"ref": ref})
            return s["state"] == "fetching" and s["bytes_done"] > 0 and bool(partial_files(cache))

        await wait_until(fetching, timeout_s=10, what="fetch in progress with verified pieces on disk")
        evicted = await api.request("POST", "/v1/evict", body={"ref": ref})
        assert evicted["state"] == "absent"

        with pytest.raises(ApiError) as e:
            await waiter
        assert (e.value.status, e.value.code) == (409, "cancelled")
        assert partial_files(cache) == []
        assert (await api.request("GET", "/v1/models/status", params={"ref": ref}))["state"] == "absent"
        node = await api.request("GET", "/v1/node")
        assert (node["used_bytes"], node["reserved_bytes"], node["transfers"]) == (0, 0, [])
        assert origin.counters.bytes_sent < size

        # The origin recovers; a new prefetch starts over and completes.
        origin.faults.rate_bps = None
        model = await prefetch(api, ref)
        assert (Path(model["path"]) / "slow.bin").read_bytes() == (tmp_path / "origin" / "slow.bin").read_bytes()


async def test_a_model_evicted_under_pressure_reads_as_absent(tmp_path: Path) -> None:
    """Status, the node summary and the model list must agree with the disk after an eviction."""
    make_models(tmp_path / "origin", "a.bin", "b.bin", "c.bin")
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        a, b, c = (origin.file_url(n) for n in ("a.bin", "b.bin", "c.bin"))
        for ref in (a, b, c):
            await prefetch(api, ref)
        assert await held(api, a, b, c) == [False, True, True]
        status = await api.request("GET", "/v1/models/status", params={"ref": a})
        assert (status["state"], status["path"], status["manifest"]) == ("absent", None, None), status
        node = await api.request("GET", "/v1/node")
        assert node["models"]["ready"] == 2
        listed = {m["ref"]: m["state"] for m in await api.request("GET", "/v1/models")}
        assert listed.get(a, "absent") == "absent" and listed[b] == listed[c] == "ready"


async def test_evicting_a_fetch_just_as_its_partial_is_created_leaves_nothing_behind(tmp_path: Path) -> None:
    """The evict lands while the partial file is being created (in a worker thread): no orphans.

    The window is a few milliseconds, so the evict is tried a few times, each as soon as the
    partial file appears; every attempt must leave neither files nor open descriptors behind.
    """
    write_random_file(tmp_path / "origin" / "slow.bin", 8 * MiB, seed=41)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **{"store.piece_size_bytes": "64K"}) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("slow.bin")
        origin.faults.rate_bps = 64 * 1024
        for attempt in range(12):
            await api.request("POST", "/v1/prefetch", body={"ref": ref})
            await wait_until(lambda: partial_files(cache), timeout_s=10, interval_s=0, what="partial file created")
            await api.request("POST", "/v1/evict", body={"ref": ref})

            def settled() -> bool:
                return partial_files(cache) == [] and open_fds_under(cache / "partial") == []

            try:
                await wait_until(settled, timeout_s=3, what="no partial files and no open fds under partial/")
            except AssertionError:
                pytest.fail(
                    f"attempt {attempt}: left behind files={partial_files(cache)} "
                    f"open fds={open_fds_under(cache / 'partial')}"
                )
            assert (await api.request("GET", "/v1/node"))["used_bytes"] == 0


def open_fds_under(directory: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            out.append(target)
    return out
