"""With the upstream hub down, ``/hf`` answers what the node holds from the store.

A launcher restarted during a hub outage (vLLM, transformers) asks for the branch again: the node
answers revision, tree, paths-info and resolve calls for what it holds, naming the commit the branch
last resolved to and marking each such answer ``X-Cached-Offline: 1``. It still holds after the
daemon itself restarts (what each branch resolved to is kept on disk). What the node does not hold
is refused with a 502, never invented.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from cached.api.client import ApiClient
from tests.support.hfclients import TINY, VERSIONS, run_client, tiny_model_files
from tests.support.hub import Hub
from tests.support.node import running_daemon
from tests.support.wait import wait_until

FLAGS = {"store.piece_size_bytes": "64K"}
PARTIAL = "acme/partly-here"

ONLINE = """
from huggingface_hub import hf_hub_download, snapshot_download
A = __import__("json").loads(ARGS)
snapshot_download(A["repo"])  # all of TINY
hf_hub_download(A["partial"], "config.json")  # one file of PARTIAL
emit({})
"""

CLIENT = """
import os
from huggingface_hub import hf_hub_download, snapshot_download
from transformers import AutoConfig
A = __import__("json").loads(ARGS)
snap = snapshot_download(A["repo"])
out = {
    os.path.relpath(os.path.join(d, n), snap): sha256_of(os.path.join(d, n))
    for d, _, names in os.walk(snap) for n in names
}
out["model_type"] = AutoConfig.from_pretrained(A["repo"], cache_dir=os.environ["HF_HUB_CACHE"]).model_type
out["partial_held"] = attempt(lambda: sha256_of(hf_hub_download(A["partial"], "config.json")))
if A.get("absent"):  # the client retries a 502 with backoff: asked once, not on every run
    out["partial_absent"] = attempt(lambda: hf_hub_download(A["partial"], "model.safetensors"))
emit(out)
"""


async def settled(api: ApiClient) -> bool:
    models = await api.request("GET", "/v1/models")
    return bool(models) and not any(m["state"] in ("queued", "fetching") for m in models)


@pytest.mark.parametrize("version", VERSIONS)
async def test_snapshot_download_and_autoconfig_succeed_while_the_hub_is_down(tmp_path: Path, version: str) -> None:
    files = tiny_model_files()
    hub = Hub()
    await hub.start()
    try:
        commit = hub.add_repo(TINY, files)
        hub.add_repo(PARTIAL, tiny_model_files(seed=7))
        want = {p: b.sha256 for p, b in hub.repo(TINY).resolve("main").files.items()}
        partial_config = hub.repo(PARTIAL).resolve("main").files["config.json"].sha256
        cache = tmp_path / "cache"
        argv = f"ARGS = {json.dumps({'repo': TINY, 'partial': PARTIAL})!r}\n"
        argv_absent = f"ARGS = {json.dumps({'repo': TINY, 'partial': PARTIAL, 'absent': True})!r}\n"
        async with (
            running_daemon(cache, **FLAGS, **{"origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            env = {"HF_ENDPOINT": d.api_address + "/hf"}
            online = await run_client(argv + ONLINE, {**env, "HF_HUB_CACHE": str(tmp_path / "online")}, version)
            assert online == {}
            await wait_until(lambda: settled(api), timeout_s=30, what="the pulls to be published")

            await hub.stop()  # the outage
            got = await run_client(argv_absent + CLIENT, {**env, "HF_HUB_CACHE": str(tmp_path / "during")}, version)
            assert {p: got[p] for p in want} == want
            assert got["model_type"] == "gpt2"
            assert got["partial_held"] == {"ok": partial_config}
            assert "error" in got["partial_absent"]  # not held, hub down: refused, not invented

            async with aiohttp.ClientSession() as http:
                async with http.get(f"{d.api_address}/hf/api/models/{TINY}/revision/main") as r:
                    assert r.status == 200 and r.headers["X-Cached-Offline"] == "1"
                    assert (await r.json())["sha"] == commit
                async with http.head(f"{d.api_address}/hf/{TINY}/resolve/main/config.json") as r:
                    assert r.status == 200 and r.headers["X-Cached-Offline"] == "1"
                    assert r.headers["X-Repo-Commit"] == commit
                async with http.get(f"{d.api_address}/hf/{PARTIAL}/resolve/main/model.safetensors") as r:
                    assert r.status == 502

        # The daemon restarts during the outage too: the branch's last commit was kept on disk.
        async with running_daemon(cache, **FLAGS, **{"origins.hf.endpoint": hub.url}) as d:
            env = {"HF_ENDPOINT": d.api_address + "/hf"}
            again = await run_client(argv + CLIENT, {**env, "HF_HUB_CACHE": str(tmp_path / "after")}, version)
            assert {p: again[p] for p in want} == want and again["model_type"] == "gpt2"
    finally:
        await hub.stop()
