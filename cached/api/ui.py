"""The live status page (``GET /ui``) and the cluster grid it draws (``GET /v1/cluster``).

The page is three static files shipped as package data (``cached/api/ui/``: ``index.html``,
``app.js``, ``app.css``, ``icon.svg``), read once at start. Everything it shows it fetches from
the read-only JSON routes of this same listener (``/v1/node``, ``/v1/models``, ``/v1/cluster``)
and follows ``/v1/events`` for live changes; nothing comes from another host, so it works on an
air-gapped node. The answers carry a strict Content-Security-Policy (``default-src 'self'``, no
inline script or style, no framing): a ref, node id or error text that holds markup is data the
script puts in the page as text (``textContent``), and the policy is the second line of defence
if it ever did not.

``/v1/cluster`` joins what this node knows of the cluster: every member with its state, and for
each model this node or a live member holds (from gossip) or the catalog names, which nodes hold
it ready or are fetching it (``cached.cluster.Locator.holders``). It lags the truth by a gossip
round, like the scheduler extender's view, and sends no request to any peer (an open page polls
it): a copy in flight elsewhere shows once this node has or remembers the model's manifest, as it
does for a model it holds. Bounded: at most ``MAX_NODES`` members and
``MAX_MODELS`` models, with ``truncated`` set when more exist.

This module serves and reads; it changes nothing and needs no admin credential. The local API's
guard (``cached.api.access``: the Host allow-list, foreign Origins) applies to these routes as to
every other.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web

from cached.cluster import Catalog, Locator
from cached.errors import NotFoundError, RefError
from cached.status import StatusSource
from cached.types import JobState, ModelRef

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
# Only this listener's own files and JSON; no inline code; no plugins, frames, forms or <base>.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MAX_NODES = 256
MAX_MODELS = 200


def _load_assets() -> dict[str, bytes]:
    root = resources.files("cached.api").joinpath("ui")
    return {name: root.joinpath(name).read_bytes() for name in ASSETS}


class StatusPage:
    """Serves the page and answers ``/v1/cluster``. Read-only."""

    def __init__(
        self,
        *,
        node_id: str,
        status: StatusSource,
        peers: Callable[[], list[dict[str, Any]]],
        catalog: Catalog | None,
        locator: Locator | None,
    ) -> None:
        self._node_id = node_id
        self._status = status
        self._peers = peers
        self._catalog = catalog
        self._locator = locator
        self._assets = _load_assets()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ui", self.page)
        app.router.add_get("/ui/{name}", self.asset)
        app.router.add_get("/v1/cluster", self.cluster)

    # --- the page ------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS or name == "index.html":
            raise NotFoundError(f"no such file of the status page: {name[:64]!r}")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(body=self._assets[name], headers={**HEADERS, "Content-Type": ASSETS[name]})

    # --- the grid ------------------------------------------------------------------------------

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(await self.cluster_object())

    async def cluster_object(self) -> dict[str, Any]:
        peers = self._peers()
        members = [{"node_id": self._node_id, "address": None, "state": "alive", "self": True}] + [
            {"node_id": str(p["node_id"]), "address": p.get("address"), "state": p.get("state"), "self": False}
            for p in peers[: MAX_NODES - 1]
        ]
        refs = self._refs()
        rows = await self._rows(refs[:MAX_MODELS])
        return {
            "node_id": self._node_id,
            "members": members,
            "models": rows,
            "truncated": len(peers) > MAX_NODES - 1 or len(refs) > MAX_MODELS,
        }

    def _refs(self) -> list[ModelRef]:
        """This node's models, the catalog's and those live members hold, each parsed (a peer's
        spelling that does not parse is not a model anyone can fetch, and is left out)."""
        names = {r.canonical for r in self._status.known()}
        if self._catalog is not None:
            names |= {e.ref for e in self._catalog.entries()}
        if self._locator is not None:
            names |= self._locator.refs()
        out = {}
        for name in names:
            try:
                ref = ModelRef.parse(name)
            except RefError:
                continue
            out[ref.canonical] = ref
        return [out[k] for k in sorted(out)]

    async def _rows(self, refs: list[ModelRef]) -> list[dict[str, Any]]:
        return [await self._row(r) for r in refs]

    async def _row(self, ref: ModelRef) -> dict[str, Any]:
        holders: dict[str, dict[str, Any]] = {}
        if self._locator is not None:
            for node_id, h in (await self._locator.holders(ref, ask_peers=False)).items():
                holders[node_id] = {
                    "node_id": node_id,
                    "state": h.state.value,
                    "bytes_done": h.bytes_done,
                    "bytes_total": h.bytes_total,
                }
        here = self._status.of(ref)
        if here.state is not JobState.ABSENT:
            # This node's own word, failures included (gossip carries only what is held).
            holders[self._node_id] = {
                "node_id": self._node_id,
                "state": here.state.value,
                "bytes_done": here.bytes_done,
                "bytes_total": here.bytes_total,
            }
        entry = self._catalog.get(ref.canonical) if self._catalog is not None else None
        return {
            "ref": ref.canonical,
            "replicas": entry.replicas if entry is not None else None,
            "holders": sorted(holders.values(), key=lambda h: h["node_id"]),
        }
