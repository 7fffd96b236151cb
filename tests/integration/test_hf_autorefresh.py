"""``origins.hf.refresh_interval_s``: branch-tracking hf:// models follow their branch by themselves."""

from __future__ import annotations

from pathlib import Path

from cached.api.client import ApiClient
from tests.support.hub import Hub
from tests.support.node import running_daemon
from tests.support.wait import wait_until

NEW_CONFIG = b'{"model_type": "gpt2", "n_layer": 2}'


async def test_a_moved_branch_is_picked_up_without_an_operator(tmp_path: Path) -> None:
    hub = Hub()
    first = hub.add_repo("acme/follow", {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"A" * 200_000})
    async with hub:
        flags = {"origins.hf.endpoint": hub.url, "origins.hf.refresh_interval_s": 0.2, "store.piece_size_bytes": "64K"}
        async with running_daemon(tmp_path / "cache", **flags) as d, ApiClient(d.api_address) as api:
            model = await api.request("POST", "/v1/prefetch", body={"ref": "hf://acme/follow", "wait": True})
            assert model["revision"] == first
            await api.request("POST", "/v1/prefetch", body={"ref": f"hf://acme/follow@{first}", "wait": True})
            second = hub.commit("acme/follow", {"config.json": NEW_CONFIG})
            hub.reset()

            async def moved() -> bool:
                m = await api.request("GET", "/v1/models/status", params={"ref": "hf://acme/follow"})
                return m["state"] == "ready" and m["revision"] == second

            await wait_until(moved, timeout_s=30, what="the branch's new commit")
            pinned = await api.request("GET", "/v1/models/status", params={"ref": f"hf://acme/follow@{first}"})

    refs_main = tmp_path / "cache" / "hf" / "models--acme--follow" / "refs" / "main"
    assert refs_main.read_text() == second
    # Only the changed file came from the hub; the unchanged safetensors was reused.
    assert hub.counters.file_bytes == len(NEW_CONFIG)
    # A ref pinned to a commit is never re-resolved.
    assert pinned["revision"] == first
