"""Store on a real directory: publish and delete order, start-up sweep, space, eviction, verify."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path
from urllib.parse import quote

import blake3
import pytest

from cached.config import StoreConfig
from cached.errors import IntegrityError, NotFoundError, StoreError, StoreFullError
from cached.peers.holdings import LocalHoldings
from cached.store import Store, durable
from cached.types import (
    BlobAdded,
    BlobId,
    BlobRemoved,
    FileEntry,
    Manifest,
    ManifestAdded,
    ManifestRemoved,
    ModelRef,
    PartialDropped,
    PartialStarted,
    PieceVerified,
    RefChanged,
    StoreEvent,
    format_size,
    hash_piece,
    piece_span,
)
from tests.support.corrupt import flip_byte
from tests.support.origin import write_random_file

PIECE = 65536
MiB = 1 << 20


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_store(root: Path, *, max_bytes: int = 64 * MiB, clock: Clock | None = None, on_event=lambda e: None) -> Store:
    cfg = StoreConfig(cache_dir=root, piece_size_bytes=PIECE, max_bytes=max_bytes)
    return Store(cfg, clock=clock or Clock(), on_event=on_event)


async def opened(root: Path, **kw) -> Store:
    store = make_store(root, **kw)
    await store.open()
    return store


def content(tmp_path: Path, size: int, seed: int) -> bytes:
    return write_random_file(tmp_path / "src" / f"{seed}-{size}", size, seed=seed).read_bytes()


async def add_blob(store: Store, data: bytes, key: str) -> BlobId:
    async with store.partial(key=key, size=len(data), piece_size=PIECE, identity_key=f"test|{key}") as p:
        for i in range(p.pieces):
            off, length = piece_span(i, len(data), PIECE)
            await asyncio.to_thread(p.write_piece_sync, i, data[off : off + length])
        return await store.finalize(p)


async def add_model(store: Store, ref_text: str, files: dict[str, bytes]) -> tuple[ModelRef, Manifest]:
    ref = ModelRef.parse(ref_text)
    entries = []
    for path, data in files.items():
        blob = await add_blob(store, data, key=f"{ref.escaped}-{path.replace('/', '_')}")
        entries.append(FileEntry(path=path, size=len(data), blob=blob))
    manifest = Manifest(ref=ref.canonical, piece_size=PIECE, files=tuple(entries))
    await store.commit_model(ref, manifest)
    return ref, manifest


# --- publishing ----------------------------------------------------------------------------------


async def test_commit_publishes_manifest_hardlink_view_and_ref(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache")
    a = content(tmp_path, 3 * PIECE + 5, seed=1)
    b = content(tmp_path, PIECE // 2, seed=2)
    ref, manifest = await add_model(store, "file:///models/m1", {"a.bin": a, "sub/dir/b.bin": b})

    mpath = store.manifests_dir / f"{manifest.digest}.json"
    assert mpath.read_bytes() == manifest.canonical_bytes()
    assert stat.S_IMODE(mpath.stat().st_mode) == 0o440
    assert (store.refs_dir / ref.escaped).read_text().split("\n")[:2] == [ref.canonical, f"blake3:{manifest.digest}"]

    view = store.view_path(ref)
    for entry, data in zip(manifest.files, (a, b)):
        f = view / entry.path
        blob = store.blob_path(entry.blob.hex)
        assert f.read_bytes() == data
        assert f.stat().st_ino == blob.stat().st_ino  # a hardlink, not a copy
        assert stat.S_IMODE(f.stat().st_mode) == 0o440
        assert f.stat().st_nlink == 2

    rec = store.model(ref)
    assert rec is not None and rec.manifest == manifest and rec.path == view
    assert not list(store.tmp_dir.iterdir())  # view staging cleaned up


@pytest.mark.parametrize("umask", [0o077, 0o002, 0o000], ids=["umask-077", "umask-002", "umask-000"])
async def test_store_is_group_readable_never_group_writable_and_closed_to_others_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    """Launchers read models through the daemon's group (docs/install.md): a 0077 umask must not
    hide them, a 0002 one must not let a group member rename a view's files, and nothing in the
    store is readable by others (a 0444 blob in a 0755 view was readable by every local user)."""
    old = os.umask(umask)
    try:
        store = await opened(tmp_path / "cache")
        ref, manifest = await add_model(
            store, "file:///models/m1", {"a.bin": b"a" * 3 * PIECE, "sub/dir/b.bin": b"b" * 9}
        )
        await store.claims.pin(ref)  # claims/pins/ too
    finally:
        os.umask(old)
    view = store.view_path(ref)
    for entry in manifest.files:
        assert stat.S_IMODE((view / entry.path).stat().st_mode) == 0o440
    modes = {}
    for p in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
        st = p.lstat()
        modes[str(p.relative_to(tmp_path))] = oct(stat.S_IMODE(st.st_mode))
        assert not st.st_mode & (stat.S_IWGRP | stat.S_IRWXO), (p, oct(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == 0o750, (p, oct(st.st_mode))
    # Every directory a launcher walks to reach the model is searchable by the group.
    for d in [view / "sub" / "dir", view / "sub", view, store.models_dir, tmp_path / "cache"]:
        assert d.stat().st_mode & stat.S_IXGRP and d.stat().st_mode & stat.S_IRGRP, modes


async def test_commit_writes_the_ref_last(tmp_path: Path) -> None:
    """A failure while building the view leaves the manifest written and no ref."""
    store = await opened(tmp_path / "cache")
    data = content(tmp_path, 2 * PIECE, seed=3)
    ref = ModelRef.parse("file:///models/order")
    blob = await add_blob(store, data, key="order")
    manifest = Manifest(
        ref=ref.canonical, piece_size=PIECE, files=(FileEntry(path="w.bin", size=len(data), blob=blob),)
    )

    # Make the view impossible to publish: the models directory is replaced by a file.
    durable.remove_tree(store.models_dir)
    store.models_dir.write_bytes(b"not a directory")
    with pytest.raises(StoreError, match="view"):
        await store.commit_model(ref, manifest)
    assert (store.manifests_dir / f"{manifest.digest}.json").exists()  # manifest came first
    assert not (store.refs_dir / ref.escaped).exists()  # ref comes last
    assert store.model(ref) is None
    assert not list(store.tmp_dir.iterdir())

    # After the "crash", a restart drops the orphan manifest; a retry then publishes fully.
    store.models_dir.unlink()
    store = await opened(tmp_path / "cache")
    assert not (store.manifests_dir / f"{manifest.digest}.json").exists()
    await store.commit_model(ref, manifest)
    assert (store.view_path(ref) / "w.bin").read_bytes() == data


async def test_recommit_swaps_the_view_and_drops_what_only_the_old_manifest_used(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache")
    keep = content(tmp_path, PIECE, seed=5)
    v1, m1 = await add_model(
        store, "file:///models/rev", {"keep.bin": keep, "w.bin": content(tmp_path, 2 * PIECE, seed=6)}
    )
    v2_data = content(tmp_path, 2 * PIECE, seed=7)
    blob = await add_blob(store, v2_data, key="rev-2")
    m2 = Manifest(
        ref=v1.canonical, piece_size=PIECE, files=(m1.files[0], FileEntry(path="w2.bin", size=len(v2_data), blob=blob))
    )

    await store.commit_model(v1, m2)

    view = store.view_path(v1)
    assert sorted(p.name for p in view.iterdir()) == ["keep.bin", "w2.bin"]
    assert (view / "w2.bin").read_bytes() == v2_data
    assert not (store.manifests_dir / f"{m1.digest}.json").exists()
    assert not store.has_blob(m1.files[1].blob.hex) and not store.blob_path(m1.files[1].blob.hex).exists()
    assert store.has_blob(m1.files[0].blob.hex)
    assert store.used_bytes == len(keep) + len(v2_data)
    assert not any(store.tmp_dir.iterdir())


async def test_commit_refuses_a_manifest_whose_blobs_are_missing(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache")
    ref = ModelRef.parse("file:///models/ghost")
    ghost = BlobId.compute(10, PIECE, [hash_piece(b"0123456789")])
    manifest = Manifest(ref=ref.canonical, piece_size=PIECE, files=(FileEntry(path="g.bin", size=10, blob=ghost),))
    with pytest.raises(StoreError, match="blobs missing"):
        await store.commit_model(ref, manifest)
    assert not any(store.manifests_dir.iterdir()) and not any(store.refs_dir.iterdir())


async def test_identical_content_is_stored_once(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache")
    data = content(tmp_path, 2 * PIECE + 1, seed=4)
    first = await add_blob(store, data, key="one")
    second = await add_blob(store, data, key="two")
    assert first == second
    assert store.blob_count() == 1
    assert not any(store.partial_dir.iterdir())
    assert store.used_bytes == len(data)


# --- start-up sweep ------------------------------------------------------------------------------


async def test_open_sweeps_debris_and_rebuilds_views(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = await opened(root)
    keep_a = content(tmp_path, 2 * PIECE + 7, seed=10)
    keep_b = content(tmp_path, PIECE, seed=11)
    keep, keep_manifest = await add_model(store, "file:///models/keep", {"a.bin": keep_a, "d/b.bin": keep_b})
    broken, broken_manifest = await add_model(
        store, "file:///models/broken", {"c.bin": content(tmp_path, PIECE, seed=12)}
    )
    no_sidecar = await add_blob(store, content(tmp_path, PIECE + 3, seed=13), key="no-sidecar")
    no_blob = await add_blob(store, content(tmp_path, PIECE + 4, seed=14), key="no-blob")
    async with store.partial(key="resumable", size=2 * PIECE, piece_size=PIECE, identity_key="test|resumable") as p:
        await asyncio.to_thread(p.write_piece_sync, 0, keep_a[:PIECE])
    del store  # "crash": nothing is closed or cleaned up beyond this point

    # Debris of every kind a crash or an operator can leave.
    (root / "tmp" / "view-dead").mkdir()
    (root / "tmp" / "view-dead" / "x").write_bytes(b"x")
    (root / "tmp" / "stray").write_bytes(b"y")
    paths = make_store(root)  # path helpers only; never opened
    paths.sidecar_path(no_sidecar.hex).unlink()
    paths.blob_path(no_blob.hex).unlink()
    orphan = Manifest(
        ref="file:///models/orphan",
        piece_size=PIECE,
        files=(FileEntry(path="o", size=len(keep_b), blob=keep_manifest.files[1].blob),),
    )
    durable.atomic_write(root / "manifests" / f"{orphan.digest}.json", orphan.canonical_bytes(), mode=durable.BLOB_MODE)
    broken_blob = broken_manifest.files[0].blob.hex
    paths.blob_path(broken_blob).unlink()
    (root / "models" / "not-a-ref").mkdir()
    (root / "models" / "not-a-ref" / "f").write_bytes(b"z")
    (root / "partial" / "bytes-without-log").write_bytes(b"\0" * 100)
    durable.remove_tree(root / "models" / keep.escaped)  # the view of a good model is gone

    store = await opened(root)

    assert not any((root / "tmp").iterdir())
    assert not store.has_blob(no_sidecar.hex) and not paths.blob_path(no_sidecar.hex).exists()
    assert not store.has_blob(no_blob.hex) and not paths.sidecar_path(no_blob.hex).exists()
    assert not (root / "manifests" / f"{orphan.digest}.json").exists()
    assert store.model(broken) is None
    assert not (root / "refs" / broken.escaped).exists()
    assert not (root / "manifests" / f"{broken_manifest.digest}.json").exists()
    assert not (root / "models" / broken.escaped).exists()
    assert not (root / "models" / "not-a-ref").exists()
    assert not (root / "partial" / "bytes-without-log").exists()
    assert store.has_partial("resumable")

    rec = store.model(keep)
    assert rec is not None and rec.manifest == keep_manifest
    for entry, data in zip(keep_manifest.files, (keep_a, keep_b)):
        f = store.view_path(keep) / entry.path
        assert f.read_bytes() == data
        assert os.path.samefile(f, store.blob_path(entry.blob.hex))
    assert store.used_bytes == len(keep_a) + len(keep_b) + 2 * PIECE


def escaped_as_an_older_version_did(canonical: str) -> str:
    # ModelRef.escaped of before the revision bound (the formula did not change; the ref no
    # longer parses, so the name is computed here rather than through ModelRef).
    esc = quote(canonical, safe="")
    return esc if len(esc) <= 200 else esc[:150] + "%~" + blake3.blake3(canonical.encode()).hexdigest()[:40]


async def plant_hf_model(store: Store, canonical: str, commit: str, data: bytes, *, key: str) -> Manifest:
    """Blob, manifest and ref file for ``canonical`` written as an older version would have."""
    blob = await add_blob(store, data, key=key)
    entry = FileEntry(path="config.json", size=len(data), blob=blob, origin={"git_sha1": "1" * 40})
    manifest = Manifest(ref=canonical, revision=commit, piece_size=PIECE, files=(entry,))
    durable.atomic_write(store.manifest_path(manifest.digest), manifest.canonical_bytes(), mode=0o444)
    record = f"{canonical}\nblake3:{manifest.digest}\n{{}}\n"
    durable.atomic_write(store.refs_dir / escaped_as_an_older_version_did(canonical), record.encode())
    return manifest


async def test_open_skips_a_ref_whose_revision_is_too_long_for_a_file_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The finding: a 245-character hf revision, prefetched once, made every later start fail
    # with "File name too long" while rebuilding hf/models--org--name/refs/<revision>.
    root = tmp_path / "cache"
    store = await opened(root)
    good, good_manifest = await add_model(store, "file:///models/good", {"a.bin": content(tmp_path, PIECE, seed=30)})
    long_ref = "hf://org/name@" + "r" * 245
    planted = await plant_hf_model(store, long_ref, "c" * 40, content(tmp_path, 100, seed=31), key="long")
    ok = await plant_hf_model(store, "hf://org/name@main", "d" * 40, content(tmp_path, 120, seed=32), key="main")
    # A lease of an older version retains the long ref's manifest too: that path must not fail either.
    (root / "claims" / "leases" / "l1.json").write_text(
        json.dumps(
            {
                "lease_id": "l1",
                "ref": long_ref,
                "holder": "old",
                "expires_at": 1e12,
                "manifest": f"blake3:{planted.digest}",
            }
        )
    )
    (root / "claims" / "leases" / "l2.json").write_text("{not json")
    bad_manifest = store.manifest_path("e" * 64)
    bad_manifest.write_bytes(b"{not json")
    del store

    caplog.set_level(logging.WARNING)
    store = await opened(root)

    assert store.model(good) is not None and store.model(ModelRef.parse("hf://org/name@main")) is not None
    assert (root / "hf" / "models--org--name" / "refs" / "main").read_text() == "d" * 40
    assert (root / "hf" / "models--org--name" / "snapshots" / ("d" * 40) / "config.json").exists()
    assert not (root / "refs" / escaped_as_an_older_version_did(long_ref)).exists()
    assert store.bad_entries["ref"] == 1 and store.bad_entries["manifest"] == 1 and store.bad_entries["claim"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(escaped_as_an_older_version_did(long_ref) in w and "revision" in w for w in warnings)
    assert any(bad_manifest.name in w for w in warnings)
    assert not any(r.exc_info for r in caplog.records)
    assert ok.digest == store.ref_digest(ModelRef.parse("hf://org/name@main"))
    assert good_manifest.digest == store.ref_digest(good)


async def test_the_hf_view_leaves_out_a_commit_that_is_not_a_safe_name(tmp_path: Path) -> None:
    # Commits come from the origin; one that is not 40 hex (say "../" repeated) must neither
    # escape snapshots/ nor keep the repo's other revisions out of the view.
    root = tmp_path / "cache"
    store = await opened(root)
    await plant_hf_model(store, "hf://org/name@v1", "../" * 13 + "x", content(tmp_path, 100, seed=33), key="evil")
    await plant_hf_model(store, "hf://org/name@main", "d" * 40, content(tmp_path, 120, seed=34), key="main")
    del store
    await opened(root)  # a restart: the view is swept and rebuilt from what was indexed
    top = root / "hf" / "models--org--name"
    assert (top / "refs" / "main").read_text() == "d" * 40
    assert not (top / "refs" / "v1").exists()
    assert sorted(p.name for p in (top / "snapshots").iterdir()) == ["d" * 40]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["blobs", "partial", "manifests", "refs", "models", "hf", "tmp", "claims", "pulls"]
    )


async def test_open_repoints_a_view_file_that_is_a_copy(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = await opened(root)
    data = content(tmp_path, PIECE + 9, seed=20)
    ref, manifest = await add_model(store, "file:///models/copy", {"w.bin": data})
    view_file = store.view_path(ref) / "w.bin"
    view_file.unlink()
    view_file.write_bytes(data)  # same bytes, a separate inode: a second copy on disk
    assert not os.path.samefile(view_file, store.blob_path(manifest.files[0].blob.hex))

    store = await opened(root)
    assert os.path.samefile(store.view_path(ref) / "w.bin", store.blob_path(manifest.files[0].blob.hex))


async def test_open_drops_a_blob_whose_size_differs_from_its_sidecar(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = await opened(root)
    blob = await add_blob(store, content(tmp_path, 2 * PIECE, seed=21), key="short")
    path = store.blob_path(blob.hex)
    os.chmod(path, 0o644)
    os.truncate(path, PIECE)
    store = await opened(root)
    assert not store.has_blob(blob.hex)
    assert not path.exists() and not store.sidecar_path(blob.hex).exists()


# --- removal -------------------------------------------------------------------------------------


async def test_remove_model_deletes_only_blobs_no_other_manifest_uses(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = await opened(root)
    shared = content(tmp_path, 2 * PIECE, seed=30)
    only_x = content(tmp_path, 3 * PIECE + 1, seed=31)
    only_y = content(tmp_path, PIECE + 2, seed=32)
    x, mx = await add_model(store, "file:///models/x", {"shared.bin": shared, "x.bin": only_x})
    y, my = await add_model(store, "file:///models/y", {"shared.bin": shared, "y.bin": only_y})
    shared_hex = mx.files[0].blob.hex
    assert my.files[0].blob.hex == shared_hex
    x_hex = mx.files[1].blob.hex

    freed = await store.remove_model(x)

    assert freed == len(only_x)
    assert not store.view_path(x).exists()
    assert not (root / "refs" / x.escaped).exists()
    assert not (root / "manifests" / f"{mx.digest}.json").exists()
    assert not store.blob_path(x_hex).exists() and not store.sidecar_path(x_hex).exists()
    assert store.has_blob(shared_hex) and store.blob_path(shared_hex).exists()
    assert (store.view_path(y) / "shared.bin").read_bytes() == shared
    assert store.model(x) is None and store.model(y) is not None
    with pytest.raises(NotFoundError):
        await store.remove_model(x)

    # The on-disk state agrees after a restart: x stays gone, y stays whole.
    store = await opened(root)
    assert store.model(x) is None
    assert (store.view_path(y) / "y.bin").read_bytes() == only_y

    assert await store.remove_model(y) == len(shared) + len(only_y)
    assert store.blob_count() == 0
    assert not any(p for p in (root / "blobs").rglob("*") if p.is_file())
    assert not any((root / "manifests").iterdir()) and not any((root / "refs").iterdir())
    assert not any((root / "models").iterdir())


# --- space and eviction --------------------------------------------------------------------------


async def test_reserve_evicts_lru_models_to_make_room(tmp_path: Path) -> None:
    clock = Clock()
    store = await opened(tmp_path / "cache", max_bytes=16 * PIECE, clock=clock)
    refs = []
    for i in range(3):
        clock.now += 10
        ref, _ = await add_model(store, f"file:///models/r{i}", {"f": content(tmp_path, 4 * PIECE, seed=40 + i)})
        refs.append(ref)
    assert store.used_bytes == 12 * PIECE

    r = await store.reserve(8 * PIECE)  # 4 free: one model (the oldest) must go

    assert [store.model(ref) is None for ref in refs] == [True, False, False]
    assert store.reserved_bytes == 8 * PIECE
    # Reserved space counts: with the rest pinned, even one more piece does not fit...
    for ref in refs[1:]:
        await store.claims.pin(ref)
    with pytest.raises(StoreFullError):
        await store.reserve(PIECE)
    # ...until the reservation is released.
    r.release()
    assert store.reserved_bytes == 0
    (await store.reserve(PIECE)).release()
    assert [store.model(ref) is None for ref in refs] == [True, False, False]


async def test_reserve_raises_store_full_with_a_clear_message(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache", max_bytes=16 * PIECE)
    pinned, _ = await add_model(store, "file:///models/pinned", {"f": content(tmp_path, 10 * PIECE, seed=50)})
    await store.claims.pin(pinned)
    want = 8 * PIECE + 123

    with pytest.raises(StoreFullError) as info:
        await store.reserve(want)

    e = info.value
    assert e.needed_bytes == want
    assert e.available_bytes == 6 * PIECE
    assert format_size(want) in e.message and format_size(6 * PIECE) in e.message
    assert "not enough cache space" in e.message and "pinned" in e.message
    assert store.model(pinned) is not None
    assert store.reserved_bytes == 0


async def test_reserve_that_cannot_fit_evicts_nothing(tmp_path: Path) -> None:
    """Evicting models for a reservation that fails anyway destroys cache for no gain."""
    clock = Clock()
    store = await opened(tmp_path / "cache", max_bytes=16 * PIECE, clock=clock)
    pinned, _ = await add_model(store, "file:///models/pinned", {"f": content(tmp_path, 10 * PIECE, seed=51)})
    await store.claims.pin(pinned)
    clock.now += 10
    bystander, _ = await add_model(store, "file:///models/bystander", {"f": content(tmp_path, 3 * PIECE, seed=52)})

    with pytest.raises(StoreFullError):
        await store.reserve(9 * PIECE)  # 3 free + 3 evictable < 9: cannot fit whatever is evicted

    assert store.model(bystander) is not None, "a doomed reservation evicted an unprotected model"


async def test_evict_to_spares_pinned_leased_and_busy_models_and_goes_lru(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    store = await opened(tmp_path / "cache", max_bytes=64 * PIECE, clock=clock)
    names = ["pinned", "leased", "busy", "old", "mid", "new"]
    refs: dict[str, ModelRef] = {}
    for i, name in enumerate(names):
        clock.now = 1000.0 + i  # created oldest first: the protected ones are the least recently used
        refs[name], _ = await add_model(
            store, f"file:///models/{name}", {"w": content(tmp_path, 2 * PIECE, seed=60 + i)}
        )
    await store.claims.pin(refs["pinned"])
    lease = await store.claims.take_lease(refs["leased"], "launcher-1", ttl_s=3600)
    clock.now = 2000.0
    await store.touch(refs["old"])  # now the most recently used: "mid" is the oldest unprotected
    # Debris: a partial nobody is writing goes before any model.
    async with store.partial(key="stale", size=PIECE, piece_size=PIECE, identity_key="test|stale"):
        pass
    assert store.used_bytes == 13 * PIECE

    with store.busy(refs["busy"]):
        freed, evicted = await store.evict_to(store.used_bytes - PIECE - 1)
        assert evicted == ["file:///models/mid"]
        assert freed == 3 * PIECE  # the partial, then one model
        assert not store.has_partial("stale") and not any(store.partial_dir.iterdir())

        freed, evicted = await store.evict_to(0)
        assert evicted == ["file:///models/new", "file:///models/old"]
        assert freed == 4 * PIECE
        assert {r.ref for r in store.models()} == {refs[n].canonical for n in ("pinned", "leased", "busy")}

    # Once the claims end, the same models are evictable, least recently used first.
    clock.now = lease.expires_at + 1
    await store.claims.unpin(refs["pinned"])
    freed, evicted = await store.evict_to(store.used_bytes - 1)
    assert evicted == ["file:///models/pinned"]
    freed, evicted = await store.evict_to(0)
    assert evicted == ["file:///models/leased", "file:///models/busy"]
    assert store.used_bytes == 0 and store.blob_count() == 0


async def test_eviction_keeps_a_blob_that_a_running_fetch_holds(tmp_path: Path) -> None:
    """A fetch that reuses a stored blob holds it until its own manifest is published."""
    clock = Clock()
    store = await opened(tmp_path / "cache", max_bytes=64 * PIECE, clock=clock)
    shared = content(tmp_path, 2 * PIECE, seed=90)
    old, old_manifest = await add_model(
        store, "file:///models/old", {"shared.bin": shared, "o.bin": content(tmp_path, PIECE, seed=91)}
    )
    shared_blob = old_manifest.files[0].blob

    store.hold_blob(shared_blob.hex)  # as ModelFetcher.fetch does for a file it already has
    try:
        clock.now += 10
        freed, evicted = await store.evict_to(0)
        assert evicted == [old.canonical]
        assert store.has_blob(shared_blob.hex), "eviction deleted a blob a running fetch holds"
        assert store.blob_path(shared_blob.hex).exists()
        assert freed == PIECE  # only o.bin was freed
        new = ModelRef.parse("file:///models/new")
        manifest = Manifest(
            ref=new.canonical,
            piece_size=PIECE,
            files=(FileEntry(path="shared.bin", size=len(shared), blob=shared_blob),),
        )
        await store.commit_model(new, manifest)
    finally:
        store.unhold_blob(shared_blob.hex)
    assert (store.view_path(new) / "shared.bin").read_bytes() == shared


async def test_evict_to_under_target_does_nothing(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache", max_bytes=64 * PIECE)
    ref, _ = await add_model(store, "file:///models/small", {"w": content(tmp_path, PIECE, seed=70)})
    assert await store.evict_to(store.used_bytes) == (0, [])
    assert store.model(ref) is not None


# --- verify --------------------------------------------------------------------------------------


async def test_verify_blob_finds_the_piece_of_a_flipped_byte(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache")
    size = 6 * PIECE + 77
    data = content(tmp_path, size, seed=80)
    blob = await add_blob(store, data, key="v")

    assert await store.verify_blob(blob.hex) == (size, [])
    flip_byte(store.blob_path(blob.hex), 3 * PIECE + 12345)
    flip_byte(store.blob_path(blob.hex), size - 1)  # in the short last piece
    checked, bad = await store.verify_blob(blob.hex)
    assert checked == size
    assert bad == [3, 6]
    assert await store.read_piece(blob.hex, 2, PIECE) == data[2 * PIECE : 3 * PIECE]
    assert len(await store.piece_digests(blob.hex)) == 7


async def test_evict_to_runs_the_eviction_plan(tmp_path: Path) -> None:
    clock = Clock()
    store = await opened(tmp_path / "cache", max_bytes=64 * PIECE, clock=clock)
    older, _ = await add_model(store, "file:///models/older", {"w": content(tmp_path, 2 * PIECE, seed=71)})
    clock.now += 1
    await add_model(store, "file:///models/newer", {"w": content(tmp_path, 2 * PIECE, seed=72)})
    plan = store.eviction_plan(store.used_bytes - 1)
    assert plan.models == (older.canonical,) and plan.freed_bytes == 2 * PIECE and plan.short_bytes == 0
    assert store.model(older) is not None, "a plan is only a plan"
    assert await store.evict_to(store.used_bytes - 1) == (2 * PIECE, [older.canonical])


# --- events --------------------------------------------------------------------------------------


async def test_the_store_announces_each_change_as_an_event_in_order(tmp_path: Path) -> None:
    events: list[StoreEvent] = []
    store = make_store(tmp_path / "cache", on_event=events.append)
    await store.open()
    assert events == [], "opening announces nothing: a listener starts from state_events()"
    data = content(tmp_path, 2 * PIECE + 3, seed=100)
    blob = await add_blob(store, data, key="e1")
    pieces = [hash_piece(data[o : o + n]) for o, n in (piece_span(i, len(data), PIECE) for i in range(3))]
    await asyncio.sleep(0)  # pieces are announced from worker threads through the loop
    assert events[0] == PartialStarted(key="e1", size=len(data), piece_size=PIECE)
    assert sorted(e.index for e in events[1:4] if isinstance(e, PieceVerified)) == [0, 1, 2]
    assert {e.digest for e in events[1:4] if isinstance(e, PieceVerified)} == set(pieces)
    assert events[4:] == [
        BlobAdded(blob_hex=blob.hex, size=len(data), identity_key="test|e1"),
        PartialDropped(key="e1"),
    ]

    events.clear()
    ref = ModelRef.parse("file:///models/ev")
    manifest = Manifest(ref=ref.canonical, piece_size=PIECE, files=(FileEntry(path="w", size=len(data), blob=blob),))
    await store.commit_model(ref, manifest)
    assert events == [ManifestAdded(digest=manifest.digest), RefChanged(ref=ref.canonical, digest=manifest.digest)]

    events.clear()
    await store.remove_model(ref)
    assert events == [
        RefChanged(ref=ref.canonical, digest=None),
        ManifestRemoved(digest=manifest.digest),
        BlobRemoved(blob_hex=blob.hex),
    ]

    events.clear()
    async with store.partial(key="gone", size=PIECE, piece_size=PIECE, identity_key="test|gone"):
        await store.discard_partial("gone")
    assert events == [PartialStarted(key="gone", size=PIECE, piece_size=PIECE), PartialDropped(key="gone")]


async def test_state_events_describe_what_the_live_events_built(tmp_path: Path) -> None:
    """Holdings fed every event since an empty start equal holdings seeded from state_events(),
    also after a restart (the daemon seeds its holdings from them)."""
    live = LocalHoldings()
    store = make_store(tmp_path / "cache", on_event=live.record)
    await store.open()
    _, m1 = await add_model(
        store, "hf://org/m@main", {"a": content(tmp_path, PIECE, seed=110), "b": content(tmp_path, 3, seed=111)}
    )
    ref2, _ = await add_model(store, "http://h/x.bin", {"x.bin": content(tmp_path, 2 * PIECE, seed=112)})
    await add_model(store, "file:///models/local", {"l": content(tmp_path, 5, seed=113)})
    await store.remove_model(ref2)
    async with store.partial(key="open", size=2 * PIECE, piece_size=PIECE, identity_key="test|open") as p:
        await asyncio.to_thread(p.write_piece_sync, 1, content(tmp_path, PIECE, seed=114))
        await asyncio.sleep(0)
        seeded = LocalHoldings()
        for event in store.state_events():
            seeded.record(event)
        assert seeded.state.to_json() | {"version": 0} == live.state.to_json() | {"version": 0}
        assert seeded.state.partials["open"].pieces.keys() == {1}

    reopened = await opened(tmp_path / "cache")
    after = LocalHoldings()
    for event in reopened.state_events():
        after.record(event)
    assert after.state.to_json() | {"version": 0} == live.state.to_json() | {"partials": {}, "version": 0}
    assert after.state.refs == {"hf://org/m@main": m1.digest}, "a file:// ref is never announced"


# --- reading verified bytes ----------------------------------------------------------------------


async def test_read_verified_gives_only_verified_pieces_of_a_partial(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache")
    data = content(tmp_path, 4 * PIECE + 10, seed=120)
    span = lambda i: data[piece_span(i, len(data), PIECE)[0] : sum(piece_span(i, len(data), PIECE))]  # noqa: E731
    async with store.partial(key="rv", size=len(data), piece_size=PIECE, identity_key="test|rv") as p:
        for i in (1, 2, 4):
            await asyncio.to_thread(p.write_piece_sync, i, span(i))
        # Piece 0 is written in place but not recorded: its bytes are on disk, not verified.
        await asyncio.to_thread(p.write_at_sync, span(0), 0, 0)

        assert await store.read_verified(partial_key="rv", offset=0, length=10) is None
        assert await store.read_verified(partial_key="rv", offset=PIECE + 5, length=10) == data[PIECE + 5 : PIECE + 15]
        # A verified run ends where the first unverified piece starts.
        assert (
            await store.read_verified(partial_key="rv", offset=PIECE + 5, length=len(data))
            == data[PIECE + 5 : 3 * PIECE]
        )
        assert await store.read_verified(partial_key="rv", offset=3 * PIECE, length=1) is None
        assert await store.read_verified(partial_key="rv", offset=4 * PIECE, length=100) == data[4 * PIECE :]
        assert await store.read_verified(partial_key="nope", offset=0, length=1) is None

        f = await store.open_verified(partial_key="rv")
        assert f is not None
        with f:
            assert (
                f.verified(PIECE, 3 * PIECE - 1) and not f.verified(0, 0) and not f.verified(3 * PIECE - 1, 3 * PIECE)
            )
            assert not f.verified(4 * PIECE, len(data)), "past the end is never verified"
            with pytest.raises(IntegrityError):
                await f.read(PIECE - 1, 2)
            await asyncio.to_thread(p.write_piece_sync, 0, span(0))
            await asyncio.to_thread(p.write_piece_sync, 3, span(3))
            assert f.verified(0, len(data) - 1), "a piece recorded after opening counts at once"
            blob = await store.finalize(p)
            # The reader holds its own descriptor: the finalized inode, renamed into blobs/.
            assert await f.read(0, len(data)) == data
    assert await store.read_verified(partial_key="rv", offset=0, length=1) is None
    assert await store.read_verified(blob_hex=blob.hex, offset=3, length=PIECE) == data[3 : PIECE + 3]
    assert await store.read_verified(blob_hex=blob.hex, offset=len(data) - 2, length=PIECE) == data[-2:]
    assert await store.read_verified(blob_hex=blob.hex, offset=len(data), length=1) == b"", "the end of a blob"
    assert await store.read_verified(blob_hex="0" * 64, offset=0, length=1) is None
    assert await store.piece_log(blob.hex) == store.sidecar_path(blob.hex).read_bytes()
    assert await store.piece_log("0" * 64) is None


async def test_a_verified_reader_closed_mid_read_keeps_its_descriptor_until_the_read_ends(tmp_path: Path) -> None:
    store = await opened(tmp_path / "cache")
    data = content(tmp_path, 2 * PIECE, seed=121)
    blob = await add_blob(store, data, key="cl")
    f = await store.open_verified(blob_hex=blob.hex)
    assert f is not None
    read = asyncio.ensure_future(f.read(0, len(data)))
    f.close()  # as a cancelled stream does while a worker thread may be in pread
    try:
        got = await read
    except StoreError:
        return  # closed before the read began: refused, never another file's bytes
    assert got == data
