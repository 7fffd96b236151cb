"""``oci://`` and ``ollama://`` refs against a real registry (Debian's docker-registry) on loopback.

Artifacts are pushed through the registry's HTTP API: a ModelPack artifact (two files named by
annotations), a modelcar image (tar and tar+gzip layers, files under /models), an Ollama manifest.
The tag is pinned to the manifest digest; a moved tag makes a new revision while the old one stays
complete until released; a layer whose bytes do not match its digest is refused with nothing
exposed; a registry that wants a Bearer token (realm, Basic credentials from a Docker config.json)
and redirects blob reads to storage on another origin is read without the token leaving it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp

from cached.api.client import ApiClient, ApiError
from cached.daemon import Daemon
from cached.types import ModelRef
from tests.support.node import running_daemon
from tests.support.registry import DOCKER_MANIFEST, OCI_INDEX, Registry, TokenProxy, sha256, tar_of
from tests.support.registry import OCI_MANIFEST as OCI

WEIGHTS = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4
CONFIG = b'{"architectures": ["Tiny"]}'
RAW = "application/vnd.cncf.model.weight.v1.raw"


def view(model: dict[str, Any]) -> dict[str, bytes]:
    root = Path(model["path"])
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def prefetch(d: Daemon, ref: str, **extra: Any) -> dict[str, Any]:
    async with ApiClient(d.api_address) as c:
        result: dict[str, Any] = await c.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True, **extra})
        return result


async def failed_prefetch(d: Daemon, ref: str) -> str:
    """The error a prefetch that must fail reports (answer or job state)."""
    try:
        model = await prefetch(d, ref)
    except ApiError as e:
        return f"{e} {e.args}"
    assert model["state"] == "failed", model
    return str(model)


async def push_modelpack(reg: Registry, repo: str, tag: str, weights: bytes = WEIGHTS) -> str:
    digest, _ = await reg.push_artifact(
        repo,
        tag,
        [
            (weights, RAW, {"org.cncf.model.filepath": "model.safetensors"}),
            (CONFIG, "application/vnd.cncf.model.weight.config.v1.raw", {"org.cnai.model.filepath": "config.json"}),
        ],
    )
    return digest


async def test_a_modelpack_artifact_becomes_one_file_per_layer_pinned_to_the_manifest_digest(tmp_path: Path) -> None:
    async with Registry(tmp_path / "reg") as reg:
        digest = await push_modelpack(reg, "models/tiny", "v1")
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            model = await prefetch(d, f"oci://{reg.host}/models/tiny:v1")
            assert model["state"] == "ready"
            assert model["revision"] == digest
            assert view(model) == {"model.safetensors": WEIGHTS, "config.json": CONFIG}
            # The same artifact by digest is the same bytes (one blob per layer in the store).
            by_digest = await prefetch(d, f"oci://{reg.host}/models/tiny@{digest}")
            assert view(by_digest) == view(model)


async def test_a_modelcar_image_gives_the_files_under_models_from_tar_and_gzip_layers(tmp_path: Path) -> None:
    layer1 = tar_of({"models/config.json": CONFIG, "models/weights.bin": WEIGHTS, "etc/passwd": b"x"}, gz=True)
    layer2 = tar_of({"models/extra/readme.txt": b"hello", "models/weights.bin": b"newer", "./models/../x": b"no"})
    async with Registry(tmp_path / "reg") as reg:
        await reg.push_artifact(
            "kserve/modelcar",
            "v1",
            [
                (layer1, "application/vnd.oci.image.layer.v1.tar+gzip", {}),
                (layer2, "application/vnd.oci.image.layer.v1.tar", {}),
            ],
            config_type="application/vnd.oci.image.config.v1+json",
            artifact_type=None,
        )
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            model = await prefetch(d, f"oci://{reg.host}/kserve/modelcar:v1")
            assert view(model) == {
                "config.json": CONFIG,
                "weights.bin": b"newer",  # the later layer wins, as in the image's filesystem
                "extra/readme.txt": b"hello",
            }
            other = await prefetch(d, f"oci://{reg.host}/kserve/modelcar:v1?path=/etc")
            assert view(other) == {"passwd": b"x"}


async def test_an_ollama_manifest_gives_model_gguf_and_the_other_layers_by_media_type(tmp_path: Path) -> None:
    gguf = b"GGUF" + WEIGHTS
    async with Registry(tmp_path / "reg") as reg:
        await reg.push_artifact(
            "library/tiny",
            "latest",
            [
                (gguf, "application/vnd.ollama.image.model", {}),
                (b"{{ .Prompt }}", "application/vnd.ollama.image.template", {}),
                (b'{"temperature": 0.1}', "application/vnd.ollama.image.params", {}),
                (b"MIT", "application/vnd.ollama.image.license", {}),
            ],
            config_type="application/vnd.docker.container.image.v1+json",
            media_type=DOCKER_MANIFEST,
        )
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            model = await prefetch(d, f"ollama://{reg.host}/tiny")
            assert model["ref"] == f"ollama://{reg.host}/library/tiny:latest"
            assert view(model) == {
                "model.gguf": gguf,
                "template": b"{{ .Prompt }}",
                "params": b'{"temperature": 0.1}',
                "license": b"MIT",
            }


async def test_an_index_chooses_the_linux_amd64_entry(tmp_path: Path) -> None:
    async with Registry(tmp_path / "reg") as reg:
        amd = await push_modelpack(reg, "models/multi", "amd64", WEIGHTS)
        arm = await push_modelpack(reg, "models/multi", "arm64", b"arm weights")
        sizes = {}
        async with aiohttp.ClientSession() as s:
            for digest in (amd, arm):
                async with s.get(f"{reg.url}/v2/models/multi/manifests/{digest}", headers={"Accept": OCI}) as r:
                    sizes[digest] = len(await r.read())
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI,
                    "digest": arm,
                    "size": sizes[arm],
                    "platform": {"os": "linux", "architecture": "arm64"},
                },
                {
                    "mediaType": OCI,
                    "digest": amd,
                    "size": sizes[amd],
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
            ],
        }
        index_digest, _ = await reg.push_manifest("models/multi", "latest", index)
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            model = await prefetch(d, f"oci://{reg.host}/models/multi")
            assert model["revision"] == index_digest
            assert view(model)["model.safetensors"] == WEIGHTS


async def test_a_moved_tag_is_a_new_revision_and_the_old_one_stays_complete_while_leased(tmp_path: Path) -> None:
    async with Registry(tmp_path / "reg") as reg:
        first = await push_modelpack(reg, "models/moving", "prod", WEIGHTS)
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            ref = f"oci://{reg.host}/models/moving:prod"
            old = await prefetch(d, ref)
            assert old["revision"] == first
            async with ApiClient(d.api_address) as api:
                lease = await api.request("POST", "/v1/leases", body={"ref": ref, "holder": "pod-1", "ttl_s": 600})
                old_path = Path(lease["path"])
                old_files = {str(p.relative_to(old_path)): p.read_bytes() for p in old_path.rglob("*") if p.is_file()}
                assert old_files["model.safetensors"] == WEIGHTS
                second = await push_modelpack(reg, "models/moving", "prod", b"v2 weights")
                new = await prefetch(d, ref, refresh=True)
                assert new["revision"] == second != first
                assert view(new)["model.safetensors"] == b"v2 weights"
                assert [(r["revision"], r["current"]) for r in new["revisions"]] == [(second, True), (first, False)]
                # The leased revision is still complete in the store, byte for byte.
                (old_manifest,) = [m for m in d.store.retained_for(ModelRef.parse(ref)) if m.revision == first]
                held = {f.path: d.store.blob_path(f.blob.hex).read_bytes() for f in old_manifest.files}
                assert held == old_files
                await api.request("DELETE", f"/v1/leases/{lease['lease_id']}")
                after = await api.request("GET", "/v1/models/status", params={"ref": ref})
                assert [(r["revision"], r["current"]) for r in after["revisions"]] == [(second, True)]
                old_blob = next(f.blob.hex for f in old_manifest.files if f.path == "model.safetensors")
                assert not d.store.has_blob(old_blob)


async def test_a_layer_whose_bytes_do_not_match_its_digest_is_refused_and_nothing_is_exposed(tmp_path: Path) -> None:
    async with Registry(tmp_path / "reg") as reg:
        digest = await push_modelpack(reg, "models/bad", "v1")
        weights = sha256(WEIGHTS)
        blob = reg.blob_file(weights)
        bad = bytearray(blob.read_bytes())
        bad[1000] ^= 0xFF  # same size, one byte flipped: only the digest can tell
        blob.write_bytes(bytes(bad))
        async with running_daemon(tmp_path / "node", **{"origins.oci.plain_http": [reg.host]}) as d:
            error = await failed_prefetch(d, f"oci://{reg.host}/models/bad:v1")
            assert "sha256" in error, error
            assert d.store.model(ModelRef.parse(f"oci://{reg.host}/models/bad:v1")) is None
            assert d.store.model(ModelRef.parse(f"oci://{reg.host}/models/bad@{digest}")) is None
            assert not list((tmp_path / "node" / "models").rglob("model.safetensors"))
            for p in (tmp_path / "node" / "blobs").rglob("*"):
                if p.is_file() and not p.name.endswith(".pieces"):
                    assert p.read_bytes() != bytes(bad)


async def test_a_registry_that_wants_a_token_is_answered_from_the_docker_config_and_storage_gets_no_token(
    tmp_path: Path,
) -> None:
    async with Registry(tmp_path / "reg") as reg, TokenProxy(reg.url, redirect_blobs=True) as proxy:
        await push_modelpack(reg, "private/tiny", "v1")
        auth = tmp_path / "config.json"
        auth.write_text(json.dumps({"auths": {proxy.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        flags = {"origins.oci.plain_http": [proxy.host], "origins.oci.auth_file": str(auth)}
        async with running_daemon(tmp_path / "node", **flags) as d:
            model = await prefetch(d, f"oci://{proxy.host}/private/tiny:v1")
            assert view(model)["model.safetensors"] == WEIGHTS
        assert proxy.token_requests and proxy.token_requests[0]["scope"] == "repository:private/tiny:pull"
        assert proxy.token_requests[0]["service"] == "test-registry"
        assert proxy.storage_auth and all(a is None for a in proxy.storage_auth)
        # Without credentials the token service refuses: a clear denial, not a retry loop.
        async with running_daemon(tmp_path / "node2", **{"origins.oci.plain_http": [proxy.host]}) as d:
            error = await failed_prefetch(d, f"oci://{proxy.host}/private/tiny:v1")
            assert "token service refused" in error, error
