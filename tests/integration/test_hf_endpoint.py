"""``HF_ENDPOINT=<api>/hf``: unmodified clients download through the daemon.

The first client fills the node from the hub; every later client, in a fresh cache of its own, is
served from the node without a byte from upstream. Ranges, headers (never Xet) and errors are what
huggingface_hub 0.36 and 2.x need to raise the right typed exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cached.api.client import ApiClient
from tests.support.hfclients import TINY, VERSIONS, run_client, tiny_model_files
from tests.support.hub import Hub, git_blob_sha1
from tests.support.node import running_daemon
from tests.support.wait import wait_until

FLAGS = {"store.piece_size_bytes": "64K"}
TOKEN = "hf_client_token_ok"
GATED = "acme/gated-model"


def daemon(tmp_path: Path, hub: Hub):
    return running_daemon(tmp_path / "cache", **{**FLAGS, "origins.hf.endpoint": hub.url})


async def node_settled(api: ApiClient) -> bool:
    """Every fetch the endpoint started has finished and is published (a failed one fails the test)."""
    models = await api.request("GET", "/v1/models")
    if not models or any(m["state"] in ("queued", "fetching") for m in models):
        return False
    failed = {m["ref"]: m["error"] for m in models if m["state"] != "ready"}
    assert not failed, f"fetches the endpoint started failed: {failed}"
    return True


DOWNLOAD_CLIENT = """
import os
import huggingface_hub
from huggingface_hub import hf_hub_download, snapshot_download
A = __import__("json").loads(ARGS)
R = A["repo"]

def files_in(snapshot):
    out = {}
    for dirpath, _, names in os.walk(snapshot):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, snapshot)] = sha256_of(p)
    return out

out = {"version": huggingface_hub.__version__}
out["config.json"] = sha256_of(hf_hub_download(R, "config.json"))  # non-LFS
out["model.safetensors"] = sha256_of(hf_hub_download(R, "model.safetensors"))  # LFS
out["snapshot"] = files_in(snapshot_download(R))
if A.get("transformers"):
    from transformers import AutoConfig
    out["autoconfig"] = AutoConfig.from_pretrained(R, cache_dir=os.environ["HF_HUB_CACHE"]).model_type
