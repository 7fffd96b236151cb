"""Repos pulled only through ``/hf`` are models: one ``hf://org/m@<commit>`` per repo and commit.

A launcher that never calls ``cachectl prefetch`` (``HF_ENDPOINT`` at the node, the real
huggingface_hub client) leaves the node with one model per repo and commit -- partial until it
holds every file -- that ``ls``/``status``/``path``/``evict`` know, and an ``hf/`` view with
``refs/main`` and every file the client pulled, including a file whose bytes another repo already
brought (no second fetch, still in this repo's snapshot), so ``HF_HUB_OFFLINE=1`` loads it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient
from tests.support.hfclients import TINY, VERSIONS, run_client, tiny_model_files
from tests.support.hub import Hub
from tests.support.node import REPO, running_daemon
from tests.support.wait import wait_until

FLAGS = {"store.piece_size_bytes": "64K"}
OTHER = "acme/other-model"  # shares model.safetensors' bytes with TINY


async def settled(api: ApiClient) -> bool:
    models = await api.request("GET", "/v1/models")
    return bool(models) and not any(m["state"] in ("queued", "fetching") for m in models)


async def cachectl(api_address: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cached.cli",
        "--api",
        api_address,
        *args,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


PULL = """
from huggingface_hub import hf_hub_download
A = __import__("json").loads(ARGS)
emit({p: sha256_of(hf_hub_download(A["repo"], p)) for p in A["paths"]})
"""

OFFLINE_LOAD = """
import os
from huggingface_hub import hf_hub_download, snapshot_download
from transformers import AutoConfig
A = __import__("json").loads(ARGS)
out = {p: sha256_of(hf_hub_download(A["repo"], p)) for p in A["paths"]}
snap = snapshot_download(A["repo"], allow_patterns=A["paths"])
out["snapshot"] = sorted(
    os.path.relpath(os.path.join(d, n), snap) for d, _, names in os.walk(snap) for n in names
)
out["model_type"] = AutoConfig.from_pretrained(A["repo"]).model_type
emit(out)
"""


def args(**kw: Any) -> str:
    return f"ARGS = {json.dumps(kw)!r}\n"


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_repo_pulled_through_hf_is_one_model(tmp_path: Path, version: str) -> None:
    files = tiny_model_files()
    async with Hub() as hub:
        commit = hub.add_repo(TINY, files)
        hub.add_repo(OTHER, {"model.safetensors": files["model.safetensors"], "config.json": b"{}\n"})
        want = {p: b.sha256 for p, b in hub.repo(TINY).resolve("main").files.items()}
        async with (
            running_daemon(tmp_path / "cache", **FLAGS, **{"origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            env = {"HF_ENDPOINT": d.api_address + "/hf"}
            # OTHER first: its weights' bytes are then on the node before TINY asks for them.
            await run_client(
                args(repo=OTHER, paths=["model.safetensors"]) + PULL,
                {**env, "HF_HUB_CACHE": str(tmp_path / "c0")},
                version,
            )
            await wait_until(lambda: settled(api), timeout_s=30, what="OTHER's pull to be published")
            hub.reset()
            pulled = ["config.json", "model.safetensors"]
            got = await run_client(
                args(repo=TINY, paths=pulled) + PULL, {**env, "HF_HUB_CACHE": str(tmp_path / "c1")}, version
            )
            assert got == {p: want[p] for p in pulled}
            assert hub.counters.count(kind="resolve") == 1, (
                hub.counters.lines
            )  # config.json only: the weights were here
            await wait_until(lambda: settled(api), timeout_s=30, what="TINY's pull to be published")

            ref = f"hf://{TINY}@{commit}"
            models = {m["ref"]: m for m in await api.request("GET", "/v1/models")}
            tiny = [r for r in models if TINY in r]
            assert tiny == [ref], models.keys()  # one model, no per-file refs
            m = models[ref]
            assert m["state"] == "ready" and m["partial"] is True
            assert m["files_held"] == pulled
            assert m["files_missing"] == [".gitattributes", "nested/notes.txt"]

            rc, out, err = await cachectl(d.api_address, "path", ref)
            assert rc == 0, err
            assert sorted(p.name for p in Path(out.strip()).iterdir()) == pulled
            # The name a user knows the repo by answers for the commit /hf pulled (the branch's
            # last resolution), in status, path and locate; plain status lists what it holds.
            for name in (f"hf://{TINY}", f"hf://{TINY}@main"):
                assert (await api.request("GET", "/v1/models/status", params={"ref": name}))["ref"] == ref
                rc, branch_path, err = await cachectl(d.api_address, "path", name)
                assert (rc, branch_path) == (0, out), err
                assert (await api.request("GET", "/v1/locate", params={"ref": name}))["ref"] == ref
            rc, plain, err = await cachectl(d.api_address, "status", f"hf://{TINY}")
            assert rc == 0, err
            assert "partial" in plain and all(f in plain for f in pulled + [".gitattributes", "nested/notes.txt"]), (
                plain
            )

            # The hub-cache view: refs/main (the branch the client asked for) and both files.
            hf_root = Path(m["hf_path"])
            folder = hf_root / "models--acme--tiny-model"
            assert (folder / "refs" / "main").read_text() == commit
            assert sorted(p.name for p in (folder / "snapshots" / commit).iterdir()) == pulled
            offline = await run_client(
                args(repo=TINY, paths=pulled) + OFFLINE_LOAD,
                {"HF_HUB_CACHE": str(hf_root), "HF_HUB_OFFLINE": "1"},
                version,
            )
            assert {p: offline[p] for p in pulled} == {p: want[p] for p in pulled}
            assert offline["snapshot"] == pulled and offline["model_type"] == "gpt2"

            # A prefetch of the partial model fetches the rest (the files held are reused).
            hub.reset()
            done = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
            assert done["state"] == "ready" and "partial" not in done and done["files"] == 4
            assert hub.counters.file_bytes == len(files["nested/notes.txt"]) + hub.blob(TINY, ".gitattributes").size

            rc, out, err = await cachectl(d.api_address, "evict", ref)
            assert rc == 0, err
            assert (await api.request("GET", "/v1/models/status", params={"ref": ref}))["state"] == "absent"
            assert not folder.exists()
            assert [r for r in (await api.request("GET", "/v1/models")) if TINY in r["ref"]] == []


async def test_prefetch_on_pull_fetches_the_whole_commit(tmp_path: Path) -> None:
    async with Hub() as hub:
        commit = hub.add_repo(TINY, tiny_model_files())
        flags = {**FLAGS, "origins.hf.endpoint": hub.url, "origins.hf.prefetch_on_pull": True}
        async with running_daemon(tmp_path / "cache", **flags) as d, ApiClient(d.api_address) as api:
            await run_client(
                args(repo=TINY, paths=["config.json"]) + PULL,
                {"HF_ENDPOINT": d.api_address + "/hf", "HF_HUB_CACHE": str(tmp_path / "c")},
            )
            ref = f"hf://{TINY}@{commit}"

            async def whole() -> bool:
                m = await api.request("GET", "/v1/models/status", params={"ref": ref})
                return m["state"] == "ready" and "partial" not in m and m["files"] == 4

            await wait_until(whole, timeout_s=30, what="the background prefetch of the whole commit")
            assert [m["ref"] for m in await api.request("GET", "/v1/models")] == [ref]
