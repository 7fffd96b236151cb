"""The Kubernetes scheduler extender routes (``/v1/k8s/filter``, ``/v1/k8s/prioritize``).

Bodies are ExtenderArgs as kube-scheduler marshals them (Go field names, no json tags; the list it
does not use is ``null``): a Pod whose annotation ``cached.io/model`` names the model, and the
candidates either as ``NodeNames`` (a node-cache-capable extender) or as a NodeList in ``Nodes``.
Node names are node ids. The answer is cluster-wide whichever node is asked: a ready copy scores
10, a copy still downloading 1..9, no copy 0; filter lets every node through unless the pod says
``cached.io/require-local: "true"``, then only ready holders, with a reason for each node left out.
A body that is not ExtenderArgs is a 400, never a 500.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient
from cached.daemon import Daemon
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

TOKEN = "extender-cluster-token-0123456789"
MIB = 1 << 20
SIZE = 8 * MIB
FAST = {
    "peer.gossip_interval_s": 0.2,
    "peer.suspect_after_s": 1.0,
    "peer.dead_after_s": 2.0,
    "store.piece_size_bytes": "1M",
}
CANDIDATES = ["a", "b", "c", "elsewhere"]  # "elsewhere": a node the scheduler knows and the cache does not
SLOW_BPS = 256 * 1024


def pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A v1.Pod as the scheduler sends it (trimmed, but with the fields real pods carry)."""
    meta: dict[str, Any] = {
        "name": "vllm-0",
        "namespace": "inference",
        "uid": "5c1f0d7e-8f2a-4d34-9d1e-0e6f5b7a9c11",
        "labels": {"app": "vllm"},
        "creationTimestamp": None,
    }
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "metadata": meta,
        "spec": {
            "containers": [{"name": "server", "image": "vllm/vllm-openai:latest", "resources": {}}],
            "schedulerName": "default-scheduler",
        },
        "status": {"phase": "Pending"},
    }