emit(out)
"""


@pytest.mark.parametrize("version", VERSIONS)
async def test_first_client_fills_the_node_later_clients_read_only_the_node(tmp_path: Path, version: str) -> None:
    # The hub advertises Xet like huggingface.co; clients with hf_xet installed must still get plain HTTP.
    async with Hub(xet_hint=True, tree_xet_hash=True) as hub:
        hub.add_repo(TINY, tiny_model_files())
        files = hub.repo(TINY).resolve("main").files
        want = {p: b.sha256 for p, b in files.items()}
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            endpoint = d.api_address + "/hf"

            first = await run_client(
                f"ARGS = {json.dumps({'repo': TINY})!r}\n" + DOWNLOAD_CLIENT,
                {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "client-1")},
                version,
            )
            assert first["snapshot"] == want
            assert (first["config.json"], first["model.safetensors"]) == (
                want["config.json"],
                want["model.safetensors"],
            )
            # Each file left the hub once, although the client asked for two of them twice.
            assert hub.counters.file_bytes == sum(b.size for b in files.values())
            assert hub.counters.count(kind="xet-token") == 0
            await wait_until(lambda: node_settled(api), timeout_s=30, what="the endpoint's fetches to be published")
            held = await api.request("GET", "/v1/models")
            assert sum(m["bytes_total"] for m in held) == sum(
                b.size for b in files.values()
            )  # the node holds each file once

            hub.reset()
            second = await run_client(
                f"ARGS = {json.dumps({'repo': TINY, 'transformers': True})!r}\n" + DOWNLOAD_CLIENT,
                {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "client-2")},
                version,
            )
            assert second["snapshot"] == want
            assert second["autoconfig"] == "gpt2"
            assert hub.counters.file_bytes == 0, hub.counters.lines
            assert hub.counters.count(kind="resolve") == 0, hub.counters.lines
        assert first["version"].startswith("0.36" if version == "0.36" else "2.")


async def test_range_requests_cold_and_warm(tmp_path: Path) -> None:
    async with Hub() as hub:
        hub.add_repo(TINY, tiny_model_files())
        blob = hub.blob(TINY, "model.safetensors")
        data, size = blob.data, blob.size
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api, aiohttp.ClientSession() as http:
            url = f"{d.api_address}/hf/{TINY}/resolve/main/model.safetensors"

            # Cold: the node does not hold the file yet; the range is streamed as pieces verify.
            async with http.get(url, headers={"Range": "bytes=70000-70099"}) as r:
                assert r.status == 206
                assert r.headers["Content-Range"] == f"bytes 70000-70099/{size}"
                assert r.headers["Content-Length"] == "100"
                assert r.headers["X-Repo-Commit"] == hub.head(TINY)
                assert await r.read() == data[70000:70100]
            await wait_until(lambda: node_settled(api), timeout_s=30, what="the cold fetch to be published")

            hub.reset()
            async with http.get(url, headers={"Range": "bytes=-50"}) as r:
                assert (r.status, r.headers["Content-Range"]) == (206, f"bytes {size - 50}-{size - 1}/{size}")
                assert await r.read() == data[-50:]
            async with http.get(url, headers={"Range": "bytes=10485-"}) as r:
                assert r.status == 206
                assert await r.read() == data[10485:]
            async with http.get(url, headers={"Range": f"bytes={size}-"}) as r:
                assert (r.status, r.headers["Content-Range"]) == (416, f"bytes */{size}")
            async with http.get(url) as r:
                assert (r.status, r.headers["Accept-Ranges"], r.headers["Content-Length"]) == (200, "bytes", str(size))
                assert "Content-Encoding" not in r.headers
                assert await r.read() == data
            assert hub.counters.file_bytes == 0


def assert_no_xet(headers: Any) -> None:
    assert "X-Xet-Hash" not in headers, dict(headers)
    assert "xet" not in headers.get("Link", "").lower(), dict(headers)
    assert not any(k.lower().startswith("x-xet") for k in headers), dict(headers)


async def test_no_xet_on_resolve_tree_or_paths_info(tmp_path: Path) -> None:
    async with Hub(xet_hint=True, tree_xet_hash=True) as hub:
        hub.add_repo(TINY, tiny_model_files())
        commit = hub.head(TINY)
        weights = hub.blob(TINY, "model.safetensors")
        config = hub.blob(TINY, "config.json")
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api, aiohttp.ClientSession() as http:
            base = f"{d.api_address}/hf"
            tree_path = f"/api/models/{TINY}/tree/main?recursive=true&expand=false"
            info_path = f"/api/models/{TINY}/paths-info/{commit}"
            form = [("paths", "model.safetensors"), ("paths", "config.json"), ("expand", "false")]

            # The switches are on: the hub itself does advertise Xet.
            async with http.head(hub.resolve_url(TINY, "model.safetensors")) as r:
                assert "X-Xet-Hash" in r.headers
            async with http.get(hub.url + tree_path) as r:
                assert "xetHash" in await r.text()

            async def check_api(held: bool) -> None:
                async with http.get(base + tree_path) as r:
                    assert r.status == 200
                    entries = await r.json()
                    text = json.dumps(entries)
                assert "xetHash" not in text and "xet_hash" not in text, (held, text)
                by_path = {e["path"]: e for e in entries}
                assert by_path["model.safetensors"]["lfs"]["oid"] == weights.sha256
                assert by_path["config.json"]["oid"] == config.git_oid
                async with http.post(base + info_path, data=form) as r:
                    assert r.status == 200
                    text = await r.text()
                assert "xetHash" not in text and {e["path"] for e in json.loads(text)} == {
                    "model.safetensors",
                    "config.json",
                }

            async def check_resolve(method: str) -> None:
                async with http.request(method, f"{base}/{TINY}/resolve/main/model.safetensors") as r:
                    assert r.status == 200
                    assert_no_xet(r.headers)
                    assert r.headers["X-Repo-Commit"] == commit
                    assert r.headers["ETag"] == r.headers["X-Linked-Etag"] == f'"{weights.sha256}"'
                    assert r.headers["X-Linked-Size"] == r.headers["Content-Length"] == str(weights.size)
                    if method == "GET":
                        assert await r.read() == weights.data
                async with http.request(method, f"{base}/{TINY}/resolve/main/config.json") as r:
                    assert_no_xet(r.headers)
                    assert r.headers["ETag"] == f'"{git_blob_sha1(config.data)}"'
                    assert "X-Linked-Etag" not in r.headers

            await check_api(held=False)  # relayed from upstream
            await check_resolve("HEAD")  # cold
            await check_resolve("GET")
            await api.request("POST", "/v1/prefetch", body={"ref": f"hf://{TINY}", "wait": True})
            await check_api(held=True)  # answered from the node's manifest
            await check_resolve("HEAD")


ERRORS_CLIENT = """
import huggingface_hub
from huggingface_hub import hf_hub_download, snapshot_download, model_info
A = __import__("json").loads(ARGS)
R, OTHER, GATED = A["repo"], A["other"], A["gated"]
out = {"version": huggingface_hub.__version__}
out["missing file, held repo"] = attempt(hf_hub_download, R, "missing.json")
out["missing file, cold repo"] = attempt(hf_hub_download, OTHER, "missing.json")
out["missing repo"] = attempt(hf_hub_download, "acme/does-not-exist", "config.json")
out["missing repo, snapshot"] = attempt(snapshot_download, "acme/does-not-exist")
out["missing repo, info"] = attempt(model_info, "acme/does-not-exist")
out["bad revision, held repo"] = attempt(hf_hub_download, R, "config.json", revision="no-such-branch")
out["bad revision, cold repo"] = attempt(hf_hub_download, OTHER, "config.json", revision="no-such-branch")
out["bad revision, snapshot"] = attempt(snapshot_download, OTHER, revision="no-such-branch")
out["gated, no token"] = attempt(hf_hub_download, GATED, "config.json")
out["gated, no token, snapshot"] = attempt(snapshot_download, GATED)
out["gated, token"] = attempt(lambda: sha256_of(hf_hub_download(GATED, "config.json", token=A["token"])))
emit(out)
"""


@pytest.mark.parametrize("version", VERSIONS)
async def test_errors_raise_the_typed_client_error(
    tmp_path: Path, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)  # the daemon has no token of its own
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    async with Hub(tokens={TOKEN}) as hub:
        hub.add_repo(TINY, tiny_model_files())
        hub.add_repo("acme/other", tiny_model_files(weights_size=1000, seed=2))
        hub.add_repo(GATED, tiny_model_files(weights_size=1000, seed=3), gated=True)
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            await api.request("POST", "/v1/prefetch", body={"ref": f"hf://{TINY}", "wait": True})
            args = {"repo": TINY, "other": "acme/other", "gated": GATED, "token": TOKEN}
            out = await run_client(
                f"ARGS = {json.dumps(args)!r}\n" + ERRORS_CLIENT,
                {"HF_ENDPOINT": d.api_address + "/hf", "HF_HUB_CACHE": str(tmp_path / "client")},
                version,
            )

    expected = {
        "missing file, held repo": "EntryNotFoundError",  # 2.x: RemoteEntryNotFoundError, a subclass
        "missing file, cold repo": "EntryNotFoundError",
        "missing repo": "RepositoryNotFoundError",
        "missing repo, snapshot": "RepositoryNotFoundError",
        "missing repo, info": "RepositoryNotFoundError",
        "bad revision, held repo": "RevisionNotFoundError",
        "bad revision, cold repo": "RevisionNotFoundError",
        "bad revision, snapshot": "RevisionNotFoundError",
        "gated, no token": "GatedRepoError",
        "gated, no token, snapshot": "GatedRepoError",
    }
    for call, cls in expected.items():
        got = out[call]
        assert "error" in got, (call, got)
        assert cls in got["mro"], (call, got)
        # Not "cannot reach the hub": a typed answer, never the offline fallback.
        assert "LocalEntryNotFoundError" not in got["mro"] and "ConnectionError" not in got["mro"], (call, got)
    if version != "0.36":
        assert out["missing file, held repo"]["error"] == "RemoteEntryNotFoundError"
    # A caller's own token is passed upstream on a miss.
    assert out["gated, token"] == {"ok": hub.blob(GATED, "config.json").sha256}


# --- the passthrough lends no token and forwards no '..' (issue 18) ---------------------------------

DAEMON_TOKEN = "hf_daemon_token_secret"


async def test_passthrough_sends_the_callers_token_never_the_daemons(tmp_path: Path) -> None:
    """Before: every cold call through /hf went upstream with the daemon's own HF token, so any
    local caller could read gated repos as the operator. Now the hub sees the caller's token (or
    none), and the daemon's only for repos the operator lends it to."""
    (tmp_path / "hf.token").write_text(DAEMON_TOKEN)
    async with Hub(tokens={DAEMON_TOKEN, TOKEN}) as hub:
        hub.add_repo(GATED, tiny_model_files(weights_size=10_000, seed=5), gated=True)
        hub.add_repo("lent/model", tiny_model_files(weights_size=10_000, seed=6), gated=True)
        flags = {
            **FLAGS,
            "origins.hf.endpoint": hub.url,
            "origins.hf.token_file": str(tmp_path / "hf.token"),
            "origins.hf.lend_token_to": ["lent"],
        }
        async with running_daemon(tmp_path / "cache", **flags) as d, aiohttp.ClientSession() as s:
            base = d.api_address + "/hf"
            calls = [
                f"/api/models/{GATED}",
                f"/api/models/{GATED}/revision/main",
                f"/api/models/{GATED}/tree/main",
                f"/{GATED}/resolve/main/config.json",
            ]
            for path in calls:
                async with s.get(base + path) as resp:
                    assert resp.status in (401, 403), (path, resp.status)
            assert hub.counters.log and all(r.token is None for r in hub.counters.log), hub.counters.log
            for path in calls[:3]:
                seen = len(hub.counters.log)
                async with s.get(base + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    assert resp.status == 200, (path, resp.status, await resp.text())
                assert {r.token for r in hub.counters.log[seen:]} == {TOKEN}, path
            async with s.get(base + "/api/models/lent/model") as resp:
                assert resp.status == 200, "the operator lends the daemon's token to this org"
            assert {r.token for r in hub.counters.log if "lent/model" in r.target} == {DAEMON_TOKEN}
            assert not [r for r in hub.counters.log if r.token == DAEMON_TOKEN and "lent/" not in r.target]
            # A cold /resolve: the lookups go with the caller's token; only once the hub has
            # said yes to the caller does the node fetch the file (with its own token) for it.
            seen = len(hub.counters.log)
            async with s.get(base + calls[3], headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200
            lookups = [r for r in hub.counters.log[seen:] if r.kind in ("info", "paths-info")]
            assert lookups and {r.token for r in lookups} == {TOKEN}, lookups


async def test_dot_dot_segments_are_400_and_never_reach_the_hub(tmp_path: Path) -> None:
    async with Hub() as hub:
        hub.add_repo("acme/public", tiny_model_files(weights_size=10_000, seed=7))
        async with daemon(tmp_path, hub) as d:
            host, port = d.api_address.removeprefix("http://").rsplit(":", 1)
            targets = [
                b"/hf/api/models/acme/public/tree/main/../../../../api/whoami-v2",
                b"/hf/api/models/acme/public/tree/main/%2E%2E/%2e%2e/x",
                b"/hf/api/models/acme/public/revision/..",
                b"/hf/api/models/acme/public/tree/%2E%2E",
                b"/hf/api/models/acme/public/revision/a%2F..%2F..",
                b"/hf/acme/public/resolve/main/../../../secret",
                b"/hf/acme/public/resolve/main/a/%2E%2E/b",
                b"/hf/acme/public/resolve/..%2F..%2Fx/config.json",
            ]
            for target in targets:
                reader, writer = await __import__("asyncio").open_connection(host, int(port))
                writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                answer = await reader.read()
                writer.close()
                status = int(answer.split(b" ", 2)[1])
                assert status in (400, 404), (target, answer[:300])
            assert not [r.target for r in hub.counters.log if ".." in r.target or "%2e" in r.target.lower()], (
                hub.counters.log
            )
            async with (
                aiohttp.ClientSession() as s,
                s.get(d.api_address + "/hf/api/models/acme/public/tree/main") as resp,
            ):
                assert resp.status == 200, "ordinary paths still pass"
