"""``file://`` is local and limited: the attacks of issue 18, replayed by a second local user.

The daemon runs as root; uid 65534 (``nobody``, no groups) talks to it -- over a unix socket of
mode 0666, and over loopback TCP -- and asks it to import files it could not read itself: a 0640
root-owned token, a 0600 ``shadow``-like file, a file outside the allowed roots, a symlink out of
the root, and the daemon's own cluster token (world-readable, under the root: refused even to
root). Before the fix each of these was copied into the store and became readable in the model
view. Now each is a 403 naming the file, and no byte of it reaches the store. A world-readable
file under the root is still imported for nobody, and root may import its own 0640 file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cached.api.client import ApiClient
from tests.support.asuser import NOBODY, request_as
from tests.support.node import DaemonProcess, running_daemon

pytestmark = [pytest.mark.system]

SECRET = b"s3cr3t-token-value-that-must-never-reach-the-store"
SHADOW = b"root:$6$notreally$hash:19000:0:99999:7:::\n"
CLUSTER_TOKEN = b"local-trust-cluster-token-0123456789"
PUBLIC = b"public weights " * 1000


@pytest.fixture
def world() -> Iterator[Path]:
    """A tree under /tmp every user may traverse (pytest's tmp dirs are 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the daemon runs as root and the attacker as uid 65534")
    base = Path(tempfile.mkdtemp(prefix="cached-trust-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "models"
    root.mkdir(mode=0o755)
    (root / "public.bin").write_bytes(PUBLIC)
    (root / "public.bin").chmod(0o644)
    (root / "secret.token").write_bytes(SECRET)
    (root / "secret.token").chmod(0o640)
    (root / "shadow").write_bytes(SHADOW)
    (root / "shadow").chmod(0o600)
    (root / "cluster.token").write_bytes(CLUSTER_TOKEN)
    (root / "cluster.token").chmod(0o644)
    mixed = root / "mixed"
    mixed.mkdir(mode=0o755)
    (mixed / "readme.txt").write_bytes(b"hello")
    (mixed / "readme.txt").chmod(0o644)
    (mixed / "key.pem").write_bytes(SECRET)
    (mixed / "key.pem").chmod(0o600)
    outside = base / "outside"
    outside.mkdir(mode=0o755)
    (outside / "public.bin").write_bytes(b"outside " + SECRET)
    (outside / "public.bin").chmod(0o644)
    (root / "escape.bin").symlink_to(outside / "public.bin")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def store_holds(cache: Path, *needles: bytes) -> list[str]:
    """Files under the store whose bytes contain any needle."""
    found = []
    for dirpath, _, names in os.walk(cache):
        for name in names:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if not p.is_symlink() and any(n in p.read_bytes() for n in needles):
                    found.append(str(p))
    return found


REFUSED = {
    "secret.token": "may not read",
    "shadow": "may not read",
    "cluster.token": "never imported",
    "escape.bin": "not under an allowed file root",
    "mixed": "may not read",
}


def prefetch_body(path: Path) -> dict[str, object]:
    return {"ref": f"file://{path}", "wait": True}


@contextlib.contextmanager
def unix_daemon(world: Path) -> Iterator[DaemonProcess]:
    config = world / "config.toml"
    config.write_text('[api]\nsocket_mode = "0666"\n')
    proc = DaemonProcess(
        world,
        "--config",
        str(config),
        "--cluster-token-file",
        str(world / "models" / "cluster.token"),
        file_roots=(world / "models",),
    )
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_nobody_on_the_unix_socket_imports_only_what_it_could_read(world: Path) -> None:
    root = world / "models"
    with unix_daemon(world) as d:
        sock = str(d.socket)
        for name, why in REFUSED.items():
            a = request_as(
                NOBODY, NOBODY, unix=sock, method="POST", target="/v1/prefetch", body=prefetch_body(root / name)
            )
            assert a.status == 403, (name, a)
            assert a.body["error"] == "file_not_allowed" and why in a.body["message"], (name, a.body)
            assert name in a.body["message"], "the refusal names the file"
        a = request_as(
            NOBODY,
            NOBODY,
            unix=sock,
            method="POST",
            target="/v1/prefetch",
            body=prefetch_body(world / "outside" / "public.bin"),
        )
        assert a.status == 403 and "--allow-file-root" in a.body["message"], a

        a = request_as(
            NOBODY, NOBODY, unix=sock, method="POST", target="/v1/prefetch", body=prefetch_body(root / "public.bin")
        )
        assert a.status == 200 and a.body["state"] == "ready", a
        assert (Path(a.body["path"]) / "public.bin").read_bytes() == PUBLIC

        # Root may import its own 0640 file; the daemon's token stays refused even to root.
        a = request_as(0, 0, unix=sock, method="POST", target="/v1/prefetch", body=prefetch_body(root / "secret.token"))
        assert a.status == 200 and a.body["state"] == "ready", a
        a = request_as(
            0, 0, unix=sock, method="POST", target="/v1/prefetch", body=prefetch_body(root / "cluster.token")
        )
        assert a.status == 403 and "never imported" in a.body["message"], a
        # ... and a root import does not open it to nobody: asking again is checked again.
        a = request_as(
            NOBODY, NOBODY, unix=sock, method="POST", target="/v1/prefetch", body=prefetch_body(root / "secret.token")
        )
        assert a.status == 403, a

        models = request_as(0, 0, unix=sock, target="/v1/models").body
        assert sorted(m["ref"].rsplit("/", 1)[1] for m in models) == ["public.bin", "secret.token"], models
        assert store_holds(d.cache_dir, SHADOW, CLUSTER_TOKEN, b"outside ", b"hello") == []


async def test_nobody_over_loopback_tcp_is_identified_and_checked_the_same_way(world: Path) -> None:
    root = world / "models"
    cache = world / "cache"
    flags = {"origins.file.allowed_roots": [str(root)], "cluster.token_file": str(root / "cluster.token")}
    async with running_daemon(cache, **flags) as d:
        host, port = d.api_address.removeprefix("http://").rsplit(":", 1)

        def ask(path: Path) -> object:
            return request_as(
                NOBODY, NOBODY, tcp=(host, int(port)), method="POST", target="/v1/prefetch", body=prefetch_body(path)
            )

        for name, why in REFUSED.items():
            a = await asyncio.to_thread(ask, root / name)
            assert a.status == 403 and why in a.body["message"], (name, a)
        a = await asyncio.to_thread(ask, root / "public.bin")
        assert a.status == 200 and a.body["state"] == "ready", a
        async with ApiClient(d.api_address) as api:
            assert [m["ref"].rsplit("/", 1)[1] for m in await api.request("GET", "/v1/models")] == ["public.bin"]
        assert store_holds(cache, SECRET, SHADOW, CLUSTER_TOKEN) == []


async def test_no_roots_configured_means_no_file_imports(tmp_path: Path) -> None:
    (tmp_path / "m.bin").write_bytes(b"x" * 100)
    async with (
        running_daemon(tmp_path / "cache", **{"origins.file.allowed_roots": []}) as d,
        ApiClient(d.api_address) as api,
    ):
        with pytest.raises(Exception) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": f"file://{tmp_path / 'm.bin'}", "wait": True})
        assert getattr(e.value, "status", None) == 403 and "--allow-file-root" in e.value.message
        assert await api.request("GET", "/v1/models") == []
