"""The hf:// origin against the hub double: what is fetched, from where, with which credentials,
and how a refusal reads. (Loading the result with the real client: test_hf_view.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.hfclients import TINY, tiny_model_files
from tests.support.hub import Hub
from tests.support.node import running_daemon

FLAGS = {"store.piece_size_bytes": "64K"}
TOKEN = "hf_daemon_token_ok"
GATED = "acme/gated-model"


def daemon(tmp_path: Path, hub: Hub, **flags: Any):
    return running_daemon(tmp_path / "cache", **{**FLAGS, "origins.hf.endpoint": hub.url, **flags})


async def prefetch(api: ApiClient, ref: str, **body: Any) -> dict[str, Any]:
    model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True, **body})
    assert model["state"] == "ready", model
    return model


async def prefetch_fails(api: ApiClient, ref: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiError) as e:
        await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    status = await api.request("GET", "/v1/models/status", params={"ref": ref})
    assert status["state"] == "failed", status
    assert status["error"] == e.value.body.get("message"), (status, e.value.body)
    return e.value.status, e.value.body


def snapshot_files(model: dict[str, Any]) -> dict[str, bytes]:
    snap = Path(model["snapshot_path"])
    return {p.relative_to(snap).as_posix(): p.read_bytes() for p in sorted(snap.rglob("*")) if not p.is_dir()}


def hub_files(hub: Hub, repo: str = TINY, rev: str = "main") -> dict[str, bytes]:
    return {p: b.data for p, b in hub.repo(repo).resolve(rev).files.items()}


async def test_prefetch_fetches_every_file_once_byte_identical(tmp_path: Path) -> None:
    async with Hub() as hub:
        hub.add_repo(TINY, tiny_model_files())
        want = hub_files(hub)
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"hf://{TINY}@main")
            assert model["revision"] == hub.head(TINY)
            assert snapshot_files(model) == want
            view = Path(model["path"])
            assert {p: (view / p).read_bytes() for p in want} == want
            total = sum(len(b) for b in want.values())
            assert (model["bytes_total"], hub.counters.file_bytes, model["sources"]["origin"]) == (total, total, total)
            assert hub.counters.count(kind="xet-token") == 0

            # Ready is ready: a second prefetch asks the hub nothing.
            hub.reset()
            again = await prefetch(api, f"hf://{TINY}")
            assert again["manifest"] == model["manifest"]
            assert hub.counters.requests == 0


async def test_xet_hints_and_paged_tree_from_upstream(tmp_path: Path) -> None:
    # huggingface.co advertises Xet; the daemon speaks plain HTTP and follows tree pages.
    async with Hub(xet_hint=True, tree_xet_hash=True, tree_page_size=2) as hub:
        files = {**tiny_model_files(), "tokenizer.json": b'{"model": {}}', "extra/b.bin": b"\x01" * 70_000}
        hub.add_repo(TINY, files)
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"hf://{TINY}")
            assert snapshot_files(model) == hub_files(hub)
        assert hub.counters.count(kind="tree") >= 4  # 8 entries (2 dirs), 2 per page
        assert hub.counters.count(kind="xet-token") == 0


async def test_include_and_exclude_fetch_only_matching_files(tmp_path: Path) -> None:
    async with Hub() as hub:
        files = {**tiny_model_files(), "tokenizer.json": b'{"model": {}}', "pytorch_model.bin": b"\x02" * 100_000}
        hub.add_repo(TINY, files)
        data = hub_files(hub)
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            # Patterns in the ref's query.
            jsons = await prefetch(api, f"hf://{TINY}@main?include=*.json")
            assert jsons["ref"] == f"hf://{TINY}@main?include=*.json"
            assert sorted(snapshot_files(jsons)) == ["config.json", "tokenizer.json"]
            assert hub.counters.file_bytes == len(data["config.json"]) + len(data["tokenizer.json"])
            refs_main = Path(jsons["hf_path"]) / "models--acme--tiny-model" / "refs" / "main"
            assert refs_main.read_text() == hub.head(TINY)

            # Patterns in the request body; files already held are not fetched again.
            hub.reset()
            light = await prefetch(api, f"hf://{TINY}@main", exclude=["*.bin", "*.safetensors"])
            assert light["ref"] == f"hf://{TINY}@main?exclude=*.bin,*.safetensors"
            expect = [".gitattributes", "config.json", "nested/notes.txt", "tokenizer.json"]
            assert sorted(p for p in data if p in expect) == expect
            assert sorted(snapshot_files(light)) == expect
            assert hub.counters.file_bytes == len(data[".gitattributes"]) + len(data["nested/notes.txt"])

            hub.reset()
            weights = await prefetch(api, f"hf://{TINY}", include=["*.safetensors"], exclude=["nested/*"])
            assert sorted(f for f in Path(weights["path"]).rglob("*") if f.is_file()) == [
                Path(weights["path"]) / "model.safetensors"
            ]
            assert hub.counters.file_bytes == len(data["model.safetensors"])

            status, body = await prefetch_fails(api, f"hf://{TINY}?include=*.gguf")
            assert status == 404
            assert "match the include/exclude patterns" in body["message"]


async def test_lfs_via_cdn_redirect_token_stays_with_the_hub(tmp_path: Path) -> None:
    token_file = tmp_path / "hf-token"
    token_file.write_text(TOKEN + "\n")
    async with Hub(tokens={TOKEN}, lfs_mode="redirect_cdn") as hub:
        hub.add_repo(GATED, tiny_model_files(), gated=True)
        data = hub_files(hub, GATED)
        lfs = sum(len(b.data) for b in hub.repo(GATED).resolve("main").files.values() if b.lfs)
        async with (
            daemon(tmp_path, hub, **{"origins.hf.token_file": str(token_file)}) as d,
            ApiClient(d.api_address) as api,
        ):
            model = await prefetch(api, f"hf://{GATED}")
            assert snapshot_files(model) == data
    c = hub.counters
    assert c.cdn_bytes_sent == lfs > 0  # LFS bytes came from the CDN ...
    assert c.bytes_sent == sum(len(b) for b in data.values()) - lfs  # ... the rest from the hub
    assert c.cdn_requests > 0 and c.cdn_auth_requests == 0  # and the CDN never saw the token
    assert c.auth_requests == c.requests  # every hub request carried it


async def test_expired_cdn_url_is_asked_for_again(tmp_path: Path) -> None:
    async with Hub(lfs_mode="redirect_cdn") as hub:
        hub.add_repo(TINY, tiny_model_files())
        hub.cdn_fail_first = 1  # the signed URL has expired: 403 from the bucket
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"hf://{TINY}")
            assert snapshot_files(model) == hub_files(hub)
        refused = [r for r in hub.counters.log if r.server == "cdn" and r.status == 403]
        assert len(refused) == 1


async def test_transient_hub_errors_are_retried(tmp_path: Path) -> None:
    async with Hub() as hub:
        hub.add_repo(TINY, tiny_model_files())
        hub.fail_first, hub.fail_status = 2, 503
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"hf://{TINY}")
            assert snapshot_files(model) == hub_files(hub)
        assert [r.status for r in hub.counters.log[:2]] == [503, 503]


@pytest.mark.parametrize("how", ["HF_TOKEN", "token_file"])
async def test_gated_repo_with_the_daemons_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    flags: dict[str, Any] = {}
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if how == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        (tmp_path / "token").write_text(TOKEN)
        flags["origins.hf.token_file"] = str(tmp_path / "token")
    async with Hub(tokens={TOKEN}) as hub:
        hub.add_repo(GATED, tiny_model_files(), gated=True)
        async with daemon(tmp_path, hub, **flags) as d, ApiClient(d.api_address) as api:
            model = await prefetch(api, f"hf://{GATED}")
            assert snapshot_files(model) == hub_files(hub, GATED)


async def test_gated_repo_without_a_token_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    async with Hub(tokens={TOKEN}) as hub:
        hub.add_repo(GATED, tiny_model_files(), gated=True)
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            status, body = await prefetch_fails(api, f"hf://{GATED}")
    assert (status, body["error"]) == (403, "origin_denied")
    assert "gated" in body["message"] and "token" in body["message"], body
    assert hub.counters.file_bytes == 0


async def test_missing_repo_and_bad_revision_fail_clearly(tmp_path: Path) -> None:
    async with Hub() as hub:
        hub.add_repo(TINY, tiny_model_files())
        async with daemon(tmp_path, hub) as d, ApiClient(d.api_address) as api:
            status, body = await prefetch_fails(api, "hf://acme/does-not-exist")
            assert (status, body["error"]) == (404, "origin_not_found")
            assert "RepoNotFound" in body["message"] and "no such repo" in body["message"], body

            status, body = await prefetch_fails(api, f"hf://{TINY}@no-such-branch")
            assert (status, body["error"]) == (404, "origin_not_found")
            assert "RevisionNotFound" in body["message"], body

            # The failures left the good revision fetchable and nothing half-made in the view.
            hf = tmp_path / "cache" / "hf"
            assert not hf.exists() or list(hf.iterdir()) == []
            await prefetch(api, f"hf://{TINY}")
