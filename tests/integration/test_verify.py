"""``POST /v1/verify`` finds bytes that rotted on disk and repairs them from the origin.

A byte is flipped in a stored blob behind the daemon's back (the blob is 0440, so the test makes it
writable first and restores the mode, as a stray root process or a bad disk would). Verify must
find the bad piece, re-read only that piece from the origin, and leave the view correct.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.corrupt import flip_byte
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file

PIECE = 64 * 1024
FLAGS = {"store.piece_size_bytes": "64K"}


def blob_of(cache: Path, model: dict[str, Any], rel: str) -> Path:
    digest = model["manifest"].removeprefix("blake3:")
    doc = json.loads((cache / "manifests" / f"{digest}.json").read_bytes())
    (hex_,) = [f["blob"].removeprefix("blake3:") for f in doc["files"] if f["path"] == rel]
    return cache / "blobs" / hex_[:2] / hex_


def assert_view_sound(cache: Path, model: dict[str, Any], rel: str, src: Path) -> None:
    view = Path(model["path"]) / rel
    assert view.read_bytes() == src.read_bytes()
    st = view.stat()
    assert st.st_nlink >= 2 and st.st_mode & 0o777 == 0o440
    blob = blob_of(cache, model, rel)
    assert os.path.samefile(view, blob), "the view must point at the repaired blob"


async def test_flipped_byte_is_found_and_only_its_piece_is_refetched(tmp_path: Path) -> None:
    size = 1024 * 1024 + 100  # 17 pieces, the last one short
    src = write_random_file(tmp_path / "origin" / "model.gguf", size, seed=21)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("model.gguf")
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        blob = blob_of(cache, model, "model.gguf")
        flip_byte(blob, 5 * PIECE + 1234, 0x5A)
        assert (Path(model["path"]) / "model.gguf").read_bytes() != src.read_bytes()
        origin.reset()

        report = await api.request("POST", "/v1/verify", long=True)
        assert report["bad_pieces"] == 1
        assert report["checked_bytes"] == size
        assert report["repaired_blobs"] == 1
        assert report["errors"] == []
        assert origin.counters.bytes_sent == PIECE, "only the bad piece is read again"
        assert origin.counters.ranges == [f"{5 * PIECE}-{6 * PIECE - 1}"]

        after = await api.request("GET", "/v1/models/status", params={"ref": ref})
        assert after["state"] == "ready" and after["manifest"] == model["manifest"]
        assert_view_sound(cache, after, "model.gguf", src)
        assert blob.stat().st_mode & 0o777 == 0o440

        again = await api.request("POST", "/v1/verify", long=True)
        assert (again["bad_pieces"], again["checked_bytes"], again["repaired_blobs"]) == (0, size, 0)
        assert origin.counters.bytes_sent == PIECE


async def test_several_bad_pieces_including_the_short_last_one(tmp_path: Path) -> None:
    size = 10 * PIECE + 999
    src = write_random_file(tmp_path / "origin" / "w.bin", size, seed=22)
    cache = tmp_path / "cache"
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(cache, **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("w.bin")
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        blob = blob_of(cache, model, "w.bin")
        flip_byte(blob, 0, 0x5A)
        flip_byte(blob, size - 1, 0x5A)
        origin.reset()

        report = await api.request("POST", "/v1/verify", body={"ref": ref}, long=True)
        assert report["bad_pieces"] == 2
        assert report["repaired_blobs"] == 1
        assert origin.counters.bytes_sent == PIECE + 999
        assert sorted(origin.counters.ranges) == sorted([f"0-{PIECE - 1}", f"{10 * PIECE}-{size - 1}"])
        assert_view_sound(cache, model, "w.bin", src)
        assert (await api.request("POST", "/v1/verify", body={"ref": ref}, long=True))["bad_pieces"] == 0


async def test_file_import_is_repaired_from_its_source_directory(tmp_path: Path) -> None:
    src_dir = tmp_path / "src" / "m"
    a = write_random_file(src_dir / "a.bin", 4 * PIECE + 10, seed=23)
    b = write_random_file(src_dir / "sub" / "b.bin", 3 * PIECE, seed=24)
    cache = tmp_path / "cache"
    ref = f"file://{src_dir}"
    async with running_daemon(cache, **FLAGS) as d, ApiClient(d.api_address) as api:
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        flip_byte(blob_of(cache, model, "sub/b.bin"), 2 * PIECE + 7, 0x5A)

        report = await api.request("POST", "/v1/verify", body={"ref": ref}, long=True)
        assert (report["bad_pieces"], report["repaired_blobs"], report["errors"]) == (1, 1, [])
        assert report["checked_bytes"] == a.stat().st_size + b.stat().st_size
        assert_view_sound(cache, model, "sub/b.bin", b)
        assert_view_sound(cache, model, "a.bin", a)
        assert (await api.request("POST", "/v1/verify", long=True))["bad_pieces"] == 0


async def test_verify_of_a_model_not_on_this_node_is_404_and_a_bad_ref_400(tmp_path: Path) -> None:
    async with running_daemon(tmp_path / "cache", **FLAGS) as d, ApiClient(d.api_address) as api:
        empty = await api.request("POST", "/v1/verify")
        assert (empty["checked_bytes"], empty["bad_pieces"]) == (0, 0)
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/verify", body={"ref": f"file://{tmp_path}/nothing"})
        assert (e.value.status, e.value.code) == (404, "not_found")
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/verify", body={"ref": "ftp://x"})
        assert (e.value.status, e.value.code) == (400, "bad_ref")
