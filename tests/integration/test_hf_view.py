"""The ``hf/`` view: a prefetched hf:// model loads with ``HF_HUB_CACHE=<cache>/hf HF_HUB_OFFLINE=1``.

The real clients (huggingface_hub 2.x + transformers 5.x, and 0.36 + transformers 4.x) resolve by
branch, tag, ``refs/pr/N`` and commit from the view alone: no request reaches the hub and the client
writes nothing into the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient
from tests.support.hfclients import TINY, VERSIONS, run_client, tiny_model_files
from tests.support.hub import Hub
from tests.support.node import running_daemon

FLAGS = {"store.piece_size_bytes": "64K"}
PR_NOTES = b"notes on a pull request\n"


def build_hub(hub: Hub) -> dict[str, Any]:
    files = tiny_model_files()
    main = hub.add_repo(TINY, files, tags=("v1.0",))
    pr = hub.commit(TINY, {"nested/notes.txt": PR_NOTES}, branch="pr-1-work")
    hub.add_ref(TINY, "refs/pr/1", pr)
    del hub.repo(TINY).branches["pr-1-work"]
    return {"main": main, "pr": pr, "files": hub.repo(TINY).commits[main].files}


async def prefetch_all(api: ApiClient) -> dict[str, dict[str, Any]]:
    out = {}
    for rev in ("main", "v1.0", "refs/pr/1"):
        model = await api.request("POST", "/v1/prefetch", body={"ref": f"hf://{TINY}@{rev}", "wait": True})
        assert model["state"] == "ready", model
        out[rev] = model
    return out


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under ``root``: symlink targets, and inode/size/mtime of files and directories."""
    state: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            state[rel] = (
                ("link", os.readlink(p))
                if p.is_symlink()
                else ("node", st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
            )
    return state


async def test_view_is_a_canonical_hub_cache(tmp_path: Path) -> None:
    async with Hub() as hub:
        repo = build_hub(hub)
        async with (
            running_daemon(tmp_path / "cache", **{**FLAGS, "origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            models = await prefetch_all(api)
            assert models["main"]["revision"] == models["v1.0"]["revision"] == repo["main"]
            assert models["refs/pr/1"]["revision"] == repo["pr"]
            hf = Path(models["main"]["hf_path"])
            assert hf == tmp_path / "cache" / "hf"
            top = hf / "models--acme--tiny-model"
            assert models["main"]["snapshot_path"] == str(top / "snapshots" / repo["main"])

            # Only repo folders at the root (scan_cache_dir warns about anything else).
            assert sorted(p.name for p in hf.iterdir()) == ["models--acme--tiny-model"]
            assert sorted(p.name for p in top.iterdir()) == ["blobs", "refs", "snapshots", "trees"]
            # refs: 40 hex and no newline (a newline breaks every client version).
            assert (top / "refs" / "main").read_bytes() == repo["main"].encode()
            assert (top / "refs" / "v1.0").read_bytes() == repo["main"].encode()
            assert (top / "refs" / "refs" / "pr" / "1").read_bytes() == repo["pr"].encode()

            view = Path(models["main"]["path"])
            for path, blob in repo["files"].items():
                link = top / "snapshots" / repo["main"] / path
                # Relative link to blobs/<etag>: sha256 for LFS files, git blob sha1 otherwise.
                assert os.readlink(link) == "../" * (path.count("/") + 2) + "blobs/" + blob.etag
                assert blob.lfs == (path == "model.safetensors")
                assert link.read_bytes() == blob.data
                # The view's blob is the store's blob (one inode), not a second copy.
                assert os.path.samefile(top / "blobs" / blob.etag, view / path)
            pr_notes = top / "snapshots" / repo["pr"] / "nested" / "notes.txt"
            assert pr_notes.read_bytes() == PR_NOTES

            tree = json.loads((top / "trees" / f"{repo['main']}.json").read_text())
            assert tree["format_version"] == 1
            assert set(tree["files"]) == set(repo["files"])
            weights = tree["files"]["model.safetensors"]
            assert weights["lfs_sha256"] == repo["files"]["model.safetensors"].sha256
            assert "xet_hash" not in json.dumps(tree)


OFFLINE_CLIENT = """
import os
import huggingface_hub
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache, scan_cache_dir
A = __import__("json").loads(ARGS)
R = A["repo"]

def files_in(snapshot):
    out = {}
    for dirpath, _, names in os.walk(snapshot):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, snapshot)] = sha256_of(p)
    return out

def dl(path, rev):
    p = hf_hub_download(R, path, revision=rev)
    return {"path": p, "sha256": sha256_of(p)}

out = {"version": huggingface_hub.__version__}
for rev in ("main", A["main"], "v1.0"):
    for path in A["files"]:
        out["dl " + rev + " " + path] = attempt(dl, path, rev)
out["dl refs/pr/1"] = attempt(dl, "nested/notes.txt", "refs/pr/1")
out["dl pr commit"] = attempt(dl, "nested/notes.txt", A["pr"])
out["snapshot main"] = attempt(lambda: (lambda s: {"path": s, "files": files_in(s)})(snapshot_download(R)))
out["snapshot commit"] = attempt(snapshot_download, R, revision=A["main"])
out["snapshot refs/pr/1"] = attempt(snapshot_download, R, revision="refs/pr/1")
out["snapshot json only"] = attempt(snapshot_download, R, allow_patterns="*.json")
out["snapshot vllm"] = attempt(snapshot_download, R, ignore_patterns="*", local_files_only=True)
out["try config"] = attempt(try_to_load_from_cache, R, "config.json")
out["try weights at commit"] = attempt(try_to_load_from_cache, R, "model.safetensors", revision=A["main"])
out["try absent"] = attempt(lambda: repr(try_to_load_from_cache(R, "absent.json")))

def scan():
    info = scan_cache_dir(os.environ["HF_HUB_CACHE"])
    return {
        "warnings": [str(w) for w in info.warnings],
        "repos": [
            {"id": r.repo_id, "refs": sorted(r.refs), "revisions": sorted(rev.commit_hash for rev in r.revisions)}
            for r in info.repos
        ],
    }
out["scan"] = attempt(scan)

from transformers import AutoConfig
out["autoconfig"] = attempt(lambda: AutoConfig.from_pretrained(R).to_dict()["model_type"])
out["autoconfig tag"] = attempt(lambda: AutoConfig.from_pretrained(R, revision="v1.0").n_layer)
emit(out)
"""


@pytest.mark.parametrize("version", VERSIONS)
async def test_offline_real_client_reads_the_view(tmp_path: Path, version: str) -> None:
    async with Hub() as hub:
        repo = build_hub(hub)
        async with (
            running_daemon(tmp_path / "cache", **{**FLAGS, "origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            models = await prefetch_all(api)
            hf = Path(models["main"]["hf_path"])
            snapshots = hf / "models--acme--tiny-model" / "snapshots"
            before = await asyncio.to_thread(tree_state, hf)
            hub.reset()

            args = {"repo": TINY, "main": repo["main"], "pr": repo["pr"], "files": sorted(repo["files"])}
            env = {"HF_HUB_CACHE": str(hf), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url}
            out = await run_client(f"ARGS = {json.dumps(args)!r}\n" + OFFLINE_CLIENT, env, version)

            # Offline means offline: the hub (still reachable at HF_ENDPOINT) saw nothing...
            assert (hub.counters.requests, hub.counters.cdn_requests) == (0, 0), hub.counters.lines
            # ... and the client wrote nothing into the cache.
            assert await asyncio.to_thread(tree_state, hf) == before

        assert out["version"].startswith("0.36" if version == "0.36" else "2.")
        for rev in ("main", repo["main"], "v1.0"):
            for path, blob in repo["files"].items():
                got = out[f"dl {rev} {path}"]
                assert got.get("ok") == {"path": str(snapshots / repo["main"] / path), "sha256": blob.sha256}, (
                    rev,
                    path,
                    got,
                )
        pr_notes = {
            "path": str(snapshots / repo["pr"] / "nested/notes.txt"),
            "sha256": hashlib.sha256(PR_NOTES).hexdigest(),
        }
        assert out["dl refs/pr/1"] == {"ok": pr_notes}
        assert out["dl pr commit"] == {"ok": pr_notes}

        main_snapshot = str(snapshots / repo["main"])
        assert out["snapshot main"] == {
            "ok": {"path": main_snapshot, "files": {p: b.sha256 for p, b in repo["files"].items()}}
        }
        assert out["snapshot commit"] == {"ok": main_snapshot}
        assert out["snapshot refs/pr/1"] == {"ok": str(snapshots / repo["pr"])}
        assert out["snapshot json only"] == {"ok": main_snapshot}
        assert out["snapshot vllm"] == {"ok": main_snapshot}
        assert out["try config"] == {"ok": f"{main_snapshot}/config.json"}
        assert out["try weights at commit"] == {"ok": f"{main_snapshot}/model.safetensors"}
        assert out["try absent"] == {"ok": "None"}

        scan = out["scan"].get("ok")
        assert scan is not None, out["scan"]
        assert scan["warnings"] == []
        assert scan["repos"] == [
            {"id": TINY, "refs": sorted(["main", "v1.0", "refs/pr/1"]), "revisions": sorted([repo["main"], repo["pr"]])}
        ]
        assert out["autoconfig"] == {"ok": "gpt2"}
        assert out["autoconfig tag"] == {"ok": 2}


async def test_concurrent_prefetches_of_one_repo_keep_the_view_whole(tmp_path: Path) -> None:
    # What the HF endpoint does under snapshot_download's 8 threads: one single-file fetch per
    # file of one commit, finishing together. Each must land in the same snapshot, none may undo another.
    async with Hub() as hub:
        files = {**tiny_model_files(), **{f"shard-{i:02d}.txt": b"%d\n" % i * (100 + i) for i in range(13)}}
        commit = hub.add_repo(TINY, files)
        paths = sorted(hub.repo(TINY).commits[commit].files)
        async with (
            running_daemon(tmp_path / "cache", **{**FLAGS, "origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            results = await asyncio.gather(
                *(
                    api.request("POST", "/v1/prefetch", body={"ref": f"hf://{TINY}@main?include={p}", "wait": True})
                    for p in paths
                ),
                return_exceptions=True,
            )
            failed = {
                p: str(r) for p, r in zip(paths, results) if isinstance(r, BaseException) or r["state"] != "ready"
            }
            assert not failed, failed
            snap = tmp_path / "cache" / "hf" / "models--acme--tiny-model" / "snapshots" / commit
            present = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_symlink() and p.exists())
            assert present == paths
            assert (snap.parents[1] / "refs" / "main").read_text() == commit
