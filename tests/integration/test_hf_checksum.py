"""A hub that sends wrong bytes of the right length: the sha256 (LFS) or git blob sha1 catches it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.hub import Hub, random_bytes
from tests.support.node import running_daemon


@pytest.mark.parametrize("path", ["model.safetensors", "config.json"], ids=["lfs-sha256", "git-blob-sha1"])
async def test_wrong_bytes_from_the_hub_never_become_a_blob(tmp_path: Path, path: str) -> None:
    hub = Hub()
    files = {"model.safetensors": random_bytes(300_000, seed=3), "config.json": b'{"model_type": "gpt2"}'}
    hub.add_repo("acme/rotten", files, gitattributes=False)
    async with hub:
        hub.corrupt_bodies = True
        flags = {"origins.hf.endpoint": hub.url, "store.piece_size_bytes": "64K"}
        ref = f"hf://acme/rotten?include={path}"
        async with running_daemon(tmp_path / "cache", **flags) as d, ApiClient(d.api_address) as api:
            with pytest.raises(ApiError) as e:
                await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
            assert e.value.status == 502 and "does not match the hub" in e.value.message
            blobs = [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
            assert blobs == [], "nothing from the bad download may become a blob"
            assert list((tmp_path / "cache" / "partial").iterdir()) == [], "no piece of it may be kept"
            failures = d.metrics.registry.get_sample_value("cached_piece_verify_failures_total", {"source": "origin"})
            assert failures == 1, "the whole-file mismatch is counted"
            # Once the hub is honest again, the same prefetch gives the right bytes.
            hub.corrupt_bodies = False
            model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
            assert (Path(model["path"]) / path).read_bytes() == files[path]
