"""Modelcar images (archive layers) against a real registry (Debian's docker-registry) on loopback.

A modelcar's layers are whole archives: they come through the swarm as the artifact model
``oci://R/N@D?path=/.oci`` (so two nodes that want the same modelcar read its layers from the
registry about once, counted at a relaying proxy) and are unpacked from the verified store. A
compression bomb is refused with an error naming the layer and leaves nothing in the spool; a
``+zstd`` layer (image-spec and ModelPack media types) unpacks like a gzip one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import zstandard

from cached.types import ModelRef
from tests.integration.test_oci_origin import failed_prefetch, prefetch, view
from tests.support.cluster import cluster, token_file  # noqa: F401 - token_file is a fixture
from tests.support.node import running_daemon
from tests.support.registry import Registry, TokenProxy, tar_of

MIB = 1 << 20
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"


def weights(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)  # incompressible: the gzip layer is as large as its file


async def push_modelcar(reg: Registry, repo: str, layers: list[tuple[bytes, str]], tag: str = "v1") -> str:
    digest, _ = await reg.push_artifact(
        repo, tag, [(data, media, {}) for data, media in layers], config_type=IMAGE_CONFIG, artifact_type=None
    )
    return digest


def spool_entries(node: Path) -> list[Path]:
    spool = node / "tmp" / "oci-spool"
    return list(spool.iterdir()) if spool.is_dir() else []


async def test_two_nodes_that_want_the_same_modelcar_read_its_layers_from_the_registry_about_once(
    tmp_path: Path,
    token_file: Path,  # noqa: F811
) -> None:
    big, small = weights(6 * MIB + 17, 1), weights(3 * MIB + 5, 2)
    layer1 = tar_of({"models/model.safetensors": big, "models/config.json": b'{"a": 1}'}, gz=True)
    layer2 = tar_of({"models/tokenizer.bin": small, "bin/sh": b"#!"})
    async with contextlib.AsyncExitStack() as stack:
        reg = await stack.enter_async_context(Registry(tmp_path / "reg"))
        proxy = await stack.enter_async_context(TokenProxy(reg.url, need_token=False))
        digest = await push_modelcar(
            reg, "kserve/car", [(layer1, GZ), (layer2, "application/vnd.oci.image.layer.v1.tar")]
        )
        nodes = await cluster(stack, tmp_path, token_file, "ab", **{"origins.oci.plain_http": [proxy.host]})
        ref = f"oci://{proxy.host}/kserve/car:v1"
        models = await asyncio.gather(*(prefetch(d, ref) for d in nodes.values()))
        want = {"model.safetensors": big, "config.json": b'{"a": 1}', "tokenizer.bin": small}
        for model in models:
            assert model["state"] == "ready", model
            assert model["revision"] == digest
            assert view(model) == want
        layers = len(layer1) + len(layer2)
        ratio = proxy.blob_bytes / layers
        assert ratio <= 1.05, f"the registry sent {ratio:.2f}x the layers for two nodes ({proxy.blob_bytes} bytes)"
        # Each node holds the artifact's own blobs (peers can serve them) and unpacked from them.
        artifact = ModelRef.parse(f"oci://{proxy.host}/kserve/car@{digest}?path=/.oci")
        for d in nodes.values():
            assert d.store.model(artifact) is not None


async def test_a_gzip_bomb_layer_is_refused_naming_the_layer_and_leaves_nothing_in_the_spool(tmp_path: Path) -> None:
    bomb = tar_of({"models/zeros.bin": bytes(64 * MIB)}, gz=True)  # ~64 KiB that unpacks to 64 MiB
    fine = tar_of({"models/config.json": b"{}"}, gz=True)
    async with Registry(tmp_path / "reg") as reg:
        await push_modelcar(reg, "kserve/bomb", [(fine, GZ), (bomb, GZ)])
        bomb_digest = (await reg.push_blob("kserve/bomb", bomb))["digest"]
        flags: dict[str, Any] = {"origins.oci.plain_http": [reg.host]}
        async with running_daemon(tmp_path / "node", **flags) as d:
            error = await failed_prefetch(d, f"oci://{reg.host}/kserve/bomb:v1")
            assert bomb_digest in error and "compression bomb" in error and "max_unpack_ratio" in error, error
            assert d.store.model(ModelRef.parse(f"oci://{reg.host}/kserve/bomb:v1")) is None
            assert not [p for p in spool_entries(tmp_path / "node") if p.name == bomb_digest.removeprefix("sha256:")]
            assert not list((tmp_path / "node" / "models").rglob("zeros.bin"))
        # Without the ratio cap, the absolute one (and the store's room) still hold.
        flags |= {"origins.oci.max_unpack_ratio": 0, "origins.oci.max_unpacked_bytes": "8M"}
        async with running_daemon(tmp_path / "node2", **flags) as d:
            error = await failed_prefetch(d, f"oci://{reg.host}/kserve/bomb:v1")
            assert bomb_digest in error and "max_unpacked_bytes" in error, error
            assert not [p for p in spool_entries(tmp_path / "node2") if p.name == bomb_digest.removeprefix("sha256:")]
        flags = {"origins.oci.plain_http": [reg.host], "origins.oci.max_unpack_ratio": 0, "store.max_bytes": "32M"}
        async with running_daemon(tmp_path / "node3", **flags) as d:
            error = await failed_prefetch(d, f"oci://{reg.host}/kserve/bomb:v1")
            assert bomb_digest in error and "free space" in error, error
            assert not [p for p in spool_entries(tmp_path / "node3") if p.name == bomb_digest.removeprefix("sha256:")]


def zstd_tar(files: dict[str, bytes]) -> bytes:
    # Two frames: a layer written by a parallel compressor is several concatenated frames.
    raw = tar_of(files)
    half = len(raw) // 2
    c = zstandard.ZstdCompressor()
    return c.compress(raw[:half]) + c.compress(raw[half:])


async def test_zstd_layers_unpack_for_an_image_and_a_modelpack_artifact(tmp_path: Path) -> None:
    big = weights(2 * MIB + 3, 3)
    async with Registry(tmp_path / "reg") as reg:
        await push_modelcar(
            reg,
            "kserve/zst",
            [(zstd_tar({"models/w.bin": big, "models/sub/c.json": b"{}"}), GZ.replace("gzip", "zstd"))],
        )
        await reg.push_artifact(
            "models/zst",
            "v1",
            [
                (
                    zstd_tar({"w.bin": big, "config.json": b"{}"}),
                    "application/vnd.cncf.model.weight.v1.tar+zstd",
                    {"org.cncf.model.filepath": "weights"},
                )
            ],
        )
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            model = await prefetch(d, f"oci://{reg.host}/kserve/zst:v1")
            assert view(model) == {"w.bin": big, "sub/c.json": b"{}"}
            model = await prefetch(d, f"oci://{reg.host}/models/zst:v1")
            assert view(model) == {"w.bin": big, "config.json": b"{}"}


async def test_a_modelcar_layer_whose_bytes_do_not_match_its_digest_is_never_unpacked(tmp_path: Path) -> None:
    layer = tar_of({"models/w.bin": weights(MIB, 4)}, gz=True)
    async with Registry(tmp_path / "reg") as reg:
        await push_modelcar(reg, "kserve/bad", [(layer, GZ)])
        stored = reg.blob_file((await reg.push_blob("kserve/bad", layer))["digest"])
        bad = bytearray(stored.read_bytes())
        bad[len(bad) // 2] ^= 0xFF  # same size: only the digest can tell
        stored.write_bytes(bytes(bad))
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            error = await failed_prefetch(d, f"oci://{reg.host}/kserve/bad:v1")
            assert "sha256" in error, error
            assert not list((tmp_path / "node" / "models").rglob("w.bin"))
            assert not spool_entries(tmp_path / "node")
