"""Launcher leases: take, list, release, expire; refused for a model that is not ready here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

FLAGS = {"store.piece_size_bytes": "64K"}


async def ready_model(api: ApiClient, ref: str) -> dict[str, Any]:
    model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    assert model["state"] == "ready"
    return model


async def status(api: ApiClient, ref: str) -> dict[str, Any]:
    return await api.request("GET", "/v1/models/status", params={"ref": ref})


async def test_lease_take_list_release(tmp_path: Path) -> None:
    write_random_file(tmp_path / "origin" / "m.gguf", 200 * 1024, seed=31)
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("m.gguf")
        model = await ready_model(api, ref)

        lease = await api.request("POST", "/v1/leases", body={"ref": ref, "holder": "vllm@pod-1", "ttl_s": 600})
        assert lease["path"] == model["path"]
        assert isinstance(lease["lease_id"], str) and lease["lease_id"]
        assert (lease["ref"], lease["holder"]) == (ref, "vllm@pod-1")

        listed = await api.request("GET", "/v1/leases")
        assert [x["lease_id"] for x in listed] == [lease["lease_id"]]
        leases = (await status(api, ref))["leases"]
        assert [(x["lease_id"], x["holder"]) for x in leases] == [(lease["lease_id"], "vllm@pod-1")]

        second = await api.request("POST", "/v1/leases", body={"ref": ref, "holder": "vllm@pod-2", "ttl_s": 600})
        assert second["lease_id"] != lease["lease_id"]
        assert len(await api.request("GET", "/v1/leases")) == 2

        released = await api.request("DELETE", f"/v1/leases/{lease['lease_id']}")
        assert released["lease_id"] == lease["lease_id"]
        assert [x["lease_id"] for x in await api.request("GET", "/v1/leases")] == [second["lease_id"]]
        await api.request("DELETE", f"/v1/leases/{second['lease_id']}")
        assert await api.request("GET", "/v1/leases") == []
        assert (await status(api, ref))["leases"] == []

        with pytest.raises(ApiError) as e:
            await api.request("DELETE", f"/v1/leases/{lease['lease_id']}")
        assert (e.value.status, e.value.code) == (404, "not_found")
        # Releasing the lease does not remove the model.
        assert (await status(api, ref))["state"] == "ready"


async def test_lease_is_refused_for_a_model_that_is_not_ready_here(tmp_path: Path) -> None:
    write_random_file(tmp_path / "origin" / "slow.bin", 1024 * 1024, seed=32)
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        absent = origin.file_url("never-fetched.bin")
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/leases", body={"ref": absent, "holder": "llama.cpp", "ttl_s": 60})
        assert e.value.status == 409 and e.value.code == "conflict"
        assert "prefetch" in e.value.message
        assert await api.request("GET", "/v1/leases") == []

        # A model still being fetched is not ready either.
        origin.faults.rate_bps = 32 * 1024  # a piece takes about two seconds
        fetching = origin.file_url("slow.bin")
        await api.request("POST", "/v1/prefetch", body={"ref": fetching})
        await wait_until(lambda: _state_is(api, fetching, "fetching"), timeout_s=10, what="fetching")
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/leases", body={"ref": fetching, "holder": "llama.cpp", "ttl_s": 60})
        assert e.value.status == 409
        assert await api.request("GET", "/v1/leases") == []
        await api.request("POST", "/v1/evict", body={"ref": fetching})


async def test_lease_expires_after_its_ttl_and_stops_protecting_the_model(tmp_path: Path) -> None:
    write_random_file(tmp_path / "origin" / "m.bin", 100 * 1024, seed=33)
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("m.bin")
        await ready_model(api, ref)
        lease = await api.request("POST", "/v1/leases", body={"ref": ref, "holder": "short-lived", "ttl_s": 1})
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/evict", body={"ref": ref})
        assert e.value.status == 409 and "short-lived" in e.value.message

        async def gone() -> bool:
            return await api.request("GET", "/v1/leases") == []

        # Expiry is decided on read from the clock; housekeeping removes the file later.
        await wait_until(gone, timeout_s=10, what="lease expiry")
        assert (await status(api, ref))["leases"] == []
        assert lease["lease_id"] not in {x["lease_id"] for x in await api.request("GET", "/v1/leases")}
        evicted = await api.request("POST", "/v1/evict", body={"ref": ref})
        assert evicted["state"] == "absent"


async def test_leases_and_pins_survive_a_daemon_restart(tmp_path: Path) -> None:
    write_random_file(tmp_path / "origin" / "a.bin", 150 * 1024, seed=34)
    write_random_file(tmp_path / "origin" / "b.bin", 150 * 1024, seed=35)
    cache = tmp_path / "cache"
    async with Origin(tmp_path / "origin") as origin:
        a, b = origin.file_url("a.bin"), origin.file_url("b.bin")
        async with running_daemon(cache, **FLAGS) as d, ApiClient(d.api_address) as api:
            await ready_model(api, a)
            await ready_model(api, b)
            lease = await api.request("POST", "/v1/leases", body={"ref": a, "holder": "sglang", "ttl_s": 3600})
            await api.request("POST", "/v1/pin", body={"ref": b})
        sent = origin.counters.bytes_sent
        async with running_daemon(cache, **FLAGS) as d, ApiClient(d.api_address) as api:
            assert [x["lease_id"] for x in await api.request("GET", "/v1/leases")] == [lease["lease_id"]]
            sa, sb = await status(api, a), await status(api, b)
            assert sa["state"] == sb["state"] == "ready"
            assert [x["holder"] for x in sa["leases"]] == ["sglang"] and sb["pinned"] is True
            for ref in (a, b):
                with pytest.raises(ApiError) as e:
                    await api.request("POST", "/v1/evict", body={"ref": ref})
                assert e.value.status == 409
        assert origin.counters.bytes_sent == sent


async def _state_is(api: ApiClient, ref: str, state: str) -> bool:
    return (await status(api, ref))["state"] == state
