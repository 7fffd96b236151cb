"""``hf://`` origin: a Hugging Face hub or an HF-compatible mirror, spoken as plain HTTP.

Resolve: the revision API turns a branch or tag into a commit; the tree API (following
``Link: rel="next"``) lists the files with their size, git blob sha1 and, for LFS files, sha256.
Each file's identity is its content hash (sha256 for LFS, git blob sha1 otherwise), so a file
that did not change between two commits is never fetched twice. Reads go to
``/{repo}/resolve/{commit}/{path}``; huggingface.co answers LFS files with a 302 to a CDN, which
is followed without the token (and the signed URL is re-fetched when it expires). Once a file is
complete, its sha256 or git sha1 is checked before it may become a blob.

Errors keep the hub's ``X-Error-Code`` (``upstream_code``) so the HF endpoint can hand the same
error to an unmodified client. Xet is never used: this is the plain-HTTP protocol of HF.md §6.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urljoin

import aiohttp
from yarl import URL

from cached.config import HfOriginConfig, HttpOriginConfig
from cached.errors import IntegrityError, OriginDenied, OriginError, OriginNotFound
from cached.origins import Resolution, stream_by_ranges
from cached.origins.http import MAX_REDIRECTS, check_pinned_range, client_error, range_error, status_error
from cached.rangeio import Check, RangeIOError, Redirected, Sink, ThreadedRangeReader
from cached.types import ModelRef, OriginFile, validate_file_path

MAX_TREE_PAGES = 1000
CDN_URL_TTL_S = 600.0  # signed CDN URLs live about an hour; re-ask well before that
_READ_CHUNK = 8 << 20
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


def hf_error(status: int, headers: Any, what: str) -> OriginError:
    """Map a hub answer to a typed error, keeping its X-Error-Code."""
    code = headers.get("X-Error-Code", "")
    message = headers.get("X-Error-Message", "")
    detail = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f" ({message})" if message else "")
    if code == "GatedRepo":
        return OriginDenied(
            f"{detail}: the repo is gated; set a token the repo has granted (HF_TOKEN or origins.hf.token_file)",
            status=status,
            upstream_code=code,
        )
    if code == "RepoNotFound":
        return OriginNotFound(
            f"{detail}: no such repo, or it is private and the token does not grant it",
            status=status,
            upstream_code=code,
        )
    if code in ("RevisionNotFound", "EntryNotFound"):
        return OriginNotFound(detail, status=status, upstream_code=code)
    if status in (401, 403):
        return OriginDenied(detail, status=status, upstream_code=code or None)
    if status == 404:
        return OriginNotFound(detail, status=status, upstream_code=code or None)
    err = status_error(status, what)
    err.upstream_code = code or None
    return err


def git_blob_sha1_sync(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_sync(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HfOrigin:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        cfg: HfOriginConfig,
        http_cfg: HttpOriginConfig,
        reader: ThreadedRangeReader,
        *,
        token: str | None = None,
    ) -> None:
        self._session = session
        self._reader = reader  # file bytes: worker threads, off the event loop
        self.endpoint = cfg.endpoint.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=http_cfg.connect_timeout_s, sock_read=http_cfg.read_timeout_s
        )
        self._cdn: dict[str, tuple[str, float]] = {}  # resolve URL -> (redirect target, expiry)

    # --- requests ------------------------------------------------------------------------------

    def _auth(self, token: str | None = None) -> dict[str, str]:
        token = token or self._token
        return {"authorization": f"Bearer {token}"} if token else {}

    async def api_json(
        self, path: str, *, params: dict[str, str] | None = None, token: str | None = None
    ) -> tuple[Any, aiohttp.typedefs.LooseHeaders]:
        """GET ``{endpoint}{path}`` (already quoted) and return (JSON, headers)."""
        url = self.endpoint + path
        try:
            async with self._session.get(
                URL(url, encoded=True), params=params, headers=self._auth(token), timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    raise hf_error(resp.status, resp.headers, url)
                try:
                    return await resp.json(content_type=None), resp.headers
                except ValueError:
                    raise OriginError(f"{url}: the hub answered something that is not JSON", retryable=True) from None
        except OriginError:
            raise
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, url) from None

    async def commit_of(self, repo: str, revision: str, *, token: str | None = None) -> tuple[str, dict[str, Any]]:
        info, _ = await self.api_json(f"/api/models/{quote(repo)}/revision/{quote(revision, safe='')}", token=token)
        sha = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(sha, str) or len(sha) != 40:
            raise OriginError(f"{self.endpoint}: revision {revision!r} of {repo} did not resolve to a commit")
        return sha, info

    async def tree(self, repo: str, commit: str, *, token: str | None = None) -> list[dict[str, Any]]:
        """Every file entry of the commit, following pagination."""
        url: str | None = f"{self.endpoint}/api/models/{quote(repo)}/tree/{commit}?recursive=true&expand=false"
        entries: list[dict[str, Any]] = []
        for _ in range(MAX_TREE_PAGES):
            if url is None:
                return entries
            try:
                async with self._session.get(
                    URL(url, encoded=True), headers=self._auth(token), timeout=self._timeout
                ) as resp:
                    if resp.status != 200:
                        raise hf_error(resp.status, resp.headers, url)
                    page = await resp.json(content_type=None)
                    nxt = resp.links.get("next")
                    url = str(nxt["url"]) if nxt else None
            except OriginError:
                raise
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                raise client_error(e, url or "") from None
            if not isinstance(page, list):
                raise OriginError(f"{self.endpoint}: tree listing of {repo} is not a list")
            entries.extend(e for e in page if isinstance(e, dict) and e.get("type") == "file")
        raise OriginError(f"{self.endpoint}: tree listing of {repo} has more than {MAX_TREE_PAGES} pages")

    async def paths_info(
        self, repo: str, commit: str, paths: list[str], *, token: str | None = None
    ) -> list[dict[str, Any]]:
        url = f"{self.endpoint}/api/models/{quote(repo)}/paths-info/{commit}"
        form = [("paths", p) for p in paths] + [("expand", "false")]
        try:
            async with self._session.post(
                URL(url, encoded=True), data=form, headers=self._auth(token), timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    raise hf_error(resp.status, resp.headers, url)
                entries = await resp.json(content_type=None)
        except OriginError:
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            raise client_error(e, url) from None
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    async def relay(
        self,
        method: str,
        path_and_query: str,
        *,
        token: str | None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> tuple[int, dict[str, str], str, bytes]:
        """One API call relayed as is (already-encoded path): (status, headers, content type, body)."""
        url = URL(self.endpoint + path_and_query, encoded=True)
        headers = self._auth(token)
        if data is not None and content_type:
            headers["Content-Type"] = content_type
        try:
            async with self._session.request(method, url, headers=headers, data=data, timeout=self._timeout) as resp:
                return resp.status, dict(resp.headers), resp.content_type, await resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, str(url)) from None

    # --- origin protocol -----------------------------------------------------------------------

    async def resolve(self, ref: ModelRef) -> Resolution:
        sha, _ = await self.commit_of(ref.repo, ref.revision)
        files: list[OriginFile] = []
        for e in await self.tree(ref.repo, sha):
            path = e.get("path")
            try:
                validate_file_path(path)
            except ValueError:
                continue  # a path we could not place safely on disk
            if not _selected(path, ref.include, ref.exclude):
                continue
            files.append(self.origin_file(ref.repo, sha, e))
        if not files:
            raise OriginNotFound(
                f"{ref}: no files at commit {sha}"
                + (" match the include/exclude patterns" if ref.include or ref.exclude else "")
            )
        return Resolution(files=tuple(files), revision=sha)

    async def file_for(
        self, ref: ModelRef, revision: str | None, path: str, size: int, checksums: Mapping[str, str]
    ) -> OriginFile:
        """The file at ``{endpoint}/{ref.repo}/resolve/{revision}/{path}``: this daemon's endpoint
        and the ref's repo, whatever address a manifest or a peer may carry."""
        sha256, git_sha1 = checksums.get("sha256", ""), checksums.get("git_sha1", "")
        try:
            validate_file_path(path)
        except ValueError as e:
            raise OriginError(f"{ref}: bad file path {path!r}: {e}", retryable=False) from None
        if not isinstance(revision, str) or not _HEX40.match(revision):
            raise OriginError(f"{ref}: {revision!r} is not a commit id", retryable=False)
        if not _selected(path, ref.include, ref.exclude):
            raise OriginError(f"{ref}: {path!r} is not a file of this ref", retryable=False)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OriginError(f"{ref}: bad size {size!r} for {path!r}", retryable=False)
        if (
            (sha256 and not _HEX64.match(sha256))
            or (git_sha1 and not _HEX40.match(git_sha1))
            or not (sha256 or git_sha1)
        ):
            raise OriginError(f"{ref}: {path!r} has no valid sha256 or git sha1", retryable=False)
        entry: dict[str, Any] = {"path": path, "size": size, "oid": git_sha1}
        if sha256:
            entry["lfs"] = {"oid": sha256, "size": size}
        return self.origin_file(ref.repo, revision, entry)

    def origin_file(self, repo: str, commit: str, entry: dict[str, Any]) -> OriginFile:
        path = entry["path"]
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else None
        size = int(lfs.get("size", entry.get("size", 0)) if lfs else entry.get("size", 0))
        if lfs and isinstance(lfs.get("oid"), str):
            checksums = {"sha256": lfs["oid"].lower(), "git_sha1": str(entry.get("oid", ""))}
            # Content-addressed identity: the same bytes in another commit (or repo) reuse the blob.
            identity = f"sha256|{checksums['sha256']}|{size}"
        else:
            checksums = {"git_sha1": str(entry.get("oid", ""))}
            identity = f"gitblob|{checksums['git_sha1']}|{size}"
        return OriginFile(
            path=path,
            size=size,
            identity=identity,
            checksums=checksums,
            locator=f"{self.endpoint}/{quote(repo)}/resolve/{commit}/{quote(path)}",
        )

    def supports_ranges(self, file: OriginFile) -> bool:
        return True

    def local_path(self, file: OriginFile) -> str | None:
        return None

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes | bytearray:
        return await self._via_cdn(
            file, lambda url, check, headers: self._reader.read(url, offset, length, check=check, headers=headers)
        )

    async def read_range_into(self, file: OriginFile, offset: int, length: int, sink: Sink) -> None:
        await self._via_cdn(
            file,
            lambda url, check, headers: self._reader.read_into(url, offset, length, sink, check=check, headers=headers),
        )

    async def _via_cdn(self, file: OriginFile, request: Callable[[str, Check, dict[str, str]], Awaitable[T]]) -> T:
        """Ask the hub; on a redirect remember the CDN URL and ask it, with no token unless it is
        the hub itself. A CDN that refuses a remembered URL (expired signature) is forgotten."""
        target = self._cdn.get(file.locator)
        try:
            if target is None or target[1] < time.monotonic():
                try:
                    return await request(file.locator, self._range_check(file, cdn=False), self._auth())
                except Redirected as r:
                    location = urljoin(file.locator, r.location)
                    self._cdn[file.locator] = (location, time.monotonic() + CDN_URL_TTL_S)
                    target = (location, 0.0)
            location = target[0]
            for _ in range(MAX_REDIRECTS):
                try:
                    same_host = URL(location).origin() == URL(file.locator).origin()
                except ValueError as e:
                    raise OriginError(f"{file.locator}: redirected to a bad URL: {e}", retryable=False) from None
                # The token stays with the hub: a CDN never sees it.
                try:
                    return await request(location, self._range_check(file, cdn=True), self._auth() if same_host else {})
                except Redirected as r:
                    location = urljoin(location, r.location)
            raise OriginError(f"{file.locator}: more than {MAX_REDIRECTS} redirects", retryable=False)
        except RangeIOError as e:
            raise range_error(e, file.locator) from None

    def _range_check(self, file: OriginFile, *, cdn: bool) -> Check:
        def check(status: int, headers: Message) -> None:
            if cdn and status in (401, 403):
                self._cdn.pop(file.locator, None)  # expired signature: ask the hub again
                raise OriginError(
                    f"{file.locator}: the CDN refused the signed URL (HTTP {status}); asking again",
                    status=status,
                    retryable=True,
                )
            check_pinned_range(status, headers, file, lambda: hf_error(status, headers, file.locator))

        return check

    def stream(self, file: OriginFile) -> AsyncIterator[bytes]:
        return stream_by_ranges(self, file, _READ_CHUNK)

    async def check_unchanged(self, file: OriginFile) -> None:
        return None  # the commit pins the content; check_content proves the bytes

    async def check_content(self, file: OriginFile, data_path: Path) -> None:
        """The hub's own checksum over the complete file: sha256 (LFS) or git blob sha1."""
        if "sha256" in file.checksums:
            got = await asyncio.to_thread(sha256_sync, data_path)
            want, kind = file.checksums["sha256"], "sha256"
        elif file.checksums.get("git_sha1"):
            got = await asyncio.to_thread(git_blob_sha1_sync, data_path)
            want, kind = file.checksums["git_sha1"], "git blob sha1"
        else:
            return
        if got != want:
            raise IntegrityError(f"{file.path}: {kind} {got} does not match the hub's {want}; the file was discarded")


def _selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(path, p) for p in exclude)
