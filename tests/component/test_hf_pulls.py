"""The store's side of repos pulled through /hf, on a real directory.

``merge_model`` folds files into ``hf://org/m@<commit>`` under the ref's lock, so a whole-commit
prefetch committing at the same moment is never overwritten by a manifest with fewer files;
``pulls`` remembers each branch's last commit and each pulled commit's listing across restarts,
drives ``refs/<branch>`` in the hf view, and forgets repos the store no longer holds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from cached.types import FileEntry, Manifest, ModelRef
from tests.component.test_store import PIECE, add_blob, content, opened

COMMIT = "c" * 40


async def entries(store, tmp_path: Path, n: int) -> list[FileEntry]:
    out = []
    for i in range(n):
        data = content(tmp_path, 1000 + i, seed=70 + i)
        blob = await add_blob(store, data, key=f"pull-{i}")
        out.append(FileEntry(path=f"f{i}.bin", size=len(data), blob=blob, origin={"git_sha1": f"{i}" * 40}))
    return out


async def test_a_merge_never_drops_files_a_concurrent_whole_commit_published(tmp_path: Path) -> None:
    for order in ("merge-first", "commit-first"):
        store = await opened(tmp_path / order)
        files = await entries(store, tmp_path, 4)
        ref = ModelRef.parse(f"hf://org/m@{COMMIT}")
        whole = Manifest(ref=ref.canonical, revision=COMMIT, piece_size=PIECE, files=tuple(files))
        merge = store.merge_model(ref, files[:1], revision=COMMIT, sources={"origin": 1})
        commit = store.commit_model(ref, whole)
        await asyncio.gather(*((merge, commit) if order == "merge-first" else (commit, merge)))
        rec = store.model(ref)
        assert rec is not None and sorted(f.path for f in rec.manifest.files) == [f.path for f in files], order


async def test_pulled_commits_are_partial_until_whole_and_branches_reach_the_view(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = await opened(root)
    files = await entries(store, tmp_path, 3)
    ref = ModelRef.parse(f"hf://org/m@{COMMIT}")
    await store.note_hf_listing("org/m", COMMIT, tuple(f.path for f in files))
    await store.note_hf_branch("org/m", "main", COMMIT)
    folder = root / "hf" / "models--org--m"
    assert not (folder / "refs" / "main").exists()  # nothing of the commit is held yet

    rec = await store.merge_model(ref, files[:2], revision=COMMIT, sources={"origin": 10})
    assert rec is not None and store.pulled_missing(ref, rec.manifest) == ("f2.bin",)
    assert (folder / "refs" / "main").read_text() == COMMIT
    assert sorted(p.name for p in (folder / "snapshots" / COMMIT).iterdir()) == ["f0.bin", "f1.bin"]
    assert await store.merge_model(ref, files[:1], revision=COMMIT, sources={}) is None  # had it

    del store
    store = await opened(root)  # a restart keeps what each branch resolved to and the listing
    assert store.pulls.branch("org/m", "main") == COMMIT
    rec = store.model(ref)
    assert rec is not None and store.pulled_missing(ref, rec.manifest) == ("f2.bin",)
    rec = await store.merge_model(ref, files[2:], revision=COMMIT, sources={})
    assert rec is not None and store.pulled_missing(ref, rec.manifest) == ()
    assert rec.sources == {"origin": 10}

    await store.remove_model(ref)
    del store
    store = await opened(root)  # the repo is gone: so are its records
    assert store.pulls.branch("org/m", "main") is None
    assert not (root / "pulls" / "models--org--m.json").exists()
