"""Signing for tests that speak the peer API by hand, and a fake peer that answers signed.

``signed(token, method, url, body)`` gives the headers a node would send (``peers.auth`` wire
format, a fresh nonce each call); ``sign_answers(app, token)`` makes a test's own aiohttp app
answer like a real node (``X-Cached-Answer`` over each body, or the range headers of a 206), so
a test can play a token-holding peer that lies in what it says rather than in how it signs.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from yarl import URL

from cached.peers.auth import HEADER_ANSWER, HEADER_NODE, HEADER_NONCE, ClusterKey, sign_answer, sign_request

CLUSTER = "default"


def key(token: str, cluster: str = CLUSTER) -> ClusterKey:
    return ClusterKey(token, cluster)


def signed(
    token: str,
    method: str,
    url: str,
    body: bytes | str = b"",
    *,
    node_id: str = "test-peer",
    cluster: str = CLUSTER,
    **kw: Any,
) -> dict[str, str]:
    """Headers that authenticate one request to ``url`` (path and query as aiohttp sends them)."""
    raw = body.encode() if isinstance(body, str) else body
    return sign_request(key(token, cluster), node_id, method, URL(url).raw_path_qs, raw, **kw)


def sign_answers(app: web.Application, token: str, *, node_id: str = "fake-peer", cluster: str = CLUSTER) -> None:
    """Sign every answer of ``app`` with the cluster key, bound to each request's nonce."""
    k = key(token, cluster)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        nonce = request.headers.get(HEADER_NONCE, "")
        if isinstance(response, web.Response) and isinstance(response.body, (bytes, bytearray, type(None))):
            mac = sign_answer(k, node_id, nonce, response.status, body=bytes(response.body or b""))
        else:
            h = response.headers
            mac = sign_answer(
                k,
                node_id,
                nonce,
                response.status,
                content_range=h.get("Content-Range", ""),
                content_length=h.get("Content-Length", ""),
            )
        response.headers[HEADER_NODE] = node_id
        response.headers[HEADER_ANSWER] = mac

    app.on_response_prepare.append(on_prepare)
