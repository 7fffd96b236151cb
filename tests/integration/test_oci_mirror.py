"""The ``/v2`` pull-through mirror with a real client (skopeo) and a real registry on loopback.

skopeo copies an artifact from the node's ``/v2/`` into an OCI layout, byte-identical to the
upstream; with two nodes the second one's blobs come from the first (zero registry blob bytes,
counted at a relaying proxy); bad requests get the spec's JSON error with a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from cached.types import ModelRef
from tests.support.cluster import cluster, knows_ref_from, token_file  # noqa: F401 - token_file is a fixture
from tests.support.node import running_daemon
from tests.support.registry import OCI_MANIFEST as OCI
from tests.support.registry import Registry, TokenProxy
from tests.support.wait import wait_until

WEIGHTS = bytes(range(256)) * 12288 + b"end"  # 3 MiB + 3: several pieces
RAW = "application/vnd.cncf.model.weight.v1.raw"


def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.skip("skopeo is not installed (Debian package skopeo; run scripts/test-deps)")
    return path


async def push(reg: Registry, repo: str = "models/tiny", tag: str = "v1") -> str:
    digest, _ = await reg.push_artifact(
        repo,
        tag,
        [
            (WEIGHTS, RAW, {"org.cncf.model.filepath": "model.safetensors"}),
            (
                b'{"a": 1}',
                "application/vnd.cncf.model.weight.config.v1.raw",
                {"org.cncf.model.filepath": "config.json"},
            ),
        ],
    )
    return digest


async def skopeo_copy(api: str, ns: str, image: str, dest: Path) -> None:
    host = api.removeprefix("http://")
    src = f"docker://{host}/{image}"
    proc = await asyncio.create_subprocess_exec(
        skopeo(),
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        src,
        f"oci:{dest}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]


def layout_blobs(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (dest / "blobs" / "sha256").iterdir()}


async def served(api: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(api + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith('cached_local_served_bytes_total{api="v2"}'):
                return float(line.split()[-1])
    return 0.0


async def counted(api: str, want: float) -> None:
    """The v2 served-bytes counter reaches ``want`` and not one byte more (a span is counted once
    the kernel took it, which may be just after the client read it)."""

    async def reached() -> bool:
        return await served(api) >= want

    await wait_until(reached, timeout_s=10, what="served bytes counted")
    assert await served(api) == want


async def test_skopeo_through_the_mirror_gets_the_upstream_bytes_and_a_second_node_gets_them_from_the_first(
    tmp_path: Path,
    token_file: Path,  # noqa: F811
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        reg = await stack.enter_async_context(Registry(tmp_path / "reg"))
        proxy = await stack.enter_async_context(TokenProxy(reg.url, need_token=False))
        digest = await push(reg)
        flags = {"origins.oci.plain_http": [proxy.host], "origins.oci.default_registry": proxy.host}
        nodes = await cluster(stack, tmp_path, token_file, "ab", **flags)
        a, b = nodes["a"], nodes["b"]

        await skopeo_copy(a.api_address, proxy.host, "models/tiny:v1", tmp_path / "out-a")
        blobs = layout_blobs(tmp_path / "out-a")
        for name, data in blobs.items():
            assert hashlib.sha256(data).hexdigest() == name  # every blob is what its digest says
        assert WEIGHTS in blobs.values() and digest.removeprefix("sha256:") in blobs
        from_registry = proxy.blob_bytes
        assert from_registry >= len(WEIGHTS)
        assert await served(a.api_address) >= len(WEIGHTS)

        # Node b learns a holds the artifact's blobs, then serves the same pull from a.
        mirror_ref = f"oci://{proxy.host}/models/tiny@{digest}?path=/.oci"
        await wait_until(lambda: a.store.model(ModelRef.parse(mirror_ref)), timeout_s=30, what="a holds the artifact")
        await wait_until(lambda: knows_ref_from(b, mirror_ref, {"a"}), timeout_s=15, what="b learns a holds it")
        await skopeo_copy(b.api_address, proxy.host, "models/tiny:v1", tmp_path / "out-b")
        assert layout_blobs(tmp_path / "out-b") == blobs
        assert proxy.blob_bytes == from_registry  # not one more blob byte from the registry


async def test_bad_requests_get_oci_errors_never_a_500(tmp_path: Path) -> None:
    async with Registry(tmp_path / "reg") as reg:
        digest = await push(reg)
        flags = {"origins.oci.plain_http": [reg.host], "origins.oci.default_registry": reg.host}
        async with running_daemon(tmp_path / "node", **flags) as d, aiohttp.ClientSession() as s:
            api = d.api_address

            async def ask(method: str, path: str, **kw: object) -> tuple[int, dict]:  # type: ignore[type-arg]
                async with s.request(method, URL(api + path, encoded=True), **kw) as r:  # sent as written  # type: ignore[arg-type]
                    text = await r.text()
                    return r.status, (json.loads(text) if text and method != "HEAD" else {})

            status, _ = await ask("GET", "/v2/")
            assert status == 200
            cases = [
                ("GET", "/v2/Models/UPPER/manifests/v1", 400, "NAME_INVALID"),
                ("GET", "/v2/models/%2fetc/manifests/v1", 400, "NAME_INVALID"),
                ("GET", "/v2/models/../../etc/manifests/v1", 400, "NAME_INVALID"),
                ("GET", "/v2/models/%2e%2e/etc/manifests/v1", 400, "NAME_INVALID"),
                ("GET", "/v2/models/tiny/manifests/sha256:xyz", 400, "MANIFEST_INVALID"),
                ("GET", "/v2/models/tiny/manifests/" + "a" * 300, 400, "MANIFEST_INVALID"),
                ("GET", "/v2/models/tiny/blobs/sha256:1234", 400, "DIGEST_INVALID"),
                ("GET", "/v2/models/tiny/blobs/md5:abcd", 400, "DIGEST_INVALID"),
                ("GET", "/v2/models/tiny/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
                ("GET", "/v2/models/tiny/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
                ("GET", "/v2/models/nothere/manifests/v1", 404, "MANIFEST_UNKNOWN"),
                ("GET", "/v2/models/tiny/tags/list", 404, "NAME_UNKNOWN"),
                ("PUT", f"/v2/models/tiny/manifests/{digest}", 405, "UNSUPPORTED"),
                ("POST", "/v2/models/tiny/blobs/uploads/", 405, "UNSUPPORTED"),
                ("PATCH", "/v2/models/tiny/blobs/uploads/x", 405, "UNSUPPORTED"),
                ("DELETE", f"/v2/models/tiny/manifests/{digest}", 405, "UNSUPPORTED"),
            ]
            for method, path, want, code in cases:
                status, body = await ask(method, path)
                assert status == want, (method, path, status, body)
                if code is not None:
                    assert body["errors"][0]["code"] == code, (path, body)
            # A manifest that is too large or not a manifest at all is a 4xx too.
            huge = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "x", "digest": digest, "size": 1},
                "layers": [],
                "pad": "x" * (5 << 20),
            }
            async with s.put(
                f"{reg.url}/v2/models/huge/manifests/v1",
                data=json.dumps(huge).encode(),
                headers={"Content-Type": huge["mediaType"]},
            ) as r:
                pushed = r.status
            if pushed == 201:
                status, body = await ask("GET", "/v2/models/huge/manifests/v1")
                assert 400 <= status < 500 and body["errors"][0]["code"] == "MANIFEST_INVALID", body
            # A real pull still works after all that.
            status, body = await ask(
                "GET", "/v2/models/tiny/manifests/v1", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
            )
            assert status == 200 and body["layers"][0]["size"] == len(WEIGHTS)


async def test_a_blob_goes_out_by_the_kernel_byte_identical_with_its_headers_and_counted_exactly(
    tmp_path: Path,
) -> None:
    async with Registry(tmp_path / "reg") as reg:
        await push(reg)
        layer = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
        flags = {"origins.oci.plain_http": [reg.host], "origins.oci.default_registry": reg.host}
        async with running_daemon(tmp_path / "node", **flags) as d, aiohttp.ClientSession() as s:
            api, blob = d.api_address, f"{d.api_address}/v2/models/tiny/blobs/{layer}"
            async with s.get(f"{api}/v2/models/tiny/manifests/v1", headers={"Accept": OCI}) as r:
                assert r.status == 200  # the mirror learns the layer and starts its fetch

            before = await served(api)
            async with s.get(blob) as r:
                body, headers = await r.read(), r.headers
            assert r.status == 200 and body == WEIGHTS
            assert headers["Docker-Content-Digest"] == layer and headers["ETag"] == f'"{layer}"'
            assert headers["Content-Type"] == "application/octet-stream" and headers["Accept-Ranges"] == "bytes"
            assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
            assert headers["Content-Length"] == str(len(WEIGHTS))
            await counted(api, before + len(WEIGHTS))

            before = await served(api)
            async with s.get(blob, headers={"Range": "bytes=1000-2100000"}) as r:
                part, headers = await r.read(), r.headers
            assert r.status == 206 and part == WEIGHTS[1000:2100001]
            assert headers["Content-Range"] == f"bytes 1000-2100000/{len(WEIGHTS)}"
            assert headers["Content-Length"] == str(len(part)) and headers["ETag"] == f'"{layer}"'
            await counted(api, before + len(part))

            async with s.get(blob, headers={"Range": "bytes=-5"}) as r:  # a suffix: the last five bytes
                assert r.status == 206 and await r.read() == WEIGHTS[-5:]
            async with s.head(blob) as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(len(WEIGHTS)) and not await r.read()
            async with s.get(blob, headers={"Range": f"bytes={len(WEIGHTS)}-"}) as r:
                assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(WEIGHTS)}"
            before = await served(api)
            async with s.head(blob) as r:
                assert r.status == 200
            assert await served(api) == before  # a HEAD sends no bytes


async def test_a_blob_evicted_while_it_streams_still_sends_its_own_bytes(tmp_path: Path) -> None:
    # Larger than what the kernel's socket buffers and the client's reader can hold between them
    # (Debian's tcp_rmem + tcp_wmem maxima: 36 MiB), so the server is still sending when the blob
    # leaves the store.
    big = hashlib.sha256(b"seed").digest() * (64 << 15)  # 64 MiB
    async with Registry(tmp_path / "reg") as reg:
        digest, _ = await reg.push_artifact("models/big", "v1", [(big, RAW, {"org.cncf.model.filepath": "m.bin"})])
        layer = "sha256:" + hashlib.sha256(big).hexdigest()
        flags = {"origins.oci.plain_http": [reg.host], "origins.oci.default_registry": reg.host}
        async with running_daemon(tmp_path / "node", **flags) as d, aiohttp.ClientSession() as s:
            api = d.api_address
            async with s.get(f"{api}/v2/models/big/manifests/v1", headers={"Accept": OCI}) as r:
                assert r.status == 200
            ref = ModelRef.parse(f"oci://{reg.host}/models/big@{digest}?path=/.oci")
            before = await served(api)
            async with s.get(f"{api}/v2/models/big/blobs/{layer}") as r:
                assert r.status == 200
                head = await r.content.readexactly(1 << 20)
                rec = d.store.model(ref)
                assert rec is not None
                blob_hex = next(f.blob.hex for f in rec.manifest.files if f.size == len(big))
                async with s.post(f"{api}/v1/evict", json={"ref": ref.canonical}) as e:
                    assert e.status == 200, await e.text()
                assert not d.store.blob_path(blob_hex).exists() and d.store.model(ref) is None
                assert await served(api) - before < len(big)  # the body was still on its way
                rest = await r.read()
            assert head + rest == big
            await counted(api, before + len(big))
