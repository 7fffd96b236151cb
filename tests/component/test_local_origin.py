"""LocalOrigin on real files and directories: walk rules, reads, change detection."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from cached.errors import OriginChanged, OriginError, OriginNotFound
from cached.origins.local import LocalOrigin
from cached.types import ModelRef
from tests.support.origin import write_random_file


def file_ref(path: Path) -> ModelRef:
    return ModelRef.parse("file://" + quote(str(path)))


async def test_file_ref_resolves_to_one_file(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "w" / "model.gguf", 70_000, seed=1)
    res = await LocalOrigin().resolve(file_ref(src))
    (f,) = res.files
    assert f.path == "model.gguf"
    assert f.size == 70_000
    assert f.locator == str(src)
    origin = LocalOrigin()
    assert origin.supports_ranges(f) and origin.local_path(f) == str(src)


async def test_directory_ref_walks_nested_dirs_and_skips_symlinked_dirs_and_dangling_links(tmp_path: Path) -> None:
    root = tmp_path / "model"
    write_random_file(root / "config.json", 100, seed=1)
    write_random_file(root / "weights" / "part-1.bin", 65536 + 1, seed=2)
    write_random_file(root / "weights" / "deep" / "er" / "part-2.bin", 10, seed=3)
    (root / "empty.txt").write_bytes(b"")
    outside = tmp_path / "elsewhere"
    write_random_file(outside / "secret.bin", 50, seed=4)
    os.symlink(outside, root / "linked-dir")  # a symlinked directory is not followed
    os.symlink(tmp_path / "does-not-exist", root / "dangling.bin")
    os.symlink(root / "config.json", root / "alias.json")  # a symlink to a regular file is a file
    os.mkfifo(root / "fifo")  # not a regular file

    res = await LocalOrigin().resolve(file_ref(root))

    by_path = {f.path: f for f in res.files}
    assert sorted(by_path) == [
        "alias.json",
        "config.json",
        "empty.txt",
        "weights/deep/er/part-2.bin",
        "weights/part-1.bin",
    ]
    assert by_path["weights/part-1.bin"].size == 65537
    assert by_path["weights/part-1.bin"].locator == str(root / "weights" / "part-1.bin")
    assert by_path["empty.txt"].size == 0
    assert len({f.key for f in res.files}) == len(res.files)


async def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(OriginNotFound) as info:
        await LocalOrigin().resolve(file_ref(tmp_path / "missing"))
    assert not info.value.retryable
    assert str(tmp_path / "missing") in info.value.message


async def test_directory_without_files_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "hollow" / "sub").mkdir(parents=True)
    with pytest.raises(OriginNotFound):
        await LocalOrigin().resolve(file_ref(tmp_path / "hollow"))


async def test_read_range_and_stream_give_exact_bytes(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "m.bin", 3 * 65536 + 7, seed=5)
    data = src.read_bytes()
    origin = LocalOrigin()
    (f,) = (await origin.resolve(file_ref(src))).files
    assert await origin.read_range(f, 65536, 65536) == data[65536:131072]
    assert await origin.read_range(f, len(data) - 7, 7) == data[-7:]
    assert b"".join([c async for c in origin.stream(f)]) == data
    with pytest.raises(OriginChanged):
        await origin.read_range(f, len(data) - 7, 8)  # past the end: the file is shorter than asked


async def test_check_unchanged_passes_for_an_untouched_file(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "m.bin", 1000, seed=6)
    origin = LocalOrigin()
    (f,) = (await origin.resolve(file_ref(src))).files
    await origin.check_unchanged(f)


async def test_check_unchanged_raises_after_the_file_is_appended_to(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "m.bin", 1000, seed=7)
    origin = LocalOrigin()
    (f,) = (await origin.resolve(file_ref(src))).files
    with open(src, "ab") as fh:
        fh.write(b"more")
    with pytest.raises(OriginChanged, match="changed"):
        await origin.check_unchanged(f)


async def test_check_unchanged_raises_after_a_same_size_rewrite(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "m.bin", 1000, seed=8)
    origin = LocalOrigin()
    (f,) = (await origin.resolve(file_ref(src))).files
    st = src.stat()
    with open(src, "r+b") as fh:
        fh.write(b"X")
    # Timestamps are coarse: give the rewrite a distinct mtime, as a later write would have.
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(OriginChanged):
        await origin.check_unchanged(f)


async def test_check_unchanged_raises_after_the_file_is_replaced(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "m.bin", 1000, seed=9)
    origin = LocalOrigin()
    (f,) = (await origin.resolve(file_ref(src))).files
    new = write_random_file(tmp_path / "m.bin.new", 1000, seed=9)  # same bytes, new inode
    os.utime(new, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    os.replace(new, src)
    with pytest.raises(OriginChanged):
        await origin.check_unchanged(f)


async def test_check_unchanged_on_a_deleted_file_is_not_found(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "m.bin", 1000, seed=10)
    origin = LocalOrigin()
    (f,) = (await origin.resolve(file_ref(src))).files
    src.unlink()
    with pytest.raises(OriginError):
        await origin.check_unchanged(f)


# --- the policy: roots, the daemon's own files, the caller's rights ----------------------------------

from cached.origins.local import FileNotAllowed, FilePolicy  # noqa: E402


def open_tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


async def test_a_policy_refuses_outside_the_roots_symlinks_out_and_the_daemons_secrets(tmp_path: Path) -> None:
    root = open_tree(tmp_path)
    secret = tmp_path / "cluster.token"
    secret.write_text("token")
    (root / "ok.bin").write_bytes(b"ok")
    (root / "out.bin").symlink_to(secret)
    os.link(secret, root / "hardlink.token")
    (tmp_path / "elsewhere.bin").write_bytes(b"x")
    origin = LocalOrigin(FilePolicy.build([root], secrets=[secret], private_dirs=[tmp_path / "cache"]))
    await origin.authorize(file_ref(root / "ok.bin"), uid=0)
    assert len((await origin.resolve(file_ref(root / "ok.bin"))).files) == 1
    for path, why in (
        (root / "out.bin", "not under an allowed"),
        (root / "hardlink.token", "never imported"),
        (tmp_path / "elsewhere.bin", "not under an allowed"),
        (root, "never imported|not under"),
    ):
        with pytest.raises(FileNotAllowed, match=why):
            await origin.authorize(file_ref(path), uid=0)
    with pytest.raises(FileNotAllowed, match="--allow-file-root"):
        await LocalOrigin(FilePolicy.build([])).authorize(file_ref(root / "ok.bin"), uid=0)


async def test_resolve_imports_only_approved_file_versions(tmp_path: Path) -> None:
    root = open_tree(tmp_path)
    (root / "m.bin").write_bytes(b"first")
    origin = LocalOrigin(FilePolicy.build([root]))
    with pytest.raises(OriginChanged):
        await origin.resolve(file_ref(root / "m.bin"))  # nobody was checked for it
    await origin.authorize(file_ref(root / "m.bin"), uid=0)
    await origin.resolve(file_ref(root / "m.bin"))
    os.unlink(root / "m.bin")
    (root / "m.bin").write_bytes(b"swapped in after the check")
    with pytest.raises(OriginChanged):
        await origin.resolve(file_ref(root / "m.bin"))


def test_may_read_follows_the_mode_bits_of_the_file_and_every_directory(tmp_path: Path) -> None:
    from cached.origins.local import DirModes, may_read

    f = tmp_path / "f"
    f.write_bytes(b"x")
    real = os.path.realpath(f)
    parent_mode = tmp_path.stat().st_mode & 0o777
    try:
        tmp_path.chmod(0o755)
        for mode, other_ok in ((0o644, True), (0o640, False), (0o604, True), (0o600, False)):
            f.chmod(mode)
            st = f.stat()
            # Unknown caller: "other" bits, and o+x on every directory up to / (tmp_path's parents
            # may be 0700 here, so only the file's own bits are compared through a 0755 chain).
            chain_ok = all((p.stat().st_mode & 0o001) for p in [tmp_path, *tmp_path.parents])
            assert may_read(None, frozenset(), real, st, DirModes()) == (other_ok and chain_ok), oct(mode)
            assert may_read(0, frozenset(), real, st, DirModes()) is True
            owner = st.st_uid if st.st_uid != 0 else None
            if owner is not None:
                assert may_read(owner, frozenset(), real, st, DirModes()) == bool(mode & 0o400)
    finally:
        tmp_path.chmod(parent_mode)
