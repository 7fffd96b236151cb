"""``prefetch --refresh`` of a moved branch: only the changed file is fetched, ``refs/main`` flips
to the new commit in one step, and a lease keeps the old revision's snapshot readable until it is
released -- after which what only the old revision used is gone and shared files were never doubled."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from cached.api.client import ApiClient
from tests.support.hfclients import TINY, VERSIONS, run_client, tiny_model_files
from tests.support.hub import Hub, random_bytes
from tests.support.node import running_daemon

FLAGS = {"store.piece_size_bytes": "64K"}
REF = f"hf://{TINY}@main"

READ_CLIENT = """
import os
from huggingface_hub import hf_hub_download, snapshot_download
A = __import__("json").loads(ARGS)
R = A["repo"]
out = {
    "main": sha256_of(hf_hub_download(R, "model.safetensors")),
    "old": sha256_of(hf_hub_download(R, "model.safetensors", revision=A["old"])),
    "old shared": sha256_of(hf_hub_download(R, "shared.bin", revision=A["old"])),
    "old snapshot": snapshot_download(R, revision=A["old"]),
    "main snapshot": snapshot_download(R),
}
emit(out)
"""


def store_blobs(cache: Path) -> dict[str, int]:
    """The store's blobs: name -> inode."""
    return {p.name: p.stat().st_ino for p in (cache / "blobs").glob("*/*") if not p.name.endswith(".pieces")}


class RefsWatcher:
    """Reads ``refs/main`` and the snapshot it names, over and over, while a refresh runs: a client
    resolving at any instant must find the old commit or the new one, complete."""

    def __init__(self, top: Path, commits: dict[str, list[str]]) -> None:
        self.top = top
        self.commits = commits
        self.seen: set[str] = set()
        self.reads = 0
        self.broken: list[str] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while True:
            last = self._stop.is_set()  # one more look after the refresh returned
            try:
                commit = (self.top / "refs" / "main").read_text()
            except OSError as e:
                self.broken.append(f"refs/main unreadable: {e}")
                commit = ""
            if commit:
                self.seen.add(commit)
                if commit not in self.commits:
                    self.broken.append(f"refs/main names {commit!r}")
                else:
                    missing = [p for p in self.commits[commit] if not (self.top / "snapshots" / commit / p).exists()]
                    if missing:
                        self.broken.append(f"snapshot {commit[:8]} lacks {missing}")
            self.reads += 1
            if last:
                return
            await asyncio.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()


