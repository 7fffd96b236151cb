"""Client of the local API, used by ``cachectl`` (and usable by launchers written in Python).

Addresses: ``http://HOST:PORT``, ``HOST:PORT`` or ``unix:/path``. Connection failures become
``DaemonUnreachable``; error answers become ``ApiError`` carrying the daemon's code and message.

The admin token (for ``pin``, ``gc``, ``evict --force``, ...) is sent as ``Authorization: Bearer``
when one is given, or else read from the file named by ``$CACHED_ADMIN_TOKEN_FILE`` when that is
set; ``cachectl`` resolves its own flag and defaults (``cached.cli``) and passes the token in.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from cached.errors import CachedError, DaemonUnreachable

ADMIN_TOKEN_ENV = "CACHED_ADMIN_TOKEN_FILE"


class ApiError(CachedError):
    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.body = body or {}


def parse_address(addr: str) -> tuple[str, str | None]:
    """(base URL, unix socket path or None)."""
    if addr.startswith("unix:"):
        return "http://localhost", addr[len("unix:") :]
    if addr.startswith(("http://", "https://")):
        return addr.rstrip("/"), None
    if ":" in addr:
        return f"http://{addr}", None
    raise ValueError(f"not an API address: {addr!r} (use http://HOST:PORT, HOST:PORT or unix:/path)")


def read_token_file(path: str | Path) -> str:
    """The admin token in ``path`` (whitespace stripped); OSError/ValueError when unusable."""
    token = Path(path).read_text().strip()
    if not token or not token.isascii() or not token.isprintable():
        raise ValueError(f"{path}: does not hold a token (one line of printable ASCII)")
    return token


class ApiClient:
    def __init__(self, addr: str, *, timeout_s: float | None = 30.0, admin_token: str | None = None) -> None:
        self.base, self._unix = parse_address(addr)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=5)
        self._session: aiohttp.ClientSession | None = None
        self._admin_token = admin_token

    async def __aenter__(self) -> ApiClient:
        token = self._admin_token
        if token is None and os.environ.get(ADMIN_TOKEN_ENV):
            try:
                token = read_token_file(os.environ[ADMIN_TOKEN_ENV])
            except (OSError, ValueError):
                token = None  # not usable: admin routes will answer 401 and say how to get access
        headers = {"Authorization": f"Bearer {token}"} if token else None
        connector = aiohttp.UnixConnector(path=self._unix) if self._unix else aiohttp.TCPConnector()
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        long: bool = False,
    ) -> Any:
        """One call. ``long`` (and any ``wait`` body) lifts the total timeout: the daemon decides."""
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=None, connect=5) if long or (body or {}).get("wait") else self._timeout
        try:
            async with self._session.request(
                method, self.base + path, json=body, params=params, timeout=timeout
            ) as resp:
                text = await resp.text()
                try:
                    data = json.loads(text) if text else None
                except json.JSONDecodeError:
                    data = None
                if resp.status >= 400:
                    if isinstance(data, dict) and "error" in data:
                        raise ApiError(resp.status, str(data["error"]), str(data.get("message", "")), data)
                    raise ApiError(resp.status, "http_error", f"HTTP {resp.status}: {text[:200]}")
                return data
        except (aiohttp.ClientConnectionError, OSError) as e:
            where = f"unix:{self._unix}" if self._unix else self.base
            raise DaemonUnreachable(f"cannot reach the cached daemon at {where}: {e}") from None

    async def events(self, ref: str | None = None) -> AsyncIterator[dict[str, Any]]:
        assert self._session is not None
        params = {"ref": ref} if ref else None
        try:
            async with self._session.get(
                self.base + "/v1/events", params=params, timeout=aiohttp.ClientTimeout(total=None, connect=5)
            ) as resp:
                if resp.status >= 400:
                    raise ApiError(resp.status, "http_error", await resp.text())
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientConnectionError, OSError) as e:
            raise DaemonUnreachable(f"lost the event stream of the cached daemon: {e}") from None
