"""containerd pulling a model artifact through the node's ``/v2`` mirror, configured the way the
README documents it: a ``hosts.toml`` that lists the node as a pull/resolve host of the registry.

The test starts its own containerd (Debian's ``containerd``: a temporary root, state and socket,
no CRI, no snapshotters it cannot use) and a real registry (``docker-registry``) behind a relaying
proxy that counts blob bytes. ``ctr content fetch --hosts-dir DIR`` fetches the artifact: every
blob in containerd's content store is byte-identical to what was pushed, the node counted them in
``cached_local_served_bytes_total{api="v2"}``, and the registry sent each blob once (to the node).
Skipped, with the reason, where containerd is not installed or cannot start here.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import metric
from tests.support.node import running_daemon
from tests.support.registry import Registry, TokenProxy, sha256, tar_of

pytestmark = [pytest.mark.system]

WEIGHTS = bytes(range(256)) * 8192 + b"containerd"  # 2 MiB + 10: several pieces
RAW = "application/vnd.cncf.model.weight.v1.raw"
NAMESPACE = "cached-test"


def config_toml(root: Path, state: Path, sock: Path) -> str:
    # Only what a content fetch needs: no CRI (it wants a runtime and cgroups), no snapshotters
    # that need devices or kernel modules, no debug/metrics listeners, nothing under /opt.
    disabled = [
        "io.containerd.grpc.v1.cri",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.internal.v1.opt",
        "io.containerd.internal.v1.tracing",
        "io.containerd.tracing.processor.v1.otlp",
    ]
    return (
        "version = 2\n"
        f'root = "{root}"\n'
        f'state = "{state}"\n'
        f"disabled_plugins = [{', '.join(repr(p).replace(chr(39), chr(34)) for p in disabled)}]\n"
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
        '[debug]\n  address = ""\n'
        '[metrics]\n  address = ""\n'
    )


def hosts_toml(registry: str, mirror: str) -> str:
    """The README's hosts.toml: the registry as the server, the node as a pull/resolve mirror."""
    return f'server = "http://{registry}"\n\n[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'


@pytest.fixture
def containerd() -> Iterator[tuple[str, Path]]:
    """(socket address, work dir) of a private containerd, stopped at the end."""
    binary = shutil.which("containerd")
    if binary is None or shutil.which("ctr") is None:
        pytest.skip("containerd is not installed (Debian package containerd; run scripts/test-deps)")
    # A short path: a unix socket's name is limited to 107 bytes, pytest's tmp_path can be longer.
    work = Path(tempfile.mkdtemp(prefix="cached-ctrd-", dir="/tmp"))
    sock = work / "c.sock"
    config = work / "config.toml"
    config.write_text(config_toml(work / "root", work / "state", sock))
    log = open(work / "containerd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):  # bounded: 20 s
            if proc.poll() is not None:
                break
            ok = subprocess.run(
                ["ctr", "--address", str(sock), "version"], capture_output=True, timeout=10, check=False
            )
            if ok.returncode == 0:
                break
            time.sleep(0.1)  # polling the socket until containerd answers (bounded above)
        else:
            pytest.skip(f"containerd did not answer on its socket: {(work / 'containerd.log').read_text()[-1500:]}")
        if proc.poll() is not None:
            pytest.skip(f"containerd cannot start here: {(work / 'containerd.log').read_text()[-1500:]}")
        yield str(sock), work
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


async def ctr(sock: str, *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "ctr",
        "--address",
        sock,
        "--namespace",
        NAMESPACE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"ctr {' '.join(args)}: {err.decode()[-2000:]}"
    return out


async def test_ctr_fetches_an_artifact_through_the_mirror_named_in_hosts_toml(
    tmp_path: Path, containerd: tuple[str, Path]
) -> None:
    sock, work = containerd
    layer = tar_of({"models/tokenizer.json": b'{"v": 1}'}, gz=True)
    async with contextlib.AsyncExitStack() as stack:
        reg = await stack.enter_async_context(Registry(tmp_path / "reg"))
        proxy = await stack.enter_async_context(TokenProxy(reg.url, need_token=False))
        digest, manifest = await reg.push_artifact(
            "models/tiny",
            "v1",
            [
                (WEIGHTS, RAW, {"org.cncf.model.filepath": "model.safetensors"}),
                (layer, "application/vnd.oci.image.layer.v1.tar+gzip", {}),
            ],
        )
        node = await stack.enter_async_context(
            running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [proxy.host]})
        )
        mirror = node.api_address.removeprefix("http://")
        hosts = work / "certs.d"
        (hosts / proxy.host).mkdir(parents=True)
        (hosts / proxy.host / "hosts.toml").write_text(hosts_toml(proxy.host, mirror))

        await ctr(sock, "content", "fetch", "--hosts-dir", str(hosts), f"{proxy.host}/models/tiny:v1")

        blobs = [WEIGHTS, layer, b"{}"]  # the layers and the (empty) config
        for data in blobs:
            got = await ctr(sock, "content", "get", sha256(data))
            assert got == data
        assert await ctr(sock, "content", "get", digest) == manifest
        served = await metric(node, "cached_local_served_bytes_total", api="v2")
        assert served >= sum(len(b) for b in blobs) + len(manifest), served
        # The node read each blob from the registry once; containerd did not go around it.
        assert proxy.blob_bytes == sum(len(b) for b in blobs), proxy.blob_bytes