@pytest.mark.parametrize("version", VERSIONS)
async def test_refresh_fetches_only_the_change_and_a_lease_keeps_the_old_revision(tmp_path: Path, version: str) -> None:
    cache = tmp_path / "cache"
    async with Hub() as hub:
        files = {**tiny_model_files(), "shared.bin": random_bytes(100_000, seed=7)}
        old = hub.add_repo(TINY, files)
        old_files = {p: b for p, b in hub.repo(TINY).commits[old].files.items()}
        async with (
            running_daemon(cache, **{**FLAGS, "origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            first = await api.request("POST", "/v1/prefetch", body={"ref": REF, "wait": True})
            assert first["revision"] == old
            hf = Path(first["hf_path"])
            top = hf / "models--acme--tiny-model"
            old_snapshot = top / "snapshots" / old
            lease = await api.request("POST", "/v1/leases", body={"ref": REF, "holder": "vllm@pod-1", "ttl_s": 600})
            # The lease names the per-commit snapshot: it stays valid when main moves on.
            assert lease["path"] == first["snapshot_path"] == str(old_snapshot)
            blobs_before = store_blobs(cache)
            assert len(blobs_before) == len(old_files)

            new_weights = random_bytes(300_000, seed=99)
            new = hub.commit(TINY, {"model.safetensors": new_weights})
            new_files = hub.repo(TINY).commits[new].files
            hub.reset()

            watcher = RefsWatcher(top, {old: sorted(old_files), new: sorted(new_files)})
            watching = asyncio.create_task(watcher.run(), name="test.refs-watcher")
            try:
                refreshed = await api.request("POST", "/v1/prefetch", body={"ref": REF, "refresh": True, "wait": True})
            finally:
                watcher.stop()
                await watching
            assert not watcher.broken, watcher.broken[:5]
            assert watcher.seen == {old, new} and watcher.reads > 1

            # Only the changed file left the hub.
            assert hub.counters.file_bytes == len(new_weights)
            assert refreshed["state"] == "ready" and refreshed["revision"] == new
            assert (top / "refs" / "main").read_bytes() == new.encode()
            assert refreshed["snapshot_path"] == str(top / "snapshots" / new)
            assert [(r["revision"], r["current"]) for r in refreshed["revisions"]] == [(new, True), (old, False)]
            assert refreshed["revisions"][1]["leases"] == [lease["lease_id"]]
            assert [x["lease_id"] for x in refreshed["leases"]] == [lease["lease_id"]]

            # Both revisions readable from the view; the unchanged files are one blob each.
            for path, blob in old_files.items():
                assert (old_snapshot / path).read_bytes() == blob.data, path
                assert (top / "snapshots" / new / path).read_bytes() == new_files[path].data, path
                if new_files[path].sha256 == blob.sha256:
                    assert os.path.samefile(old_snapshot / path, top / "snapshots" / new / path), path
            blobs_during = store_blobs(cache)
            assert len(blobs_during) == len(old_files) + 1
            assert {k: v for k, v in blobs_during.items() if k in blobs_before} == blobs_before  # nothing re-written

            args = {"repo": TINY, "old": old}
            env = {"HF_HUB_CACHE": str(hf), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url}
            read = await run_client(f"ARGS = {json.dumps(args)!r}\n" + READ_CLIENT, env, version)
            assert read == {
                "main": new_files["model.safetensors"].sha256,
                "old": old_files["model.safetensors"].sha256,
                "old shared": old_files["shared.bin"].sha256,
                "old snapshot": str(old_snapshot),
                "main snapshot": str(top / "snapshots" / new),
            }

            await api.request("DELETE", f"/v1/leases/{lease['lease_id']}")
            after = await api.request("GET", "/v1/models/status", params={"ref": REF})
            assert [(r["revision"], r["current"]) for r in after["revisions"]] == [(new, True)]
            assert not old_snapshot.exists()
            assert sorted(p.name for p in (top / "snapshots").iterdir()) == [new]
            # The old weights are gone from the view and the store; the shared files stay, same inode.
            assert not (top / "blobs" / old_files["model.safetensors"].etag).exists()
            assert sorted(p.name for p in (top / "blobs").iterdir()) == sorted(b.etag for b in new_files.values())
            blobs_after = store_blobs(cache)
            assert len(blobs_after) == len(new_files)
            assert set(blobs_after) < set(blobs_during)
            assert {k: blobs_during[k] for k in blobs_after} == blobs_after
            for path in new_files:
                assert (top / "snapshots" / new / path).read_bytes() == new_files[path].data
            assert hub.counters.file_bytes == len(new_weights)


async def test_refresh_of_an_unmoved_branch_fetches_nothing(tmp_path: Path) -> None:
    async with Hub() as hub:
        hub.add_repo(TINY, tiny_model_files())
        async with (
            running_daemon(tmp_path / "cache", **{**FLAGS, "origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
        ):
            first = await api.request("POST", "/v1/prefetch", body={"ref": REF, "wait": True})
            hub.reset()
            again = await api.request("POST", "/v1/prefetch", body={"ref": REF, "refresh": True, "wait": True})
            assert (again["revision"], again["manifest"]) == (first["revision"], first["manifest"])
            assert hub.counters.file_bytes == 0
            assert hub.counters.count(kind="info") == 1  # it did ask where main points now
