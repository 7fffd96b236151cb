"""The Hugging Face hub double is faithful: the REAL huggingface_hub client, run in subprocesses with
HF_ENDPOINT pointed at it, downloads, lists and fails exactly as it does against huggingface.co
(design: /work/shared/design/HF.md §4, §7.2, §10). Raw-HTTP checks pin the wire details."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.hub import Hub, git_blob_sha1, lfs_pointer, random_bytes

ROOT = Path(__file__).resolve().parents[2]
_VENV_PY = ROOT / ".venv" / "bin" / "python"
PY = str(_VENV_PY) if _VENV_PY.exists() else sys.executable
REPO = "acme/tiny-model"
TOKEN = "hf_test_ok"

CONFIG_V1 = b'{"model_type": "gpt2", "n_layer": 2}\n'
CONFIG_V2 = b'{"model_type": "gpt2", "n_layer": 4}\n'
WEIGHTS_V1 = random_bytes(4096 + 17, seed=1)
WEIGHTS_V2 = random_bytes(5000, seed=2)
NOTES = b"release notes\n"
NOTES_PR = b"notes from a pull request\n"

# Every client script starts with this: helpers to run a call and report a result or the exception type.
PRELUDE = r"""
import hashlib, json, os, sys, traceback
import huggingface_hub as hh
from huggingface_hub import HfApi, hf_hub_download, list_repo_files, model_info, snapshot_download
OUT = {}
def sha(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
def attempt(name, fn):
    try:
        OUT[name] = {"ok": fn()}
    except Exception as e:
        OUT[name] = {"error": [c.__name__ for c in type(e).__mro__], "msg": str(e)[:300]}
def fetch(*a, **kw):
    p = hf_hub_download(*a, **kw)
    return {"path": p, "sha256": sha(p), "blob": os.path.basename(os.path.realpath(p))}
def dl(name, *a, **kw):
    attempt(name, lambda: fetch(*a, **kw))
"""
EPILOGUE = "\nprint(json.dumps(OUT, default=str))\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def client_env(hub: Hub, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(cache),
        HF_HOME=str(cache.parent / (cache.name + "-home")),  # no stored token, no harness cache
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,127.0.0.2,localhost",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


async def run_client(hub: Hub, cache: Path, script: str, **env: str) -> dict[str, Any]:
    """Run ``script`` with the real huggingface_hub in a subprocess; return its JSON results."""
    proc = await asyncio.create_subprocess_exec(
        PY,
        "-c",
        PRELUDE + script + EPILOGUE,
        env=client_env(hub, cache, **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def ok(result: dict[str, Any]) -> Any:
    assert "ok" in result, result
    return result["ok"]


def err(result: dict[str, Any]) -> list[str]:
    assert "error" in result, result
    return result["error"]


class Tiny:
    """acme/tiny-model: c1 (tag v1.0) ← c2 (main) ← c3 (refs/pr/1)."""

    def __init__(self, hub: Hub) -> None:
        self.c1 = hub.add_repo(
            REPO,
            {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1, "nested/notes.txt": NOTES},
            tags=("v1.0",),
        )
        self.c2 = hub.commit(REPO, {"config.json": CONFIG_V2, "model.safetensors": WEIGHTS_V2})
        self.c3 = hub.commit(REPO, {"nested/notes.txt": NOTES_PR}, branch="pr-work")
        hub.add_ref(REPO, "refs/pr/1", self.c3)
        del hub.repo(REPO).branches["pr-work"]


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with Hub(tokens={TOKEN}) as h:
        yield h


@pytest.fixture
def tiny(hub: Hub) -> Tiny:
    return Tiny(hub)


# --------------------------------------------------------------------------------------------------
# the real client


async def test_hf_hub_download_by_branch_tag_commit_and_pr(hub: Hub, tiny: Tiny, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cases = [("main", tiny.c2), ("v1.0", tiny.c1), (tiny.c1, tiny.c1), ("refs/pr/1", tiny.c3)]
    script = "".join(
        f"dl({f'{rev}:{f}'!r}, {REPO!r}, {f!r}, revision={rev!r})\n"
        for rev, _ in cases
        for f in ("config.json", "model.safetensors", "nested/notes.txt")
    )
    out = await run_client(hub, cache, script)
    for rev, commit in cases:
        for f in ("config.json", "model.safetensors", "nested/notes.txt"):
            got = ok(out[f"{rev}:{f}"])
            blob = hub.blob(REPO, f, commit)
            assert got["sha256"] == blob.sha256, (rev, f)
            assert got["blob"] == blob.etag  # sha256 for LFS, git blob sha1 otherwise
            assert f"/snapshots/{commit}/{f}" in got["path"]
    assert hub.blob(REPO, "model.safetensors").etag == sha256(WEIGHTS_V2)
    assert hub.blob(REPO, "config.json").etag == git_blob_sha1(CONFIG_V2)
    refs = cache / "models--acme--tiny-model" / "refs"
    assert (refs / "main").read_text() == tiny.c2  # 40 hex, no newline
    assert (refs / "v1.0").read_text() == tiny.c1
    assert (refs / "refs" / "pr" / "1").read_text() == tiny.c3
    lines = hub.counters.lines
    assert "HEAD /acme/tiny-model/resolve/refs%2Fpr%2F1/nested/notes.txt" in lines
    assert "GET /acme/tiny-model/resolve/refs%2Fpr%2F1/nested/notes.txt" in lines
    assert not any(f"/resolve/{tiny.c1}/" in line for line in lines)  # the commit was cached via the tag
    assert hub.counters.count("GET", "harness") == 0  # telemetry off

    # Move main: the same cache now resolves main to the new commit, unchanged files keep their blob.
    c4 = hub.commit(REPO, {"config.json": b'{"moved": true}\n'}, delete=["nested/notes.txt"])
    hub.reset()
    wanted = [("cfg", "config.json"), ("w", "model.safetensors"), ("gone", "nested/notes.txt")]
    script = "".join(f"dl({k!r}, {REPO!r}, {f!r})\n" for k, f in wanted)
    out = await run_client(hub, cache, script)
    assert ok(out["cfg"])["sha256"] == sha256(b'{"moved": true}\n')
    assert ok(out["w"])["blob"] == sha256(WEIGHTS_V2) and f"/snapshots/{c4}/" in ok(out["w"])["path"]
    assert "EntryNotFoundError" in err(out["gone"])
    assert (refs / "main").read_text() == c4
    assert hub.counters.count("GET", "resolve") == 1  # only the new config.json; weights came from the cache
    assert hub.counters.bytes_sent == len(b'{"moved": true}\n')


async def test_snapshot_listing_and_model_info(hub: Hub, tiny: Tiny, tmp_path: Path) -> None:
    hub.tree_page_size = 2
    hub.add_repo("gpt2", {"config.json": CONFIG_V1})
    script = f"""
api = HfApi()
attempt("snap", lambda: snapshot_download({REPO!r}))
attempt("snap_v1", lambda: snapshot_download({REPO!r}, revision="v1.0", cache_dir={str(tmp_path / "other")!r}))
attempt("files", lambda: list_repo_files({REPO!r}))
attempt("files_pr", lambda: list_repo_files({REPO!r}, revision="refs/pr/1"))
attempt("ls_nested", lambda: [(e.path, type(e).__name__) for e in api.list_repo_tree({REPO!r}, path_in_repo="nested")])
attempt("ls_root", lambda: sorted((e.path, type(e).__name__) for e in api.list_repo_tree({REPO!r})))
def info():
    mi = model_info({REPO!r})
    return {{"id": mi.id, "sha": mi.sha, "files": [s.rfilename for s in mi.siblings]}}
attempt("info", info)
def info_v1():
    mi = model_info({REPO!r}, revision="v1.0", files_metadata=True)
    return {{"sha": mi.sha, "sib": {{s.rfilename: [s.size, s.blob_id, s.lfs and dict(s.lfs)] for s in mi.siblings}}}}
attempt("info_v1", info_v1)
def tree_full():
    return {{e.path: [type(e).__name__, getattr(e, "size", None), getattr(e, "blob_id", None) or e.tree_id,
                      e.lfs and dict(e.lfs) if hasattr(e, "lfs") else None, e.last_commit and e.last_commit.oid]
            for e in api.list_repo_tree({REPO!r}, recursive=True, expand=True)}}
attempt("tree", tree_full)
attempt("paths", lambda: [(e.path, type(e).__name__)
                          for e in api.get_paths_info({REPO!r}, ["config.json", "nested", "missing"])])
attempt("resolve_rev", lambda: [api.resolve_revision({REPO!r}, revision=r).resolved
                                for r in ("v1.0", "refs/pr/1", None)])
attempt("gpt2", lambda: (model_info("gpt2").sha, sha(hf_hub_download("gpt2", "config.json"))))
"""
    out = await run_client(hub, tmp_path / "cache", script)
    snap = Path(ok(out["snap"]))
    assert snap.name == tiny.c2
    assert (snap / "config.json").read_bytes() == CONFIG_V2
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS_V2
    assert (snap / "nested" / "notes.txt").read_bytes() == NOTES
    assert (snap / ".gitattributes").read_bytes().startswith(b"*.safetensors filter=lfs")
    assert (snap.parent.parent / "trees" / f"{tiny.c2}.json").exists()  # 2.x tree cache
    assert (Path(ok(out["snap_v1"])) / "model.safetensors").read_bytes() == WEIGHTS_V1
    everything = [".gitattributes", "config.json", "model.safetensors", "nested/notes.txt"]
    assert sorted(ok(out["files"])) == everything
    assert sorted(ok(out["files_pr"])) == everything
    assert ok(out["ls_nested"]) == [["nested/notes.txt", "RepoFile"]]
    assert ok(out["ls_root"]) == [[p, "RepoFile"] for p in everything[:3]] + [["nested", "RepoFolder"]]
    assert ok(out["info"]) == {"id": REPO, "sha": tiny.c2, "files": everything}
    info_v1 = ok(out["info_v1"])
    assert info_v1["sha"] == tiny.c1
    ptr = lfs_pointer(sha256(WEIGHTS_V1), len(WEIGHTS_V1))
    lfs_v1 = {"size": len(WEIGHTS_V1), "sha256": sha256(WEIGHTS_V1), "pointer_size": len(ptr)}
    assert info_v1["sib"]["model.safetensors"] == [len(WEIGHTS_V1), git_blob_sha1(ptr), lfs_v1]
    assert info_v1["sib"]["config.json"] == [len(CONFIG_V1), git_blob_sha1(CONFIG_V1), None]
    tree = ok(out["tree"])
    w2 = hub.blob(REPO, "model.safetensors")
    lfs_v2 = {"size": w2.size, "sha256": w2.sha256, "pointer_size": w2.pointer_size}
    assert w2.pointer_size == len(lfs_pointer(sha256(WEIGHTS_V2), len(WEIGHTS_V2)))
    assert tree["model.safetensors"][:4] == ["RepoFile", len(WEIGHTS_V2), w2.git_oid, lfs_v2]
    assert tree["nested"][0] == "RepoFolder" and len(tree["nested"][2]) == 40
    assert tree["nested/notes.txt"][4] == tiny.c1 and tree["config.json"][4] == tiny.c2  # lastCommit
    assert ok(out["paths"]) == [["config.json", "RepoFile"], ["nested", "RepoFolder"]]
    assert ok(out["resolve_rev"]) == [tiny.c1, tiny.c3, tiny.c2]
    assert ok(out["gpt2"]) == [hub.head("gpt2"), sha256(CONFIG_V1)]

    lines = hub.counters.lines
    # Pagination: page size 2, five entries, the client followed the absolute Link verbatim.
    assert f"GET /api/models/acme/tiny-model/tree/{tiny.c2}?recursive=true&expand=false" in lines
    assert f"GET /api/models/acme/tiny-model/tree/{tiny.c2}?recursive=true&expand=false&cursor=2" in lines
    assert f"GET /api/models/acme/tiny-model/tree/{tiny.c2}?recursive=true&expand=false&cursor=4" in lines
    assert "GET /api/models/acme/tiny-model/revision/main" in lines
    assert "GET /api/models/acme/tiny-model/revision/v1.0?blobs=true" in lines
    assert "POST /api/models/acme/tiny-model/paths-info/main" in lines


async def test_typed_errors_and_gated_access(hub: Hub, tiny: Tiny, tmp_path: Path) -> None:
    hub.add_repo("acme/gated-model", {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1}, gated=True)
    script = f"""
dl("missing", {REPO!r}, "missing.json")
dl("norepo", "acme/does-not-exist", "config.json")
dl("norev", {REPO!r}, "config.json", revision="nope")
dl("gated", "acme/gated-model", "config.json")
dl("gated_lfs", "acme/gated-model", "model.safetensors")
attempt("info_gated", lambda: model_info("acme/gated-model").sha)
attempt("info_norepo", lambda: model_info("acme/does-not-exist").sha)
attempt("info_norev", lambda: model_info({REPO!r}, revision="nope").sha)
attempt("tree_nopath", lambda: list(HfApi().list_repo_tree({REPO!r}, path_in_repo="nope")))
"""
    no_token, with_token = await asyncio.gather(
        run_client(hub, tmp_path / "anon", script), run_client(hub, tmp_path / "auth", script, HF_TOKEN=TOKEN)
    )
    for out in (no_token, with_token):
        missing = err(out["missing"])
        assert "RemoteEntryNotFoundError" in missing and "EntryNotFoundError" in missing
        assert "RepositoryNotFoundError" in err(out["norepo"]) and "GatedRepoError" not in err(out["norepo"])
        assert "RevisionNotFoundError" in err(out["norev"])
        assert "RepositoryNotFoundError" in err(out["info_norepo"])
        assert "RevisionNotFoundError" in err(out["info_norev"])
        assert "EntryNotFoundError" in err(out["tree_nopath"])
    # EntryNotFound carried X-Repo-Commit: the client remembered the absence at that commit.
    for cache in ("anon", "auth"):
        assert (tmp_path / cache / "models--acme--tiny-model" / ".no_exist" / tiny.c2 / "missing.json").exists()
    assert "GatedRepoError" in err(no_token["gated"]) and "RepositoryNotFoundError" in err(no_token["gated"])
    assert "GatedRepoError" in err(no_token["gated_lfs"])
    assert "GatedRepoError" in err(no_token["info_gated"])
    assert ok(with_token["gated"])["sha256"] == sha256(CONFIG_V1)
    assert ok(with_token["gated_lfs"])["sha256"] == sha256(WEIGHTS_V1)
    assert ok(with_token["info_gated"]) == hub.head("acme/gated-model")
    statuses = {(r.line, r.auth): r.status for r in hub.counters.log}
    assert statuses[("HEAD /acme/gated-model/resolve/main/config.json", False)] == 401
    assert statuses[("HEAD /acme/gated-model/resolve/main/config.json", True)] == 200
    assert statuses[("HEAD /acme/does-not-exist/resolve/main/config.json", False)] == 401
    assert statuses[("HEAD /acme/tiny-model/resolve/nope/config.json", False)] == 404


async def test_lfs_redirected_to_the_cdn(hub: Hub, tmp_path: Path) -> None:
    hub.lfs_mode = "redirect_cdn"
    hub.add_repo("acme/gated-model", {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1}, gated=True)
    script = """
dl("w", "acme/gated-model", "model.safetensors")
attempt("snap", lambda: snapshot_download("acme/gated-model", cache_dir=%r))
""" % str(tmp_path / "snap")
    out = await run_client(hub, tmp_path / "cache", script, HF_TOKEN=TOKEN)
    assert ok(out["w"])["sha256"] == sha256(WEIGHTS_V1)
    assert ok(out["w"])["blob"] == sha256(WEIGHTS_V1)
    snap = Path(ok(out["snap"]))
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS_V1
    assert (snap / "config.json").read_bytes() == CONFIG_V1
    c = hub.counters
    # The LFS bytes came from the CDN (twice: two caches), never from the hub, and the token stayed on the hub.
    assert c.cdn_bytes_sent == 2 * len(WEIGHTS_V1)
    assert c.bytes_sent == len(CONFIG_V1) + len(hub.blob("acme/gated-model", ".gitattributes").data)
    assert c.cdn_lines == [f"GET /cdn/{sha256(WEIGHTS_V1)}?sig=fake"] * 2
    assert c.cdn_auth_requests == 0 and c.auth_requests == c.requests
    heads = [r for r in c.log if r.method == "HEAD" and r.path.endswith("/model.safetensors")]
    assert heads and all(r.status == 302 for r in heads)


async def test_other_redirect_modes_with_the_client(hub: Hub, tiny: Tiny, tmp_path: Path) -> None:
    """HF.md §10.3: a same-origin 302 without metadata breaks 2.x; a 302 with metadata to another port works."""
    script = "dl('w', %r, 'model.safetensors')\n" % REPO
    hub.lfs_mode = "redirect_same_origin"
    same = await run_client(hub, tmp_path / "same", script)
    assert "LocalEntryNotFoundError" in err(same["w"]) and "X-Repo-Commit" in same["w"]["msg"]
    assert hub.counters.lines[-1] == f"HEAD /cdn/{sha256(WEIGHTS_V2)}?sig=fake"  # followed on the same origin
    hub.lfs_mode = "redirect_other_port"
    other = await run_client(hub, tmp_path / "other", script)
    assert ok(other["w"])["sha256"] == sha256(WEIGHTS_V2)
    assert hub.counters.cdn_lines == [f"GET /cdn/{sha256(WEIGHTS_V2)}?sig=fake"]
    assert hub.counters.cdn_bytes_sent == len(WEIGHTS_V2) and hub.counters.bytes_sent == 0


async def test_cut_body_resumed_with_range_and_503_retried(hub: Hub, tmp_path: Path) -> None:
    big = random_bytes(24 << 20, seed=7)
    hub.add_repo("acme/big", {"big.bin": big})
    hub.truncate_once = True  # cut at 12 MiB: the client resumes from 10 MiB
    hub.fail_first, hub.fail_kinds = 2, {"resolve"}
    out = await run_client(hub, tmp_path / "cache", "dl('big', 'acme/big', 'big.bin')\n")
    assert ok(out["big"])["sha256"] == sha256(big)
    c = hub.counters
    seen = [(r.method, r.status) for r in c.log]
    assert seen == [("HEAD", 503), ("HEAD", 503), ("HEAD", 200), ("GET", 200), ("GET", 206)]
    assert c.log[-1].range == "bytes=10485760-"
    assert c.ranges == [f"10485760-{len(big) - 1}"]
    assert c.bytes_sent == (12 << 20) + len(big) - (10 << 20)


async def test_xet_advertisement_reaches_the_client(hub: Hub, tmp_path: Path) -> None:
    """The switches that make the real client go Xet (and fail) unless HF_HUB_DISABLE_XET=1 (HF.md §5)."""
    hub.xet_hint = hub.tree_xet_hash = True
    files = {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1}
    hub.add_repo("acme/xet-a", files)
    hub.add_repo("acme/xet-b", files)
    script = """
dl("head", "acme/xet-%s", "model.safetensors")
attempt("snap", lambda: snapshot_download("acme/xet-%s", cache_dir=%r))
"""
    xet, plain = await asyncio.gather(
        run_client(hub, tmp_path / "a", script % ("a", "a", str(tmp_path / "a2"))),
        run_client(hub, tmp_path / "b", script % ("b", "b", str(tmp_path / "b2")), HF_HUB_DISABLE_XET="1"),
    )
    assert "HfHubHTTPError" in err(xet["head"]) and "HfHubHTTPError" in err(xet["snap"])
    assert ok(plain["head"])["sha256"] == sha256(WEIGHTS_V1)
    assert (Path(ok(plain["snap"])) / "model.safetensors").read_bytes() == WEIGHTS_V1
    lines = hub.counters.lines
    c_a = hub.head("acme/xet-a")
    assert lines.count(f"GET /api/models/acme/xet-a/xet-read-token/{c_a}") == 2
    assert not any("/acme/xet-b/xet-read-token" in line for line in lines)
    # With xetHash in /tree, snapshot_download skipped the HEAD of the LFS file (only the first dl HEADed it).
    assert lines.count("HEAD /acme/xet-a/resolve/main/model.safetensors") == 1
    assert not any(line.startswith(f"HEAD /acme/xet-a/resolve/{c_a}/model.safetensors") for line in lines)


# --------------------------------------------------------------------------------------------------
# wire details (aiohttp client, in-process)


async def test_resolve_headers_ranges_and_errors(hub: Hub, tiny: Tiny) -> None:
    url = hub.resolve_url(REPO, "model.safetensors")
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.head(url) as h:
            assert h.status == 200
        async with s.get(url, headers={"Accept-Encoding": "gzip, deflate"}) as g:
            body = await g.read()
        assert body == WEIGHTS_V2
        for k in ("X-Repo-Commit", "ETag", "X-Linked-Etag", "X-Linked-Size", "Content-Length", "Accept-Ranges"):
            assert h.headers[k] == g.headers[k], k
        assert h.headers["X-Repo-Commit"] == tiny.c2
        assert h.headers["ETag"] == h.headers["X-Linked-Etag"] == f'"{sha256(WEIGHTS_V2)}"'
        assert h.headers["X-Linked-Size"] == h.headers["Content-Length"] == str(len(WEIGHTS_V2))
        assert "Content-Encoding" not in g.headers and "X-Xet-Hash" not in h.headers and "Link" not in h.headers

        async with s.head(hub.resolve_url(REPO, "nested/notes.txt", "refs/pr/1")) as h:
            assert h.headers["ETag"] == f'"{git_blob_sha1(NOTES_PR)}"' and "X-Linked-Etag" not in h.headers
            assert h.headers["X-Repo-Commit"] == tiny.c3

        async with s.get(url, headers={"Range": "bytes=100-199"}) as r:
            assert r.status == 206 and await r.read() == WEIGHTS_V2[100:200]
            assert r.headers["Content-Range"] == f"bytes 100-199/{len(WEIGHTS_V2)}"
        async with s.get(url, headers={"Range": "bytes=-10"}) as r:
            assert r.status == 206 and await r.read() == WEIGHTS_V2[-10:]
        async with s.get(url, headers={"Range": f"bytes={len(WEIGHTS_V2)}-"}) as r:
            assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(WEIGHTS_V2)}"
        async with s.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'}) as r:
            assert r.status == 200 and len(await r.read()) == len(WEIGHTS_V2)

        async def error(u: str, method: str = "HEAD", **kw: Any) -> tuple[int, str | None, str | None]:
            async with s.request(method, u, **kw) as r:
                return r.status, r.headers.get("X-Error-Code"), r.headers.get("X-Repo-Commit")

        assert await error(hub.resolve_url(REPO, "missing.json")) == (404, "EntryNotFound", tiny.c2)
        assert await error(hub.resolve_url(REPO, "nested")) == (404, "EntryNotFound", tiny.c2)
        assert await error(hub.resolve_url(REPO, "config.json", "nope")) == (404, "RevisionNotFound", None)
        assert await error(hub.resolve_url("acme/nope", "config.json")) == (401, "RepoNotFound", None)
        hub.add_repo("acme/gated", {"config.json": CONFIG_V1}, gated=True)
        gated = hub.resolve_url("acme/gated", "config.json")
        assert await error(gated) == (401, "GatedRepo", None)
        assert await error(gated, headers={"authorization": "Bearer wrong"}) == (401, "GatedRepo", None)
        assert (await error(gated, headers={"authorization": f"Bearer {TOKEN}"}))[0] == 200
        for path in ("", "/revision/main", "/tree/main"):
            assert await error(f"{hub.url}/api/models/acme/gated{path}", "GET") == (401, "GatedRepo", None)
        paths_info = f"{hub.url}/api/models/acme/gated/paths-info/main"
        assert await error(paths_info, "POST", data={"paths": "x"}) == (401, "GatedRepo", None)
        assert await error(hub.url + "/api/models/acme/nope", "GET") == (401, "RepoNotFound", None)
        assert await error(hub.url + f"/api/models/{REPO}/revision/nope", "GET") == (404, "RevisionNotFound", None)
        assert await error(hub.url + f"/api/models/{REPO}/tree/main/nope", "GET") == (404, "EntryNotFound", tiny.c2)
        assert await error(hub.url + "/api/agent-harnesses", "GET") == (404, None, None)
        assert await error(hub.url + "/some/thing/else", "GET") == (404, None, None)
    c = hub.counters
    assert c.count("GET", "harness") == 1 and c.count("GET", "other") == 1


async def test_api_routes_on_the_wire(hub: Hub, tiny: Tiny) -> None:
    hub.add_repo("gpt2", {"config.json": CONFIG_V1})
    async with aiohttp.ClientSession() as s:

        async def get(path: str) -> tuple[Any, Any]:
            async with s.get(hub.url + path) as r:
                assert r.status == 200, (path, r.status)
                return await r.json(), r.headers

        info, _ = await get(f"/api/models/{REPO}/revision/refs%2Fpr%2F1?blobs=True")  # 0.36 spelling
        assert info["id"] == REPO and info["sha"] == tiny.c3
        sib = {x["rfilename"]: x for x in info["siblings"]}
        notes = {"rfilename": "nested/notes.txt", "size": len(NOTES_PR), "blobId": git_blob_sha1(NOTES_PR)}
        assert sib["nested/notes.txt"] == notes
        assert sib["model.safetensors"]["lfs"]["sha256"] == sha256(WEIGHTS_V2)
        info, _ = await get(f"/api/models/{REPO}/revision/{tiny.c1}")
        assert info["sha"] == tiny.c1 and "size" not in info["siblings"][0]
        info, _ = await get("/api/models/gpt2")
        assert info["id"] == "gpt2" and [x["rfilename"] for x in info["siblings"]] == [".gitattributes", "config.json"]

        tree, _ = await get(f"/api/models/{REPO}/tree/main/?recursive=True&expand=False")  # trailing slash
        entry = {e["path"]: e for e in tree}
        ptr = lfs_pointer(sha256(WEIGHTS_V2), len(WEIGHTS_V2))
        assert entry["model.safetensors"] == {
            "type": "file",
            "oid": git_blob_sha1(ptr),
            "size": len(WEIGHTS_V2),
            "path": "model.safetensors",
            "lfs": {"oid": sha256(WEIGHTS_V2), "size": len(WEIGHTS_V2), "pointerSize": len(ptr)},
        }
        assert entry["nested"]["type"] == "directory" and entry["nested"]["size"] == 0
        sub, _ = await get(f"/api/models/{REPO}/tree/main/nested")
        assert [e["path"] for e in sub] == ["nested/notes.txt"]
        sub, _ = await get(f"/api/models/{REPO}/tree/refs%2Fpr%2F1/nested")
        assert sub[0]["oid"] == git_blob_sha1(NOTES_PR)

        hub.tree_page_size = 3
        paged, seen, path = [], [], f"/api/models/{REPO}/tree/main?recursive=true"
        while True:
            page, headers = await get(path)
            paged += page
            link = headers.get("Link")
            if not link:
                break
            nxt = link.split(";")[0].strip("<>")
            assert nxt.startswith(hub.url) and link.endswith('rel="next"')
            seen.append(nxt)
            path = nxt[len(hub.url) :]
        assert paged == tree and seen == [hub.url + f"/api/models/{REPO}/tree/main?recursive=true&cursor=3"]

        hub.tree_xet_hash = True
        tree, _ = await get(f"/api/models/{REPO}/tree/main")
        assert "xetHash" in {e["path"]: e for e in tree}["model.safetensors"]

        form = [("paths", "config.json"), ("paths", "nested"), ("paths", "nope"), ("expand", "false")]
        async with s.post(hub.url + f"/api/models/{REPO}/paths-info/v1.0", data=form) as r:
            got = await r.json()
        assert (got[0]["path"], got[0]["type"], got[0]["oid"]) == ("config.json", "file", git_blob_sha1(CONFIG_V1))
        assert [e["path"] for e in got] == ["config.json", "nested"] and "xetHash" not in got[0]


async def test_redirect_modes_and_cdn_counters(hub: Hub, tiny: Tiny) -> None:
    url = hub.resolve_url(REPO, "model.safetensors")
    target = f"/cdn/{sha256(WEIGHTS_V2)}?sig=fake"
    async with aiohttp.ClientSession() as s:
        hub.lfs_mode = "redirect_cdn"
        async with s.head(url, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == hub.cdn_url + target
            assert r.headers["X-Linked-Size"] == str(len(WEIGHTS_V2)) and r.headers["X-Repo-Commit"] == tiny.c2
        async with s.head(hub.resolve_url(REPO, "config.json"), allow_redirects=False) as r:
            assert r.status == 200  # non-LFS files are served by the hub itself
        async with s.get(hub.cdn_url + target, headers={"Range": "bytes=10-19", "authorization": "Bearer x"}) as r:
            assert r.status == 206 and await r.read() == WEIGHTS_V2[10:20] and "X-Repo-Commit" not in r.headers
        async with s.get(hub.cdn_url + target.replace("fake", "bad")) as r:
            assert r.status == 403
        hub.lfs_mode = "redirect_other_port"
        async with s.get(url) as r:  # followed by aiohttp
            assert await r.read() == WEIGHTS_V2 and str(r.url).startswith(hub.cdn_local_url)
        hub.lfs_mode = "redirect_same_origin"
        async with s.head(url, allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == target and "X-Repo-Commit" not in r.headers
        async with s.get(url) as r:
            assert await r.read() == WEIGHTS_V2
        hub.lfs_mode, hub.xet_hint = "direct", True
        async with s.head(url) as r:
            assert len(r.headers["X-Xet-Hash"]) == 64
            assert r.headers["Link"] == f'<{hub.url}/api/models/{REPO}/xet-read-token/{tiny.c2}>; rel="xet-auth"'
    c = hub.counters
    assert c.cdn_requests == 3 and c.cdn_auth_requests == 1
    assert c.cdn_bytes_sent == 10 + len(WEIGHTS_V2) and c.bytes_sent == len(WEIGHTS_V2)
    assert c.count(kind="cdn", server="hub") == 1


async def test_fault_switches_on_the_wire(hub: Hub, tiny: Tiny) -> None:
    url = hub.resolve_url(REPO, "model.safetensors")
    hub.fail_first, hub.fail_status, hub.fail_retry_after = 1, 503, "1"
    async with aiohttp.ClientSession() as s:
        async with s.get(hub.url + "/api/agent-harnesses") as r:
            assert r.status == 404  # not counted against fail_first
        async with s.head(url) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1" and "X-Error-Code" not in r.headers
        async with s.head(url) as r:
            assert r.status == 200
        hub.truncate_once = True
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(url) as r:
                await r.read()
        async with s.get(url) as r:
            assert await r.read() == WEIGHTS_V2
    assert hub.counters.bytes_sent == len(WEIGHTS_V2) // 2 + len(WEIGHTS_V2)


def test_git_ids_match_git() -> None:
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    h = Hub()
    a = h.add_repo("x/a", {"f": b"1"})
    b = h.add_repo("x/b", {"f": b"1"})
    assert a != b and len(a) == 40 and h.add_repo("x/c", {"f": b"1"}) == Hub().add_repo("x/c", {"f": b"1"})
    assert h.repo("x/a").commits[a].trees[""] == h.repo("x/b").commits[b].trees[""]  # same content, same tree


async def test_standalone_main(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "tests.support.hub", cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as s:
            async with s.head(f"{url}/acme/tiny-model/resolve/refs%2Fpr%2F1/config.json") as r:
                assert r.status == 200 and len(r.headers["X-Repo-Commit"]) == 40
    finally:
        proc.terminate()
        await proc.wait()
