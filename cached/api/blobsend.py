"""Sending a span of a complete, verified blob on a prepared HTTP response, by the kernel.

A complete blob verified as a whole before it was published (``cached.store.verified``), so any
span of it may leave the node without a pass through Python: ``send_blob`` hands the open
descriptor to ``loop.sendfile`` (as aiohttp's ``FileResponse`` does) and falls back to reads in a
worker thread where the transport cannot take it (TLS, a transport without sendfile). The caller
opens the blob first (``Store.open_verified``), so a blob evicted while it streams still sends
the same inode's bytes. Used by ``/v2`` (``cached.api.registry``) and ``/hf``
(``cached.api.hf``) once their file is a complete blob.

This module does not choose the span or the headers, prepare the response, or send a partial
blob (``VerifiedFile.fileno`` refuses one): the APIs do, and stream partials piece by piece.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from cached.store.verified import VerifiedFile

# One sendfile call at most this many bytes: the served-bytes counter moves as a transfer goes
# (and is at most this much short when the client hangs up mid-call), at a cost of one event-loop
# round per slice.
SLICE = 16 << 20
CHUNK = 1 << 20  # a read of the fallback


async def send_blob(
    request: web.BaseRequest,
    resp: web.StreamResponse,
    source: VerifiedFile,
    start: int,
    length: int,
    sent: Callable[[int], None],
) -> int:
    """Send bytes [start, start+length) of the complete blob ``source`` on ``resp``, whose headers
    are sent already (``prepare``); ``sent(n)`` after every ``n`` bytes that went out. Returns the
    bytes sent: fewer than ``length`` only if the file ended early. ``ConnectionResetError`` when
    the client went away; the caller writes the EOF."""
    loop = asyncio.get_running_loop()
    pos, end = start, start + length
    native = True
    while pos < end:
        n = min(SLICE, end - pos)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if native:
            try:
                # fallback=False: asyncio's own fallback would read the descriptor in a worker
                # thread that a close could race; ours reads through VerifiedFile, which cannot.
                k = await loop.sendfile(transport, source, pos, n, fallback=False)  # type: ignore[arg-type]
            except (NotImplementedError, RuntimeError):
                # TLS, or a transport without sendfile (SendfileNotAvailableError is a
                # RuntimeError): nothing was sent; read and write from here on.
                native = False
                continue
            except ConnectionError as e:
                raise ConnectionResetError(str(e)) from e
        else:
            chunk = await source.read(pos, min(CHUNK, n))
            await resp.write(chunk)
            k = len(chunk)
        if k:
            sent(k)
        pos += k
        if k == 0 or (native and k < n):
            break  # the file is shorter than its index entry says
    return pos - start
