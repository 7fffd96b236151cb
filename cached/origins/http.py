"""``http(s)://`` origin: one file on any HTTP server, read as byte ranges.

``resolve`` learns the size, the validator (ETag, else Last-Modified) and whether the server
honours ``Range``. Every ranged read carries ``If-Range`` with that validator: if the file changed
under the same URL, the server answers 200 instead of 206 and the read fails with
``OriginChanged`` -- pieces of two versions are never mixed. Statuses become typed errors with
``retryable`` set; retries and backoff belong to the transfer layer.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.message import Message
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from cached.config import HttpOriginConfig
from cached.errors import OriginChanged, OriginDenied, OriginError, OriginNotFound
from cached.origins import Resolution
from cached.rangeio import Check, RangeIOError, Redirected, Sink, ThreadedRangeReader
from cached.ranges import content_range
from cached.types import ModelRef, OriginFile

_STREAM_CHUNK = 1 << 20
MAX_REDIRECTS = 10
T = TypeVar("T")


def status_error(status: int, url: str, reason: str = "") -> OriginError:
    where = f"{url}: HTTP {status}{' ' + reason if reason else ''}"
    if status == 404 or status == 410:
        return OriginNotFound(f"{where} (not found at the origin)", status=status)
    if status in (401, 403):
        return OriginDenied(f"{where} (access denied by the origin)", status=status)
    if status == 416:
        return OriginChanged(f"{where} (range not satisfiable: the file changed size)", status=status)
    retryable = status in (408, 425, 429) or status >= 500
    return OriginError(where, status=status, retryable=retryable)


def check_pinned_range(status: int, headers: Message, file: OriginFile, refused: Callable[[], OriginError]) -> None:
    """A ranged answer for a file pinned by its content (a hub commit): 200 is the whole file
    (the reader takes it only at offset 0, exact length), 206 must report the same total size;
    any other status is ``refused()``."""
    if status == 200:
        return
    if status != 206:
        raise refused()
    span = content_range(headers)
    if span is not None and span[2] is not None and span[2] != file.size:
        raise OriginChanged(f"{file.locator}: size changed at the hub ({file.size} -> {span[2]})")


def client_error(e: BaseException, url: str) -> OriginError:
    u = URL(url)
    host = f"{u.host}:{u.port}"
    if isinstance(e, aiohttp.ClientConnectorError):
        return OriginError(f"{url}: cannot connect to {host}: {e.os_error.strerror or e}", retryable=True)
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return OriginError(f"{url}: timed out waiting for the origin", retryable=True)
    return OriginError(f"{url}: {type(e).__name__}: {e}", retryable=True)


def range_error(e: RangeIOError, url: str) -> OriginError:
    """A transport failure of the threaded byte path: worth another try unless the server
    ignores Range altogether."""
    return OriginError(str(e) if str(e).startswith(url) else f"{url}: {e}", retryable=e.kind != "ignored-range")


class HttpOrigin:
    def __init__(self, session: aiohttp.ClientSession, cfg: HttpOriginConfig, reader: ThreadedRangeReader) -> None:
        self._session = session
        self._reader = reader  # piece bodies: worker threads, off the event loop
        self._timeout = aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s)

    async def resolve(self, ref: ModelRef) -> Resolution:
        url = ref.url
        try:
            async with self._session.head(
                url, allow_redirects=True, timeout=self._timeout, headers={"Accept-Encoding": "identity"}
            ) as resp:
                if resp.status in (405, 501):
                    return Resolution(files=(await self._probe_with_get(url, ref),))
                if resp.status != 200:
                    raise status_error(resp.status, url, resp.reason or "")
                size = resp.content_length
                etag = resp.headers.get("ETag", "")
                last_modified = resp.headers.get("Last-Modified", "")
                ranges = resp.headers.get("Accept-Ranges", "").lower() == "bytes"
            if size is None or not ranges:
                # Some servers omit Content-Length or Accept-Ranges on HEAD; a one-byte GET tells.
                return Resolution(files=(await self._probe_with_get(url, ref),))
        except OriginError:
            raise
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, url) from None
        return Resolution(files=(self._file(ref, url, size, etag, last_modified, ranges),))

    async def _probe_with_get(self, url: str, ref: ModelRef) -> OriginFile:
        try:
            async with self._session.get(
                url, headers={"Range": "bytes=0-0", "Accept-Encoding": "identity"}, timeout=self._timeout
            ) as resp:
                etag = resp.headers.get("ETag", "")
                last_modified = resp.headers.get("Last-Modified", "")
                if resp.status == 206:
                    span = content_range(resp.headers)
                    if span is None or span[2] is None:
                        raise OriginError(f"{url}: malformed Content-Range {resp.headers.get('Content-Range')!r}")
                    return self._file(ref, url, span[2], etag, last_modified, True)
                if resp.status == 200 and resp.content_length is not None:
                    return self._file(ref, url, resp.content_length, etag, last_modified, False)
                if resp.status == 200:
                    raise OriginError(f"{url}: the server sends no Content-Length; the file size cannot be known")
                raise status_error(resp.status, url, resp.reason or "")
        except OriginError:
            raise
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, url) from None

    async def file_for(
        self, ref: ModelRef, revision: str | None, path: str, size: int, checksums: Mapping[str, str]
    ) -> OriginFile:
        """The one file of ``ref``: its URL is the ref itself, never a stored or peer's address."""
        if path != URL(ref.url).name:
            raise OriginError(f"{ref}: {path!r} is not the file this URL names", retryable=False)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OriginError(f"{ref}: bad size {size!r}", retryable=False)
        return self._file(
            ref,
            ref.url,
            size,
            str(checksums.get("etag", "")),
            str(checksums.get("last_modified", "")),
            checksums.get("ranges") == "1",
        )

    @staticmethod
    def _file(ref: ModelRef, url: str, size: int, etag: str, last_modified: str, ranges: bool) -> OriginFile:
        checksums = {"etag": etag} if etag else {}
        if last_modified:
            checksums["last_modified"] = last_modified
        checksums["ranges"] = "1" if ranges else "0"
        validator = etag or last_modified
        return OriginFile(
            path=URL(url).name,
            size=size,
            identity=f"http|{url}|{validator}|{size}",
            checksums=checksums,
            locator=url,
        )

    def supports_ranges(self, file: OriginFile) -> bool:
        return file.checksums.get("ranges") == "1"

    def local_path(self, file: OriginFile) -> str | None:
        return None

    def _if_range(self, file: OriginFile) -> dict[str, str]:
        etag = file.checksums.get("etag", "")
        if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
            return {"If-Range": etag}
        if file.checksums.get("last_modified"):
            return {"If-Range": file.checksums["last_modified"]}
        return {}

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes | bytearray:
        return await self._follow(
            file, lambda u, h: self._reader.read(u, offset, length, check=self._checker(file), headers=h)
        )

    async def read_range_into(self, file: OriginFile, offset: int, length: int, sink: Sink) -> None:
        """The range handed to ``sink`` batch by batch on a worker thread as it arrives, so the
        caller can hash and write each while the next is on the wire."""
        await self._follow(
            file, lambda u, h: self._reader.read_into(u, offset, length, sink, check=self._checker(file), headers=h)
        )

    async def _follow(self, file: OriginFile, request: Callable[[str, dict[str, str]], Awaitable[T]]) -> T:
        """``request(url, headers)`` on the file's URL and on each redirect. Credentials in the
        URL (``https://user:pass@host/f``) go, as Basic auth, only to that same origin."""
        home = URL(file.locator)
        auth = {}
        if home.user:
            basic = base64.b64encode(f"{home.user}:{home.password or ''}".encode()).decode()
            auth = {"Authorization": f"Basic {basic}"}
        url = str(home.with_user(None)) if home.user else file.locator
        for _ in range(MAX_REDIRECTS + 1):
            try:
                try:
                    same = URL(url).origin() == home.origin()
                except ValueError as e:
                    raise OriginError(f"{file.locator}: redirected to a bad URL: {e}", retryable=False) from None
                return await request(url, {**self._if_range(file), **(auth if same else {})})
            except Redirected as r:
                url = urljoin(url, r.location)
            except RangeIOError as e:
                raise range_error(e, file.locator) from None
        raise OriginError(f"{file.locator}: more than {MAX_REDIRECTS} redirects", retryable=False)

    @staticmethod
    def _checker(file: OriginFile) -> Check:
        def check(status: int, headers: Message) -> None:
            if status == 200:
                raise OriginChanged(
                    f"{file.locator}: the file changed at the origin (validator no longer matches)", status=200
                )
            if status != 206:
                raise status_error(status, file.locator)
            span = content_range(headers)
            if span is not None and span[2] is not None and span[2] != file.size:
                raise OriginChanged(f"{file.locator}: the file changed size at the origin ({file.size} -> {span[2]})")

        return check

    async def stream(self, file: OriginFile) -> AsyncIterator[bytes]:
        url = file.locator
        try:
            async with self._session.get(url, headers={"Accept-Encoding": "identity"}, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise status_error(resp.status, url, resp.reason or "")
                etag = resp.headers.get("ETag", "")
                if resp.content_length not in (None, file.size) or (
                    file.checksums.get("etag") and etag != file.checksums["etag"]
                ):
                    raise OriginChanged(f"{url}: the file changed at the origin")
                async for chunk in resp.content.iter_chunked(_STREAM_CHUNK):
                    yield chunk
        except OriginError:
            raise
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, url) from None

    async def check_unchanged(self, file: OriginFile) -> None:
        # If-Range is checked when a response starts; a file rewritten in place while bodies were
        # still streaming is only seen by asking once more after the last piece is in.
        url = file.locator
        try:
            async with self._session.head(
                url, allow_redirects=True, timeout=self._timeout, headers={"Accept-Encoding": "identity"}
            ) as resp:
                if resp.status in (405, 501):
                    return  # no HEAD: the per-request checks are all there is
                if resp.status != 200:
                    raise status_error(resp.status, url, resp.reason or "")
                validator = resp.headers.get("ETag", "") or resp.headers.get("Last-Modified", "")
                size = resp.content_length
        except OriginError:
            raise
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, url) from None
        before = file.checksums.get("etag") or file.checksums.get("last_modified", "")
        if validator != before or (size is not None and size != file.size):
            raise OriginChanged(f"{url}: the file changed at the origin during the download")

    async def check_content(self, file: OriginFile, data_path: Path) -> None:
        return None  # a plain HTTP server publishes no checksum we could trust
