"""The pull side of the OCI distribution protocol, as a client: what the ``oci://`` and ``ollama://``
origins and the ``/v2`` mirror say to a registry.

Owns: the base URL of a registry (HTTPS, or plain HTTP only for ``origins.oci.plain_http``), the
authentication dance (anonymous, then Basic or a Bearer token from the ``WWW-Authenticate``
challenge's realm/service/scope, credentials from a Docker-style ``config.json``), manifests
fetched with the right ``Accept`` and checked against their digest, and blob bytes read as ranges
(``cached.rangeio``, 307 redirects to storage followed; the registry's credentials never go to
another host) or streamed whole into a file while its sha256 is checked. It does not decide what a
manifest means (``origins.oci``) and keeps nothing on disk.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from cached.config import HttpOriginConfig, OciOriginConfig
from cached.errors import IntegrityError, OriginChanged, OriginDenied, OriginError, OriginNotFound
from cached.origins.http import client_error, range_error, status_error
from cached.rangeio import RangeIOError, Redirected, Sink, ThreadedRangeReader
from cached.ranges import content_range

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES)
# The spec asks registries to accept manifests of at least 4 MiB; more is refused as hostile.
MAX_MANIFEST_BYTES = 4 << 20
MAX_REDIRECTS = 10
TOKEN_MIN_TTL_S = 60.0  # the spec's default lifetime of a token that names none
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_STREAM_CHUNK = 1 << 20


def is_digest(text: str) -> bool:
    return bool(_DIGEST.match(text))


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    """One manifest's exact bytes, their media type and their (checked) digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.data)
        except ValueError:
            raise OriginError(f"manifest {self.digest} is not JSON", retryable=False) from None
        if not isinstance(doc, dict):
            raise OriginError(f"manifest {self.digest} is not a JSON object", retryable=False)
        return doc


def load_credentials(path: Path | None) -> dict[str, tuple[str, str]]:
    """registry host -> (user, password) from a Docker-style ``config.json`` (``auths``; keys may
    be ``host``, ``host:port`` or ``https://host/v1/``). Unreadable or malformed: no credentials."""
    if path is None:
        return {}
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    auths = doc.get("auths") if isinstance(doc, dict) else None
    creds: dict[str, tuple[str, str]] = {}
    for key, entry in (auths or {}).items():
        if not isinstance(entry, dict) or not isinstance(key, str):
            continue
        host = URL(key).authority if "://" in key else key.split("/")[0]
        user, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
        if isinstance(user, str) and isinstance(password, str):
            creds[host] = (user, password)
    return creds


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


class RegistryClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        reader: ThreadedRangeReader,
        cfg: OciOriginConfig,
        http_cfg: HttpOriginConfig,
    ) -> None:
        self._session = session
        self._reader = reader
        self._plain = {h.lower() for h in cfg.plain_http}
        self._creds = load_credentials(cfg.auth_file)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=http_cfg.connect_timeout_s, sock_read=http_cfg.read_timeout_s
        )
        # (registry, repo) -> (Authorization header, expiry): a token covers one repository's pull.
        self._auth: dict[tuple[str, str], tuple[str, float]] = {}

    def base(self, registry: str) -> str:
        scheme = "http" if registry.lower() in self._plain else "https"
        return f"{scheme}://{registry}"

    def blob_url(self, registry: str, repo: str, digest: str) -> str:
        return f"{self.base(registry)}/v2/{repo}/blobs/{digest}"

    # --- authentication ------------------------------------------------------------------------

    def _auth_header(self, registry: str, repo: str) -> dict[str, str]:
        got = self._auth.get((registry, repo))
        if got is None or got[1] < time.monotonic():
            return {}
        return {"Authorization": got[0]}

    async def _answer_challenge(self, registry: str, repo: str, header: str, url: str) -> None:
        """Learn the Authorization for ``repo`` from a 401's ``WWW-Authenticate``."""
        scheme, params = parse_challenge(header)
        creds = self._creds.get(registry)
        basic = ""
        if creds is not None:
            basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        if scheme == "basic":
            if not basic:
                raise OriginDenied(f"{url}: the registry wants credentials (none for {registry} in auth_file)")
            self._auth[(registry, repo)] = (basic, time.monotonic() + 3600)
            return
        if scheme != "bearer" or not params.get("realm"):
            raise OriginDenied(f"{url}: unsupported authentication challenge {header[:200]!r}")
        realm = params["realm"]
        try:
            if URL(realm).scheme not in ("http", "https"):
                raise ValueError("not http(s)")
        except ValueError:
            raise OriginDenied(f"{url}: bad token realm {realm[:200]!r}") from None
        query = {"scope": f"repository:{repo}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        try:
            async with self._session.get(
                realm, params=query, headers={"Authorization": basic} if basic else {}, timeout=self._timeout
            ) as resp:
                if resp.status in (401, 403):
                    raise OriginDenied(f"{realm}: the token service refused (HTTP {resp.status})", status=resp.status)
                if resp.status != 200:
                    raise status_error(resp.status, realm)
                doc = await resp.json(content_type=None)
        except OriginError:
            raise
        except ValueError:
            raise OriginError(f"{realm}: the token service answered something that is not JSON") from None
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, realm) from None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise OriginDenied(f"{realm}: the token service sent no token")
        ttl = doc.get("expires_in") if isinstance(doc.get("expires_in"), int) else TOKEN_MIN_TTL_S
        # Renewed a little early so a read never starts with a token about to lapse.
        self._auth[(registry, repo)] = (f"Bearer {token}", time.monotonic() + max(10.0, ttl - 10))

    async def _get(
        self, registry: str, repo: str, path: str, headers: Mapping[str, str], *, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        """One small request to the registry with authentication; the body capped."""
        url = f"{self.base(registry)}/v2/{path}"
        for attempt in range(2):
            try:
                async with self._session.request(
                    method,
                    URL(url, encoded=True),
                    headers={**headers, **self._auth_header(registry, repo)},
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as resp:
                    if resp.status == 401 and attempt == 0:
                        await self._answer_challenge(registry, repo, resp.headers.get("WWW-Authenticate", ""), url)
                        continue
                    if method == "HEAD":
                        return resp.status, dict(resp.headers), b""  # a blob's HEAD names its full size
                    if resp.content_length is not None and resp.content_length > MAX_MANIFEST_BYTES:
                        raise OriginError(f"{url}: answer of {resp.content_length} bytes is too large", retryable=False)
                    body = await resp.content.read(MAX_MANIFEST_BYTES + 1)
                    if len(body) > MAX_MANIFEST_BYTES:
                        raise OriginError(f"{url}: answer larger than {MAX_MANIFEST_BYTES} bytes", retryable=False)
                    return resp.status, dict(resp.headers), body
            except OriginError:
                raise
            except (TimeoutError, aiohttp.ClientError) as e:
                raise client_error(e, url) from None
        raise OriginDenied(f"{url}: still unauthorized after authenticating", status=401)

    # --- manifests -----------------------------------------------------------------------------

    async def manifest(self, registry: str, repo: str, reference: str) -> FetchedManifest:
        """The manifest ``reference`` (tag or digest) of ``repo``, its digest checked: against the
        reference when it is one, else computed from the bytes (and compared with the registry's
        ``Docker-Content-Digest`` when it sends one)."""
        status, headers, body = await self._get(registry, repo, f"{repo}/manifests/{reference}", {"Accept": ACCEPT})
        url = f"{self.base(registry)}/v2/{repo}/manifests/{reference}"
        if status != 200:
            raise _registry_error(status, body, url)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if is_digest(reference) and digest != reference:
            raise IntegrityError(f"{url}: the manifest's bytes hash to {digest}, not the digest asked for")
        said = headers.get("Docker-Content-Digest", "")
        if said and is_digest(said) and said != digest:
            raise IntegrityError(f"{url}: Docker-Content-Digest {said} does not match the bytes ({digest})")
        media = headers.get("Content-Type", "").split(";")[0].strip()
        try:
            doc = json.loads(body)
        except ValueError:
            raise OriginError(f"{url}: the manifest is not JSON", retryable=False) from None
        if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
            media = doc["mediaType"]  # the document's own word beats a generic Content-Type
        if media not in MANIFEST_TYPES:
            raise OriginError(f"{url}: unsupported manifest media type {media[:100]!r}", retryable=False)
        return FetchedManifest(data=body, media_type=media, digest=digest)

    # --- blobs ---------------------------------------------------------------------------------

    async def read_into(
        self, registry: str, repo: str, digest: str, size: int, offset: int, length: int, sink: Sink
    ) -> None:
        """Bytes [offset, offset+length) of a blob handed to ``sink`` on a worker thread; 307s to
        storage are followed, the registry's Authorization sent only to the registry."""
        home = self.blob_url(registry, repo, digest)
        if not self._auth_header(registry, repo) and (registry, repo) not in self._auth:
            await self._prime(registry, repo, home)
        url = home
        for _ in range(MAX_REDIRECTS + 1):
            headers = self._auth_header(registry, repo) if URL(url).origin() == URL(home).origin() else {}
            try:
                await self._reader.read_into(
                    url, offset, length, sink, check=self._checker(home, size, registry, repo), headers=headers
                )
                return
            except Redirected as r:
                url = urljoin(url, r.location)
                try:
                    URL(url).origin()
                except ValueError as e:
                    raise OriginError(f"{home}: redirected to a bad URL: {e}", retryable=False) from None
            except RangeIOError as e:
                raise range_error(e, home) from None
        raise OriginError(f"{home}: more than {MAX_REDIRECTS} redirects", retryable=False)

    async def _prime(self, registry: str, repo: str, url: str) -> None:
        """Learn the Authorization for ``repo`` before the threaded reader needs it (it cannot
        answer a challenge itself): a HEAD of the blob, answering a 401 once."""
        status, headers, _ = await self._get(registry, repo, url.split("/v2/", 1)[1], {}, method="HEAD")
        if status in (401, 403):
            raise OriginDenied(f"{url}: access denied by the registry", status=status)

    def _checker(self, url: str, size: int, registry: str, repo: str) -> Callable[[int, Message], None]:
        def check(status: int, headers: Message) -> None:
            if status == 401:
                self._auth.pop((registry, repo), None)  # expired token: the retry asks for a new one
                raise OriginError(f"{url}: HTTP 401 (token expired?)", status=401, retryable=True)
            if status == 200:
                return  # the reader takes a 200 only as the whole blob
            if status != 206:
                raise status_error(status, url)
            span = content_range(headers)
            if span is not None and span[2] is not None and span[2] != size:
                raise OriginChanged(f"{url}: blob is {span[2]} bytes, the manifest says {size}")

        return check

    async def download(self, registry: str, repo: str, digest: str, size: int, dest: Path) -> None:
        """The whole blob into ``dest``, which exists only if its bytes hash to ``digest``."""
        tmp = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        got = 0
        out = await asyncio.to_thread(open, tmp, "wb")  # written by the reader's worker thread, closed below

        def sink(data: memoryview, offset: int) -> None:
            nonlocal got
            if offset != got:
                raise OriginError(f"blob {digest}: bytes out of order", retryable=True)
            h.update(data)
            out.write(data)
            got += len(data)

        try:
            try:
                if size:
                    await self.read_into(registry, repo, digest, size, 0, size, sink)
            finally:
                out.close()
            if got != size or "sha256:" + h.hexdigest() != digest:
                raise IntegrityError(f"{self.blob_url(registry, repo, digest)}: the bytes do not match the digest")
            tmp.rename(dest)
        finally:
            tmp.unlink(missing_ok=True)


def _registry_error(status: int, body: bytes, url: str) -> OriginError:
    """A registry's error answer, with its OCI error code where it sent one."""
    code = ""
    try:
        errors = json.loads(body).get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code = str(errors[0].get("code", ""))[:64]
    except (ValueError, AttributeError):
        pass
    reason = f"({code})" if code else ""
    if status == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"):
        return OriginNotFound(f"{url}: HTTP {status} {reason} (not in the registry)", status=status, upstream_code=code)
    err = status_error(status, url, reason)
    err.upstream_code = code or None
    return err
