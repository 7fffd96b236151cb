"""The modelscope:// origin against the ModelScope hub double: what is fetched, at which revision,
with which credentials, how a lying listing and a refusal read, and that peers share the bytes.
(Loading the result with the real SDK: test_modelscope_view.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.cluster import cluster, knows_ref_from, metric, token_file  # noqa: F401 - a fixture
from tests.support.cluster import prefetch as cluster_prefetch
from tests.support.hub import random_bytes
from tests.support.modelscope_hub import ModelScopeHub
from tests.support.node import REPO, DaemonProcess, running_daemon
from tests.support.wait import wait_until

FLAGS = {"store.piece_size_bytes": "64K"}
MODEL = "acme/tiny-ms"
PRIVATE = "acme/private-ms"
TOKEN = "ms-daemon-token-0123456789"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama", "hidden_size": 8}',
        "configuration.json": b'{"framework": "pytorch", "task": "text-generation"}',
        "model.safetensors": random_bytes(300_000, seed=1),  # several 64 KiB pieces: ranged reads
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "onnx/model.onnx": random_bytes(20_000, seed=2),
        "README.md": b"# tiny\n",
    }


def daemon(tmp_path: Path, hub: ModelScopeHub, **flags: Any):
    return running_daemon(tmp_path / "cache", **{**FLAGS, "origins.modelscope.endpoint": hub.url, **flags})


async def prefetch(api: ApiClient, ref: str) -> dict[str, Any]:
    model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    assert model["state"] == "ready", model
    return model


async def prefetch_fails(api: ApiClient, ref: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiError) as e:
        await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    status = await api.request("GET", "/v1/models/status", params={"ref": ref})
    assert status["state"] == "failed", status
    return e.value.status, e.value.body


def view_files(model: dict[str, Any]) -> dict[str, bytes]:
    root = Path(model["path"])
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_model_with_include_exclude_fetched_byte_identical(tmp_path: Path) -> None:
    async with ModelScopeHub() as hub:
        hub.add_model(MODEL, model_files())
        want = {p: b for p, b in model_files().items() if p.endswith((".json", ".safetensors"))}
        want.pop("tokenizer/tokenizer.json")
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            ref = f"modelscope://{MODEL}?include=*.json,*.safetensors&exclude=tokenizer/*"
            model = await prefetch(api, ref)
            assert model["ref"] == f"modelscope://{MODEL}@master?include=*.json,*.safetensors&exclude=tokenizer/*"
            assert view_files(model) == want
            total = sum(len(b) for b in want.values())
            assert (model["bytes_total"], hub.counters.file_bytes, model["sources"]["origin"]) == (total,) * 3
            # The revisions and listing calls of the SDK, then ranged reads of the files only.
            assert [hub.counters.requests[k] for k in ("revisions", "commits", "files")] == [1, 1, 1]
            assert hub.counters.requests["file"] > len(want)  # the 300 KB file came in 64 KiB pieces
            assert model["revision"] == hub.models[MODEL].branches["master"]  # the newest of /commits

            # Ready is ready: a second prefetch asks the hub nothing.
            hub.reset()
            again = await prefetch(api, ref)
            assert again["manifest"] == model["manifest"]
            assert sum(hub.counters.requests.values()) == 0


async def test_revision_pinned_at_resolve_branch_moving_changes_nothing(tmp_path: Path) -> None:
    async with ModelScopeHub() as hub:
        first = hub.add_model(MODEL, model_files())
        newer = {**model_files(), "model.safetensors": random_bytes(300_000, seed=9), "config.json": b"{}"}
        # The branch moves right after the daemon listed it, before any byte is read.
        hub.after_listing.append(lambda: hub.commit(MODEL, newer))
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"modelscope://{MODEL}")
            assert view_files(model) == model_files()
            # Every read named the commit the listing gave for the file, never the branch.
            assert hub.counters.file_revisions and set(hub.counters.file_revisions) == {first}

            # Asked to, the node re-resolves the branch and takes the new files.
            body = {"ref": f"modelscope://{MODEL}", "wait": True, "refresh": True}
            fresh = await api.request("POST", "/v1/prefetch", body=body)
            assert fresh["state"] == "ready" and view_files(fresh) == newer, fresh


async def test_a_hub_without_the_commits_call_pins_files_one_by_one(tmp_path: Path) -> None:
    async with ModelScopeHub(commits_api=False) as hub:
        first = hub.add_model(MODEL, model_files())
        hub.after_listing.append(lambda: hub.commit(MODEL, {**model_files(), "config.json": b"{}"}))
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"modelscope://{MODEL}")
            assert model["revision"] == "master"  # no commit to pin to: the name, as listed
            assert view_files(model) == model_files()
            assert set(hub.counters.file_revisions) == {first}


async def test_commit_id_from_revisions_pins_the_model(tmp_path: Path) -> None:
    async with ModelScopeHub(commit_ids=True) as hub:
        hub.add_model(MODEL, model_files())
        tag_commit = hub.add_tag(MODEL, "v1.0")
        hub.commit(MODEL, {**model_files(), "config.json": b'{"v": 2}'})
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"modelscope://{MODEL}@v1.0")
            assert model["revision"] == tag_commit
            assert view_files(model) == model_files()
            status, body = await prefetch_fails(api, f"modelscope://{MODEL}@no-such-branch")
            assert status in (404, 502), body
            assert "no revision 'no-such-branch'" in body["message"] and "v1.0" in body["message"], body


async def test_wrong_sha256_in_listing_fails_the_model_and_exposes_nothing(tmp_path: Path) -> None:
    async with ModelScopeHub() as hub:
        hub.add_model(MODEL, model_files())
        hub.lie_sha256[(MODEL, "model.safetensors")] = "0" * 64
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            _, body = await prefetch_fails(api, f"modelscope://{MODEL}")
            assert "Sha256" in body["message"] and "model.safetensors" in body["message"], body
            status = await api.request("GET", "/v1/models/status", params={"ref": f"modelscope://{MODEL}"})
            assert status["path"] is None
            cache = tmp_path / "cache"
            assert not any((cache / "models").iterdir())
            assert not (cache / "modelscope" / "models").exists() or not any(
                (cache / "modelscope" / "models").rglob("*.safetensors")
            )
            assert body["error"] == "integrity", body
            # The corrupt file never became a blob: no blob holds the lying listing's bytes.
            stored = {p.read_bytes() for p in (cache / "blobs").rglob("*") if p.is_file()}
            assert model_files()["model.safetensors"] not in stored
            assert await metric(d, "cached_prefetch_jobs_total", result="failed") == 1


async def test_private_model_refused_without_token_fetched_with_one(tmp_path: Path) -> None:
    async with ModelScopeHub(token=TOKEN) as hub:
        hub.add_model(PRIVATE, model_files(), private=True)
        async with daemon(tmp_path / "anon", hub) as d, ApiClient(d.api_address) as api:
            status, body = await prefetch_fails(api, f"modelscope://{PRIVATE}")
            assert body["error"] == "origin_denied", body
            assert "MODELSCOPE_API_TOKEN" in body["message"] and "HTTP 401" in body["message"], body
            assert not any((tmp_path / "anon" / "cache" / "models").iterdir())

        token = tmp_path / "ms.token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        hub.reset()
        async with (
            daemon(tmp_path / "tok", hub, **{"origins.modelscope.token_file": str(token)}) as d,
            ApiClient(d.api_address) as api,
        ):
            model = await prefetch(api, f"modelscope://{PRIVATE}")
            assert view_files(model) == model_files()
        # The token went as the SDK sends it: the Bearer header and the m_session_id cookie.
        assert {(b, c) for _, b, c in hub.counters.auth_seen} == {(TOKEN, TOKEN)}


async def test_token_from_environment(tmp_path: Path) -> None:
    async with ModelScopeHub(token=TOKEN) as hub:
        hub.add_model(PRIVATE, model_files(), private=True)
        flags = {**FLAGS, "origins.modelscope.endpoint": hub.url}
        from cached.daemon import Daemon
        from tests.support.node import test_config

        cfg = test_config(tmp_path / "cache", **flags)
        async with Daemon(cfg, env={"MODELSCOPE_API_TOKEN": TOKEN}) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"modelscope://{PRIVATE}")
            assert view_files(model) == model_files()


async def test_unknown_model_is_not_found(tmp_path: Path) -> None:
    async with ModelScopeHub() as hub:
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            _, body = await prefetch_fails(api, "modelscope://acme/nothing-here")
            assert body["error"] == "origin_not_found", body
            assert "HTTP 404" in body["message"] and "does not exist" in body["message"], body


async def test_second_daemon_gets_the_bytes_from_the_first(tmp_path: Path, token_file: Path) -> None:
    async with ModelScopeHub() as hub, contextlib.AsyncExitStack() as stack:
        files = {**model_files(), "model.safetensors": random_bytes(3 << 20, seed=3)}
        hub.add_model(MODEL, files)
        ref = f"modelscope://{MODEL}"
        nodes = await cluster(stack, tmp_path, token_file, "ab", **{"origins.modelscope.endpoint": hub.url})
        a = await cluster_prefetch(nodes["a"], ref)
        total = sum(len(b) for b in files.values())
        assert hub.counters.file_bytes == total
        canonical = f"modelscope://{MODEL}@master"
        await wait_until(lambda: knows_ref_from(nodes["b"], canonical, {"a"}), timeout_s=15, what="b sees a's copy")
        b = await cluster_prefetch(nodes["b"], ref)
        assert view_files(b) == files == view_files(a)
        # The origin was read about once for the cluster: b's bytes came from a.
        assert hub.counters.file_bytes == total
        assert b["sources"] == {"peer": total, "origin": 0}, b["sources"]


async def _cachectl(*args: str, api: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CACHED_API", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cached.cli", "--api", api, *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


async def test_cachectl_prefetch_modelscope_end_to_end(tmp_path: Path) -> None:
    async with ModelScopeHub() as hub:
        hub.add_model(MODEL, model_files())
        node = DaemonProcess(tmp_path, "--modelscope-endpoint", hub.url)
        try:
            await asyncio.to_thread(node.start)
            r = await _cachectl("prefetch", f"modelscope://{MODEL}", "--wait", api=node.api)
            assert r.returncode == 0, r.stderr
            view = Path(r.stdout.strip())
            assert view.is_relative_to(node.cache_dir)
            got = {p.relative_to(view).as_posix(): p.read_bytes() for p in view.rglob("*") if p.is_file()}
            assert got == model_files()
            bad = await _cachectl("prefetch", "modelscope://acme/absent", "--wait", api=node.api)
            assert bad.returncode != 0 and "404" in bad.stderr, bad.stderr
        finally:
            await asyncio.to_thread(node.stop)


async def test_file_reads_follow_the_storage_redirect_without_the_token(tmp_path: Path) -> None:
    token = tmp_path / "ms.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    async with ModelScopeHub(token=TOKEN, storage_redirect=True) as hub:
        hub.add_model(PRIVATE, model_files(), private=True)
        async with (
            daemon(tmp_path, hub, **{"origins.modelscope.token_file": str(token)}) as d,
            ApiClient(d.api_address) as api,
        ):
            model = await prefetch(api, f"modelscope://{PRIVATE}")
            assert view_files(model) == model_files()
        assert hub.counters.requests["storage"] >= len(model_files())
        seen = {kind: set() for kind, _, _ in hub.counters.auth_seen}
        for kind, bearer, cookie in hub.counters.auth_seen:
            seen[kind].add((bearer, cookie))
        # The hub got the token; the storage behind the redirect never did.
        assert seen["file"] == {(TOKEN, TOKEN)} and seen["storage"] == {("", "")}, seen


async def test_server_errors_are_retried_and_counted(tmp_path: Path) -> None:
    async with ModelScopeHub() as hub:
        hub.add_model(MODEL, model_files())
        hub.fail_file.extend([503, 500])
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"modelscope://{MODEL}")
            assert view_files(model) == model_files()
            assert not hub.fail_file
            assert await metric(d, "cached_origin_errors_total", kind="5xx") == 2


def _listing(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"Code": 200, "Data": {"Files": list(entries)}, "Success": True}).encode()


_OK = {"Path": "a.bin", "Name": "a.bin", "Size": 3, "Sha256": "a" * 64, "Type": "blob", "Revision": "b" * 40}


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>busy</html>", "not a JSON object"),
        (json.dumps({"Code": 200, "Data": {"Files": "x"}, "Success": True}).encode(), "Data.Files is not a list"),
        (_listing({**_OK, "Sha256": "not-hex"}), "malformed Sha256"),
        (_listing({**_OK, "Size": -1}), "bad size"),
        (_listing({**_OK, "Path": "../escape"}), "no files at revision"),  # a path with no place on disk
        (json.dumps({"Code": 10010205, "Message": "model gone", "Success": False}).encode(), "model gone"),
    ],
)
async def test_hostile_listing_fails_clearly_and_the_daemon_lives_on(tmp_path: Path, body: bytes, why: str) -> None:
    async with ModelScopeHub() as hub:
        hub.add_model(MODEL, model_files())
        hub.listing_body = body
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            status, answer = await prefetch_fails(api, f"modelscope://{MODEL}")
            assert status < 500 or status == 502, answer
            assert why in answer["message"] and "Traceback" not in answer["message"], answer
            assert await metric(d, "cached_prefetch_jobs_total", result="failed") == 1
            kinds = ("4xx", "5xx", "connection", "other", "throttled")
            assert sum([await metric(d, "cached_origin_errors_total", kind=k) for k in kinds]) >= 1
            hub.listing_body = None
            model = await prefetch(api, f"modelscope://{MODEL}@master?include=config.json")
            assert view_files(model) == {"config.json": model_files()["config.json"]}
