"""Prefetch through a real daemon from real origins: file:// directories and http:// files.

What a launcher relies on: the files under the model's path are byte-identical to the origin's,
hardlinks to read-only blobs (never a second copy), a repeated prefetch reads nothing from the
origin, and any number of simultaneous prefetches of one ref read the origin once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from cached.api.client import ApiClient
from tests.support.contract import MODEL_FIELDS as CONTRACT_FIELDS
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

PIECE = 64 * 1024
FLAGS = {"store.piece_size_bytes": "64K"}
MODEL_FIELDS = set(CONTRACT_FIELDS)


def manifest_blobs(cache: Path, model: dict[str, Any]) -> dict[str, Path]:
    """File path in the model -> the blob file under cache/blobs that the manifest names."""
    digest = model["manifest"].removeprefix("blake3:")
    doc = json.loads((cache / "manifests" / f"{digest}.json").read_bytes())
    out = {}
    for f in doc["files"]:
        hex_ = f["blob"].removeprefix("blake3:")
        out[f["path"]] = cache / "blobs" / hex_[:2] / hex_
    return out


def assert_view_is_hardlinked_blobs(cache: Path, model: dict[str, Any], sources: dict[str, Path]) -> None:
    view = Path(model["path"])
    assert view.is_relative_to(cache / "models"), view
    blobs = manifest_blobs(cache, model)
    assert set(blobs) == set(sources)
    listed = {str(p.relative_to(view)) for p in view.rglob("*") if p.is_file()}
    assert listed == set(sources), "the view holds exactly the model's files"
    for rel, src in sources.items():
        file = view / rel
        assert file.read_bytes() == src.read_bytes(), rel
        st = file.stat()
        assert st.st_nlink >= 2, f"{rel} is a copy, not a hardlink"
        assert st.st_mode & 0o777 == 0o440, f"{rel} has mode {oct(st.st_mode & 0o777)}"
        blob = blobs[rel]
        assert blob.stat().st_ino == st.st_ino and os.path.samefile(blob, file), f"{rel} is not the blob {blob}"
        assert blob.stat().st_mode & 0o777 == 0o440


def assert_model_object(model: dict[str, Any], *, ref: str, size: int) -> None:
    assert MODEL_FIELDS <= set(model), f"missing fields: {MODEL_FIELDS - set(model)}"
    assert model["ref"] == ref
    assert model["state"] == "ready"
    assert model["bytes_total"] == model["bytes_done"] == size
    assert isinstance(model["path"], str) and Path(model["path"]).is_dir()
    assert re.fullmatch(r"blake3:[0-9a-f]{64}", model["manifest"]), model["manifest"]
    assert model["pinned"] is False
    assert model["leases"] == []
    assert model["error"] is None
    assert model["hf_path"] is None  # only hf:// refs have an HF view
    assert set(model["sources"]) == {"peer", "origin"}


async def test_file_directory_prefetch_gives_read_only_hardlinks_to_blobs(tmp_path: Path) -> None:
    src = tmp_path / "src" / "my-model"
    files = {
        "config.json": (src / "config.json"),
        "weights/model-00001-of-00002.safetensors": write_random_file(
            src / "weights/model-00001-of-00002.safetensors", 700 * 1024 + 3, seed=1
        ),
        "weights/model-00002-of-00002.safetensors": write_random_file(
            src / "weights/model-00002-of-00002.safetensors", 5 * PIECE, seed=2
        ),
        "tokenizer/deep/tokenizer.model": write_random_file(src / "tokenizer/deep/tokenizer.model", 1000, seed=3),
    }
    files["config.json"].write_text('{"architectures": ["Llama"]}\n')
    total = sum(p.stat().st_size for p in files.values())
    cache = tmp_path / "cache"
    ref = f"file://{src}"
    async with running_daemon(cache, **FLAGS) as d, ApiClient(d.api_address) as api:
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert_model_object(model, ref=ref, size=total)
        assert model["sources"] == {"peer": 0, "origin": total}
        assert model["files"] == len(files)
        assert_view_is_hardlinked_blobs(cache, model, files)
        # An import is a copy: editing or chmod-ing the source must never reach the cache.
        for p in files.values():
            assert p.stat().st_nlink == 1
        assert os.listdir(cache / "partial") == []

        status = await api.request("GET", "/v1/models/status", params={"ref": ref})
        assert {k: status[k] for k in MODEL_FIELDS} == {k: model[k] for k in MODEL_FIELDS}
        listed = await api.request("GET", "/v1/models")
        assert [m["ref"] for m in listed] == [ref]

        again = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert again["state"] == "ready"
        assert (again["path"], again["manifest"]) == (model["path"], model["manifest"])


async def test_http_prefetch_twice_reads_the_origin_once(tmp_path: Path) -> None:
    size = 2 * 1024 * 1024 + 5
    src = write_random_file(tmp_path / "origin" / "model.gguf", size, seed=7)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("model.gguf")
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert_model_object(model, ref=ref, size=size)
        assert model["sources"] == {"peer": 0, "origin": size}
        assert_view_is_hardlinked_blobs(cache, model, {"model.gguf": src})
        assert origin.counters.bytes_sent == size
        before = (origin.counters.requests, origin.counters.bytes_sent)

        again = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert (origin.counters.requests, origin.counters.bytes_sent) == before, (
            "a ready model must not touch the origin"
        )
        assert again["state"] == "ready"
        assert (again["path"], again["manifest"], again["bytes_done"]) == (model["path"], model["manifest"], size)

        # Without wait the answer is immediate (202) and the model is still ready.
        quick = await api.request("POST", "/v1/prefetch", body={"ref": ref})
        assert quick["state"] in ("queued", "fetching", "ready")
        await wait_ready(api, ref)
        assert (origin.counters.requests, origin.counters.bytes_sent) == before


async def test_sources_still_report_origin_bytes_after_a_repeat_prefetch(tmp_path: Path) -> None:
    """CONTRACT: ``sources`` is the bytes fetched for this model on this node, by source."""
    size = 300 * 1024
    write_random_file(tmp_path / "origin" / "m.bin", size, seed=8)
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("m.bin")
        first = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert first["sources"]["origin"] == size
        await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        status = await api.request("GET", "/v1/models/status", params={"ref": ref})
        assert status["sources"] == {"peer": 0, "origin": size}, (
            "a no-op prefetch of a ready model must not reset what this node fetched for it"
        )


async def test_ten_concurrent_prefetches_read_the_origin_once(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 123
    src = write_random_file(tmp_path / "origin" / "big.bin", size, seed=9)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("big.bin")
        results = await asyncio.gather(
            *(api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True}) for _ in range(10))
        )
        assert [r["state"] for r in results] == ["ready"] * 10
        assert len({r["path"] for r in results}) == 1
        assert len({r["manifest"] for r in results}) == 1
        assert origin.counters.bytes_sent == size
        pieces = -(-size // PIECE)
        assert len(origin.counters.ranges) == len(set(origin.counters.ranges)) == pieces, "each piece read exactly once"
        assert_view_is_hardlinked_blobs(cache, results[0], {"big.bin": src})
        assert len(list((cache / "blobs").rglob("*.pieces"))) == 1


async def test_metrics_count_fetched_bytes_jobs_store_and_models(tmp_path: Path) -> None:
    size = 1024 * 1024 + 77
    write_random_file(tmp_path / "origin" / "w.bin", size, seed=10)
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("w.bin")
        await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        m = await scrape(d.api_address)
        assert m[("cached_fetched_bytes_total", (("source", "origin"),))] == size
        assert m[("cached_fetched_bytes_total", (("source", "peer"),))] == 0
        assert m[("cached_prefetch_jobs_total", (("result", "ok"),))] == 1
        assert m[("cached_prefetch_jobs_total", (("result", "failed"),))] == 0
        assert m[("cached_store_bytes", ())] == size
        assert m[("cached_store_capacity_bytes", ())] > 0
        assert m[("cached_models", (("state", "ready"),))] == 1
        assert m[("cached_models", (("state", "failed"),))] == 0

        await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        m = await scrape(d.api_address)
        assert m[("cached_fetched_bytes_total", (("source", "origin"),))] == size, "nothing new was fetched"
        assert m[("cached_prefetch_jobs_total", (("result", "ok"),))] == 2
        assert m[("cached_models", (("state", "ready"),))] == 1
        assert origin.counters.bytes_sent == size


# --- helpers -----------------------------------------------------------------------------------


async def wait_ready(api: ApiClient, ref: str) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        m = await api.request("GET", "/v1/models/status", params={"ref": ref})
        return m if m["state"] == "ready" else None

    return await wait_until(ready, timeout_s=20, what=f"{ref} ready")


async def scrape(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(addr + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out
