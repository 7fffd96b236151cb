"""The ``modelscope/`` view read by the real ModelScope SDK (``modelscope`` from PyPI) offline:
``MODELSCOPE_CACHE=<model's modelscope_path>`` and ``snapshot_download(..., local_files_only=True)``.

The SDK runs in a child process with ``MODELSCOPE_ENDPOINT`` at a closed loopback port and an empty
``HOME`` (no stored login), so a network attempt would fail rather than reach a public hub."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient
from tests.support.modelscope_hub import ModelScopeHub
from tests.support.node import running_daemon

pytest.importorskip("modelscope", reason="the modelscope SDK (pip install modelscope, the test extra) is not installed")

FLAGS = {"store.piece_size_bytes": "64K"}
MODEL = "acme/tiny.ms-v0.5"  # a dot in the name: the SDK's folder keeps it (org--name)
FILES = {
    "config.json": b'{"model_type": "llama", "hidden_size": 8}',
    "configuration.json": b'{"framework": "pytorch", "task": "text-generation"}',
    "weights/model.safetensors": os.urandom(100_000),
}

LOAD = """
import json, sys
from modelscope import snapshot_download
from modelscope.hub.file_download import model_file_download
model_id, revision = sys.argv[1], sys.argv[2] or None
root = snapshot_download(model_id, revision=revision, local_files_only=True)
one = model_file_download(model_id, "config.json", revision=revision, local_files_only=True)
print(json.dumps({"root": root, "config": open(one).read()}))
"""


def sdk_load(cache: str, model_id: str, revision: str | None, home: Path) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "MODELSCOPE_CACHE": cache,
        "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",  # never the public hub
    }
    r = subprocess.run(
        [sys.executable, "-c", LOAD, model_id, revision or ""], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


async def prefetch(api: ApiClient, ref: str) -> dict[str, Any]:
    model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    assert model["state"] == "ready", model
    return model


async def test_sdk_loads_the_model_offline_from_the_view(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    async with ModelScopeHub(commit_ids=True) as hub:
        hub.add_model(MODEL, FILES)
        tag = hub.add_tag(MODEL, "v1.0")
        hub.commit(MODEL, {**FILES, "config.json": b'{"model_type": "llama", "hidden_size": 16}'})
        async with (
            running_daemon(tmp_path / "cache", **{**FLAGS, "origins.modelscope.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            master = await prefetch(api, f"modelscope://{MODEL}")
            old = await prefetch(api, f"modelscope://{MODEL}@v1.0")
            cache = master["modelscope_path"]
            assert cache == old["modelscope_path"] == str(tmp_path / "cache" / "modelscope")

            # No revision: the SDK takes snapshots/master, as it would after downloading it.
            got = await asyncio.to_thread(sdk_load, cache, MODEL, None, home)
            assert json.loads(got["config"])["hidden_size"] == 16
            root = Path(got["root"])
            assert root == Path(cache) / "models" / "acme--tiny.ms-v0.5" / "snapshots" / "master"
            assert (root / "weights/model.safetensors").read_bytes() == FILES["weights/model.safetensors"]

            # A tag, and the commit it was pinned to, each have their snapshot.
            for rev in ("v1.0", tag):
                got = await asyncio.to_thread(sdk_load, cache, MODEL, rev, home)
                assert json.loads(got["config"])["hidden_size"] == 8, rev
                assert Path(got["root"]).name == rev

            # The view's files are the store's blobs (hardlinks), not copies.
            blob = Path(master["path"]) / "weights/model.safetensors"
            assert os.path.samefile(blob, root / "weights/model.safetensors")

            # Evicted: the revision's snapshot goes with it; the other stays.
            await api.request("POST", "/v1/evict", body={"ref": f"modelscope://{MODEL}@v1.0"})
            snaps = Path(cache) / "models" / "acme--tiny.ms-v0.5" / "snapshots"
            assert sorted(p.name for p in snaps.iterdir()) == sorted(["master", master["revision"]])
            assert master["revision"] == hub.models[MODEL].branches["master"]


async def test_view_rebuilt_at_start_and_stale_folders_removed(tmp_path: Path) -> None:
    async with ModelScopeHub() as hub:
        hub.add_model(MODEL, FILES)
        flags = {**FLAGS, "origins.modelscope.endpoint": hub.url}
        async with running_daemon(tmp_path / "cache", **flags) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"modelscope://{MODEL}")
        cache = Path(model["modelscope_path"])
        snap = cache / "models" / "acme--tiny.ms-v0.5" / "snapshots" / "master"
        # A crash lost a file of the view and left a folder no ref names.
        (snap / "config.json").unlink()
        stale = cache / "models" / "acme--gone"
        (stale / "snapshots" / "master").mkdir(parents=True)
        async with running_daemon(tmp_path / "cache", **flags):
            assert (snap / "config.json").read_bytes() == FILES["config.json"]
            assert not stale.exists()
