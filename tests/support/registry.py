"""A real OCI registry on loopback for tests: Debian's ``docker-registry`` (the CNCF distribution
server) with a temporary config and storage, and helpers that push artifacts through its HTTP API.

Also ``TokenProxy``: an aiohttp server in front of a registry that demands a Bearer token from
its own realm (Basic credentials checked there), counts the blob bytes it relays, and can serve
chosen blobs with other bytes (a registry that lies about a layer).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def registry_binary() -> str:
    path = shutil.which("docker-registry") or shutil.which("registry")
    if path is None:
        pytest.skip("docker-registry is not installed (Debian package docker-registry; run scripts/test-deps)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes], *, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Registry:
    """``async with Registry(tmp) as reg``: a registry on 127.0.0.1:<free port>, plain HTTP."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Registry:
        binary = registry_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self._log = open(self.root / "registry.log", "wb")  # noqa: SIM115 - closed in __aexit__
        self._proc = subprocess.Popen([binary, "serve", str(config)], stdout=self._log, stderr=subprocess.STDOUT)
        self._session = aiohttp.ClientSession()
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with self._session.get(self.url + "/v2/") as r:
                    if r.status == 200:
                        break
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {(self.root / 'registry.log').read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    async def push_blob(
        self, repo: str, data: bytes, media_type: str = "application/octet-stream", **ann: str
    ) -> dict[str, Any]:
        """The blob uploaded (monolithic POST + PUT); its descriptor."""
        assert self._session is not None
        digest = sha256(data)
        async with self._session.post(f"{self.url}/v2/{repo}/blobs/uploads/") as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        sep = "&" if "?" in location else "?"
        put = location if location.startswith("http") else self.url + location
        async with self._session.put(
            f"{put}{sep}digest={digest}", data=data, headers={"Content-Type": "application/octet-stream"}
        ) as r:
            assert r.status == 201, await r.text()
        desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if ann:
            desc["annotations"] = {k.replace("_", "."): v for k, v in ann.items()}
        return desc

    async def push_manifest(self, repo: str, reference: str, doc: dict[str, Any]) -> tuple[str, bytes]:
        """The manifest put under ``reference``; (digest, exact bytes)."""
        assert self._session is not None
        data = json.dumps(doc, separators=(",", ":")).encode()
        async with self._session.put(
            f"{self.url}/v2/{repo}/manifests/{reference}", data=data, headers={"Content-Type": doc["mediaType"]}
        ) as r:
            assert r.status == 201, await r.text()
        return sha256(data), data

    async def push_artifact(
        self,
        repo: str,
        tag: str,
        layers: list[tuple[bytes, str, dict[str, str]]],
        *,
        config: bytes = b"{}",
        config_type: str = "application/vnd.cncf.model.config.v1+json",
        media_type: str = OCI_MANIFEST,
        artifact_type: str | None = "application/vnd.cncf.model.manifest.v1+json",
    ) -> tuple[str, bytes]:
        """Layers (bytes, media type, annotations) and a config under ``repo:tag``."""
        cfg = await self.push_blob(repo, config, config_type)
        descs = []
        for data, media, ann in layers:
            d = await self.push_blob(repo, data, media)
            if ann:
                d["annotations"] = ann
            descs.append(d)
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, "config": cfg, "layers": descs}
        if artifact_type and media_type == OCI_MANIFEST:
            doc["artifactType"] = artifact_type
        return await self.push_manifest(repo, tag, doc)

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to corrupt them in place)."""
        hex_ = digest.removeprefix("sha256:")
        return self.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"


class TokenProxy:
    """A registry front that wants ``Bearer <token>`` from its realm ``/token`` (which wants Basic
    ``user:password``), relays to ``upstream``, counts relayed blob bytes, and can lie."""

    def __init__(
        self,
        upstream: str,
        *,
        user: str = "alice",
        password: str = "s3cret",
        need_token: bool = True,
        redirect_blobs: bool = False,
    ) -> None:
        self.upstream = upstream
        self.redirect_blobs = redirect_blobs  # blob GETs answered 307 to "storage" on another origin
        self.storage_auth: list[str | None] = []  # the Authorization each storage request carried
        self.user, self.password = user, password
        self.need_token = need_token
        self.token = "tok-" + hashlib.sha256(upstream.encode()).hexdigest()[:16]
        self.blob_bytes = 0
        self.blob_gets = 0
        self.token_requests: list[dict[str, str]] = []
        self.lies: dict[str, bytes] = {}  # digest -> bytes served instead
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TokenProxy:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_get("/storage/{repo:.+}/{digest}", self._storage)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.host = f"127.0.0.1:{self.port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests.append(dict(request.query))
        want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if request.headers.get("Authorization") != want:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        return web.json_response({"token": self.token, "expires_in": 300})

    async def _storage(self, request: web.Request) -> web.StreamResponse:
        """Signed-URL storage stand-in: no registry token wanted (and none should arrive)."""
        self.storage_auth.append(request.headers.get("Authorization"))
        path = f"/v2/{request.match_info['repo']}/blobs/{request.match_info['digest']}"
        return await self._forward(request, path, is_blob=True, digest=request.match_info["digest"])

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        if self.need_token and request.headers.get("Authorization") != f"Bearer {self.token}":
            realm = f"http://{self.host}/token"
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="test-registry",scope="repository:x:pull"'
                },
            )
        assert self._session is not None
        is_blob = "/blobs/sha256:" in request.path and request.method == "GET"
        digest = request.path.rsplit("/", 1)[-1]
        if is_blob and self.redirect_blobs:
            repo = request.path.removeprefix("/v2/").rsplit("/blobs/", 1)[0]
            raise web.HTTPTemporaryRedirect(f"http://localhost:{self.port}/storage/{repo}/{digest}")
        return await self._forward(request, request.path_qs, is_blob=is_blob, digest=digest)

    async def _forward(self, request: web.Request, path_qs: str, *, is_blob: bool, digest: str) -> web.StreamResponse:
        assert self._session is not None
        if is_blob and digest in self.lies:
            body = self.lies[digest]
            self.blob_gets += 1
            self.blob_bytes += len(body)
            return web.Response(body=body, headers={"Docker-Content-Digest": digest})
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "range")}
        async with self._session.request(
            request.method, self.upstream + path_qs, headers=headers, allow_redirects=True
        ) as r:
            resp = web.StreamResponse(status=r.status)
            for k in (
                "Content-Type",
                "Content-Length",
                "Content-Range",
                "Docker-Content-Digest",
                "Accept-Ranges",
                "Location",
            ):
                if k in r.headers:
                    resp.headers[k] = r.headers[k]
            await resp.prepare(request)
            async for chunk in r.content.iter_chunked(1 << 16):
                if is_blob:
                    self.blob_bytes += len(chunk)
                await resp.write(chunk)
            if is_blob:
                self.blob_gets += 1
            await resp.write_eof()
            return resp
