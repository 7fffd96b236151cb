"""Who may talk to the daemon: the unix socket's mode, and the HF endpoint's trust boundary.

On a unix socket the file mode decides who may connect at all (``api.socket_mode``, default
0660); past that, admin routes and ``file://`` imports look at who connected (``SO_PEERCRED``:
``tests/integration/test_admin_api.py``, ``tests/system/test_local_trust.py``). A daemon started by root creates the socket
``root:root 0660``; a process of another user connects (a forked child that drops to uid/gid
65534, ``nobody``) and gets EACCES, while the same uid in the socket's group gets in. With
``socket_mode = "0666"`` anyone on the host gets in.

The HF endpoint (``/hf``) serves every file the node holds to whoever reaches the local API,
including files of gated repos fetched with the daemon's own token (``cached/api/hf.py``, README,
"Trust boundary"). The peer API is the network-facing one and has no ``/hf`` route: 401 without the
cluster token, 404 with it, and the upstream hub never hears of those requests. What the peer API
does serve -- blobs by id -- needs the cluster token (401 without it on every route:
``tests/integration/test_peer_api.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from cached.api.client import ApiClient
from tests.support.hfclients import tiny_model_files
from tests.support.hub import Hub
from tests.support.node import DaemonProcess, running_daemon
from tests.support.peerauth import signed

pytestmark = [pytest.mark.system]

NOBODY = 65534
CLUSTER_TOKEN = "socket-auth-cluster-token-0123456789"
HF_TOKEN = "hf_daemon_token_for_gated"
GATED = "acme/gated-model"


def connect_as(path: Path, uid: int, gid: int, timeout_s: float = 10.0) -> str:
    """``GET /healthz`` over the unix socket from a forked child running as ``uid:gid`` (no
    supplementary groups). Returns ``"200"`` (or another status), or ``"errno EACCES"``/..."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, try, report, exit without running any Python cleanup
        out = b"error"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            out = data.split(b" ", 2)[1] if data.startswith(b"HTTP/1.") else b"garbage"
        except OSError as e:
            out = f"errno {errno.errorcode.get(e.errno or 0, e.errno)}".encode()
        finally:
            with contextlib.suppress(OSError):
                os.write(w, out)
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + timeout_s
    try:
        ready, _, _ = select.select([r], [], [], timeout_s)
        answer = os.read(r, 256).decode() if ready else "timeout"
    finally:
        os.close(r)
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return answer


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp dirs are 0700), so the socket's own mode decides."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test creates the socket as root and connects as uid 65534")
    path = Path(tempfile.mkdtemp(prefix="cached-sock-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def daemon(workdir: Path, *extra: str) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(workdir, *extra)
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_default_socket_mode_0660_admits_owner_and_group_but_not_others(sock_dir: Path) -> None:
    with daemon(sock_dir) as d:
        st = d.socket.stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, 0), oct(st.st_mode)
        assert connect_as(d.socket, 0, 0) == "200"  # the owner
        assert connect_as(d.socket, NOBODY, 0) == "200"  # another user, in the socket's group
        assert connect_as(d.socket, NOBODY, NOBODY) == "errno EACCES"  # anyone else
        assert d.cachectl("status").returncode == 0, "the daemon is unharmed"


def test_socket_mode_0666_admits_everyone(sock_dir: Path) -> None:
    config = sock_dir / "config.toml"
    config.write_text('[api]\nsocket_mode = "0666"\n')
    with daemon(sock_dir, "--config", str(config)) as d:
        assert d.socket.stat().st_mode & 0o777 == 0o666
        assert connect_as(d.socket, NOBODY, NOBODY) == "200"


async def test_a_gated_repo_is_served_on_the_local_api_only(tmp_path: Path) -> None:
    (tmp_path / "hf.token").write_text(HF_TOKEN)
    (tmp_path / "cluster.token").write_text(CLUSTER_TOKEN)
    files = tiny_model_files(weights_size=20_000, seed=11)
    async with Hub(tokens={HF_TOKEN}) as hub:
        hub.add_repo(GATED, files, gated=True)
        flags = {
            "origins.hf.endpoint": hub.url,
            "origins.hf.token_file": str(tmp_path / "hf.token"),
            "cluster.token_file": str(tmp_path / "cluster.token"),
            "store.piece_size_bytes": "64K",
        }
        async with running_daemon(tmp_path / "cache", **flags) as d, ApiClient(d.api_address) as api:
            model = await api.request("POST", "/v1/prefetch", body={"ref": f"hf://{GATED}", "wait": True})
            assert model["state"] == "ready", model
            async with aiohttp.ClientSession() as s:
                # The local API serves it to a caller with no token at all: that is the boundary.
                async with s.get(f"{d.api_address}/hf/{GATED}/resolve/main/config.json") as resp:
                    assert resp.status == 200
                    assert await resp.read() == files["config.json"]

                hub_requests = len(hub.counters.log)
                peer = f"http://{d.peer_address}"
                for path in (
                    f"/hf/{GATED}/resolve/main/config.json",
                    f"/hf/api/models/{GATED}",
                    f"/p2p/v1/hf/{GATED}/resolve/main/config.json",
                    f"/p2p/v1/{GATED}/resolve/main/config.json",
                ):
                    for headers, status in (
                        ({}, 401),
                        ({"Authorization": f"Bearer {CLUSTER_TOKEN}"}, 401),
                        (signed(CLUSTER_TOKEN, "GET", peer + path), 404),
                    ):
                        async with s.get(peer + path, headers=headers) as resp:
                            body = await resp.read()
                            assert resp.status == status, (path, headers, resp.status, body[:200])
                            assert files["config.json"] not in body
                assert len(hub.counters.log) == hub_requests, "the peer API never relays to the hub"

                # What the peer API does serve (blobs by id) is behind the cluster token.
                manifest = d.store.manifest(model["manifest"].removeprefix("blake3:"))
                assert manifest is not None
                blob = next(f.blob.hex for f in manifest.files if f.path == "config.json")
                async with s.get(f"{peer}/p2p/v1/blobs/{blob}", headers={"Range": "bytes=0-"}) as resp:
                    assert resp.status == 401
                async with s.get(
                    f"{peer}/p2p/v1/blobs/{blob}",
                    headers={"Range": "bytes=0-", **signed(CLUSTER_TOKEN, "GET", f"{peer}/p2p/v1/blobs/{blob}")},
                ) as resp:
                    assert resp.status == 206 and await resp.read() == files["config.json"]