def node_item(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}, "creationTimestamp": None},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {"allocatable": {"cpu": "8", "memory": "32Gi"}, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def by_names(p: dict[str, Any], names: list[str] = CANDIDATES) -> dict[str, Any]:
    return {"Pod": p, "Nodes": None, "NodeNames": names}


def by_nodes(p: dict[str, Any], names: list[str] = CANDIDATES) -> dict[str, Any]:
    return {"Pod": p, "Nodes": {"metadata": {}, "items": [node_item(n) for n in names]}, "NodeNames": None}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def call(d: Daemon, method: str, path: str, body: dict[str, Any] | None = None, **params: str) -> Any:
    async with ApiClient(d.api_address) as api:
        return await api.request(method, path, body=body, params=params or None)


async def post_raw(d: Daemon, path: str, data: bytes) -> tuple[int, Any]:
    async with ApiClient(d.api_address) as api:
        assert api._session is not None
        async with api._session.post(api.base + path, data=data, headers={"Content-Type": "application/json"}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None


def scores(answer: list[dict[str, Any]]) -> dict[str, int]:
    assert all(set(h) == {"Host", "Score"} and isinstance(h["Score"], int) and 0 <= h["Score"] <= 10 for h in answer), (
        answer
    )
    return {h["Host"]: h["Score"] for h in answer}


@contextlib.asynccontextmanager
async def three_nodes(tmp_path: Path, token_file: Path) -> AsyncIterator[dict[str, Daemon]]:
    flags = {"cluster.token_file": str(token_file), **FAST}
    async with contextlib.AsyncExitStack() as stack:
        # a serves its peers slowly, so a copy b takes from it (and from the slowed origin) stays
        # partial for as long as the test looks at it.
        a = await stack.enter_async_context(
            running_daemon(tmp_path / "a", node_id="a", **flags, **{"peer.serve_rate_bps": SLOW_BPS})
        )
        nodes = {"a": a}
        for n in "bc":
            nodes[n] = await stack.enter_async_context(
                running_daemon(tmp_path / n, node_id=n, **flags, **{"peer.seeds": [a.peer_address]})
            )

        def all_see_all() -> bool:
            return all(
                {m.info.node_id for m in d.gossip.membership.alive()} == set(nodes) - {name}  # type: ignore[union-attr]
                for name, d in nodes.items()
            )

        await wait_until(all_see_all, timeout_s=15, what="three nodes alive in every view")
        yield nodes


async def test_extender_scores_and_filters_by_where_the_model_is(tmp_path: Path, token_file: Path) -> None:
    write_random_file(tmp_path / "origin" / "model.gguf", SIZE, seed=21)
    async with Origin(tmp_path / "origin") as origin, three_nodes(tmp_path, token_file) as nodes:
        ref = origin.file_url("model.gguf")
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        assert (await call(a, "POST", "/v1/prefetch", {"ref": ref, "wait": True}))["state"] == "ready"

        # b starts fetching while both its sources are slow: a partial holder.
        origin.faults.rate_bps = SLOW_BPS
        await call(b, "POST", "/v1/prefetch", {"ref": ref})

        async def b_partial() -> dict[str, Any] | None:
            located = {n["node_id"]: n for n in (await call(c, "GET", "/v1/locate", ref=ref))["nodes"]}
            got = located.get("b")
            return got if got and got["state"] in ("queued", "fetching") and "a" in located else None

        partial = await wait_until(b_partial, timeout_s=10, what="b listed as fetching in locate")
        assert partial["bytes_done"] < SIZE

        # The extender answers from gossip (no request to peers), a round behind locate: wait
        # until c's holdings view has a's copy and b's partial, as three_nodes waits for views.
        def c_sees_both() -> bool:
            view = c.gossip.view  # type: ignore[union-attr]
            b_holds = view.get("b")
            return [n for n, _ in view.with_ref(ref)] == ["a"] and b_holds is not None and bool(b_holds.partials)

        await wait_until(c_sees_both, timeout_s=10, what="c's holdings view shows a's copy and b's partial")

        with_model = pod({"cached.io/model": ref})
        required = pod({"cached.io/model": ref, "cached.io/require-local": "true"})

        # prioritize, asked of c (which holds nothing): the answer is the cluster's.
        for args in (by_names(with_model), by_nodes(with_model)):
            answer = await call(c, "POST", "/v1/k8s/prioritize", args)
            assert [h["Host"] for h in answer] == CANDIDATES, "one entry per candidate, in order"
            got = scores(answer)
            assert got["a"] == 10
            assert 1 <= got["b"] <= 9, got
            assert got["c"] == 0 and got["elsewhere"] == 0
        # Asked of another node, the same scores.
        assert scores(await call(a, "POST", "/v1/k8s/prioritize", by_names(with_model)))["a"] == 10

        # filter without require-local: every node passes, prioritize does the steering.
        answer = await call(c, "POST", "/v1/k8s/filter", by_names(with_model))
        assert answer["NodeNames"] == CANDIDATES and not answer["FailedNodes"] and not answer["Error"], answer
        answer = await call(c, "POST", "/v1/k8s/filter", by_nodes(with_model))
        assert answer["Nodes"]["items"] == [node_item(n) for n in CANDIDATES] and not answer["FailedNodes"], answer
        assert not answer["NodeNames"]

        # filter with require-local: only ready holders; the partial one is not ready yet.
        answer = await call(c, "POST", "/v1/k8s/filter", by_names(required))
        assert answer["NodeNames"] == ["a"], answer
        assert set(answer["FailedNodes"]) == {"b", "c", "elsewhere"}
        assert all(isinstance(why, str) and why for why in answer["FailedNodes"].values()), answer
        assert not answer["Error"]
        answer = await call(c, "POST", "/v1/k8s/filter", by_nodes(required))
        assert answer["Nodes"]["items"] == [node_item("a")], "the NodeList comes back filtered, objects intact"
        assert set(answer["FailedNodes"]) == {"b", "c", "elsewhere"}
        assert not answer["NodeNames"] and not answer["Error"]

        # A pod that names no model: nothing to steer by.
        for p in (pod(), pod({"team": "search"}), pod({"cached.io/require-local": "true"})):
            assert set(scores(await call(c, "POST", "/v1/k8s/prioritize", by_names(p))).values()) == {0}
            answer = await call(c, "POST", "/v1/k8s/filter", by_names(p))
            assert answer["NodeNames"] == CANDIDATES and not answer["FailedNodes"], answer
            answer = await call(c, "POST", "/v1/k8s/filter", by_nodes(p))
            assert [i["metadata"]["name"] for i in answer["Nodes"]["items"]] == CANDIDATES
        # A model nobody holds: every node scores 0, and require-local lets none through.
        nowhere = origin.file_url("not-cached.gguf")
        assert set(
            scores(await call(c, "POST", "/v1/k8s/prioritize", by_names(pod({"cached.io/model": nowhere})))).values()
        ) == {0}
        answer = await call(
            c, "POST", "/v1/k8s/filter", by_names(pod({"cached.io/model": nowhere, "cached.io/require-local": "true"}))
        )
        assert answer["NodeNames"] == [] and set(answer["FailedNodes"]) == set(CANDIDATES)

        # Stop the slow transfer now rather than at shutdown.
        await call(b, "POST", "/v1/evict", {"ref": ref})
        assert (await call(b, "GET", "/v1/models/status", ref=ref))["state"] == "absent"


MALFORMED = [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"", id="empty"),
    pytest.param(b"[]", id="an-array"),
    pytest.param(b'"ExtenderArgs"', id="a-string"),
    pytest.param(json.dumps(by_names(pod({"cached.io/model": "not a ref"}))).encode(), id="annotation-not-a-ref"),
    pytest.param(json.dumps(by_names(pod({"cached.io/model": 7}))).encode(), id="annotation-a-number"),  # type: ignore[dict-item]
    pytest.param(
        json.dumps({"Pod": pod(), "Nodes": {"items": [1, 2]}, "NodeNames": None}).encode(), id="items-not-objects"
    ),
    pytest.param(
        json.dumps({"Pod": pod(), "Nodes": {"items": "a,b"}, "NodeNames": None}).encode(), id="items-a-string"
    ),
    pytest.param(
        json.dumps({"Pod": pod(), "Nodes": {"items": [{"metadata": "a"}]}, "NodeNames": None}).encode(),
        id="item-metadata-a-string",
    ),
    pytest.param(json.dumps({"Pod": pod(), "Nodes": None, "NodeNames": "a"}).encode(), id="nodenames-a-string"),
    pytest.param(
        json.dumps({"Pod": pod(), "Nodes": None, "NodeNames": [1, None]}).encode(), id="nodenames-not-strings"
    ),
]


@pytest.mark.parametrize("body", MALFORMED)
async def test_a_body_that_is_not_extender_args_is_400(tmp_path: Path, token_file: Path, body: bytes) -> None:
    async with running_daemon(tmp_path / "a", node_id="a", **{"cluster.token_file": str(token_file), **FAST}) as d:
        for verb in ("filter", "prioritize"):
            status, answer = await post_raw(d, f"/v1/k8s/{verb}", body)
            assert status == 400, (verb, status, answer)
            assert isinstance(answer, dict) and answer["error"] in ("bad_request", "bad_ref") and answer["message"], (
                answer
            )
