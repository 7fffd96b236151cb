"""The Kubernetes scheduler extender: ``/v1/k8s/filter`` and ``/v1/k8s/prioritize``.

kube-scheduler sends ExtenderArgs (Go field names: ``Pod``, ``Nodes`` as a NodeList, or
``NodeNames`` when the extender is node-cache-capable); node names are node ids. A pod names its
model in the annotation ``cached.io/model``. Prioritize answers a HostPriorityList: 10 for a
node with a ready copy, 1..9 by progress for one with a copy in flight, 1 for a node with no copy
whose zone (``labels.zone``) holds one (ready or in flight, on another node), 0 else. The zone
point matters when no candidate holds the model ready: the scheduler then leans to a zone the
bytes are already in, so the pod's node pulls them over the zone's own links instead of across
the thin link between zones (and a copy half-way in flight here still ranks at least as high).
A node without a zone label never gets it. Filter lets
every node through unless the pod says ``cached.io/require-local: "true"``; then only ready
holders pass, and every node left out gets a reason.

Where the model is comes from ``Locator.holders`` (this node's status and the holdings gossip
brought in), so a scheduling call asks no peer over HTTP; without a cluster, this node alone.
The answer is the same whichever node is asked, up to a gossip round. A body that is not
ExtenderArgs is a ``RequestError`` (400, through the local API's error middleware).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cached.api.body import read_object
from cached.cluster import Holding, Locator
from cached.errors import RequestError
from cached.status import StatusSource
from cached.types import JobState, ModelRef

MODEL_ANNOTATION = "cached.io/model"
REQUIRE_LOCAL_ANNOTATION = "cached.io/require-local"
NOT_READY = "no ready copy of the pod's model (cached.io/require-local)"


class K8sExtender:
    def __init__(self, *, node_id: str, status: StatusSource, locator: Locator | None = None) -> None:
        self._node_id = node_id
        self._status = status
        self._locator = locator

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/k8s/filter", self.filter)
        app.router.add_post("/v1/k8s/prioritize", self.prioritize)

    async def filter(self, request: web.Request) -> web.Response:
        """ExtenderFilterResult: the NodeList (objects intact) or the names that pass."""
        args = await read_object(request)
        ref, require = _pod_model(args.get("Pod"))
        holders = await self._holders(ref)
        names = _node_names(args)
        keep = [n for n in names if not require or (n in holders and holders[n].ready)]
        failed = {n: NOT_READY for n in names if n not in keep}
        result: dict[str, Any] = {"NodeNames": keep, "FailedNodes": failed, "Error": ""}
        if isinstance(args.get("Nodes"), dict):
            items = args["Nodes"].get("items") or []
            result["Nodes"] = {**args["Nodes"], "items": [i for i in items if i["metadata"]["name"] in keep]}
            result["NodeNames"] = None
        return web.json_response(result)

    async def prioritize(self, request: web.Request) -> web.Response:
        """HostPriorityList: one ``{"Host", "Score"}`` per candidate, in the order given."""
        args = await read_object(request)
        ref, _ = _pod_model(args.get("Pod"))
        holders = await self._holders(ref)
        zones = self._locator.zones() if self._locator is not None and holders else {}
        held_in = {zones[n] for n in holders if n in zones}
        return web.json_response(
            [{"Host": n, "Score": score(holders.get(n), zone_holds=zones.get(n) in held_in)} for n in _node_names(args)]
        )

    async def _holders(self, ref: ModelRef | None) -> dict[str, Holding]:
        if ref is None:
            return {}
        if self._locator is not None:
            return await self._locator.holders(ref)
        local = self._status.of(ref)
        if local.state is not JobState.READY and not local.in_flight:
            return {}
        return {
            self._node_id: Holding(
                node_id=self._node_id, state=local.state, bytes_done=local.bytes_done, bytes_total=local.bytes_total
            )
        }


def score(holding: Holding | None, *, zone_holds: bool = False) -> int:
    """10 for a ready copy, 1..9 by progress for one in flight; for none, 1 when another node of
    this node's zone holds a copy (``zone_holds``), else 0."""
    if holding is None:
        return 1 if zone_holds else 0
    if holding.ready:
        return 10
    frac = holding.bytes_done / holding.bytes_total if holding.bytes_total else 0.0
    return max(1, min(9, int(frac * 9)))


def _pod_model(pod: Any) -> tuple[ModelRef | None, bool]:
    """(the model the pod names, whether it requires a ready copy) from ExtenderArgs' Pod."""
    meta = (pod or {}).get("metadata") or {} if isinstance(pod, dict) else {}
    annotations = meta.get("annotations") or {} if isinstance(meta, dict) else {}
    if not isinstance(annotations, dict):
        return None, False
    model = annotations.get(MODEL_ANNOTATION)
    if not model:
        return None, False
    if not isinstance(model, str):
        raise RequestError(f"the annotation {MODEL_ANNOTATION} must be a string")
    require = str(annotations.get(REQUIRE_LOCAL_ANNOTATION, "")).lower() == "true"
    return ModelRef.parse(model), require


def _node_names(args: dict[str, Any]) -> list[str]:
    names = args.get("NodeNames")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RequestError("'NodeNames' must be a list of node names")
        return names
    nodes = args.get("Nodes")
    items = (nodes.get("items") or []) if isinstance(nodes, dict) else [] if nodes is None else None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("metadata"), dict) and isinstance(i["metadata"].get("name"), str)
        for i in items
    ):
        raise RequestError("'Nodes' must be a NodeList whose items have metadata.name")
    return [i["metadata"]["name"] for i in items]
