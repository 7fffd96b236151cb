"""Membership and gossip between real daemons on 127.0.0.1 (static seeds, mDNS off).

Three nodes seeded from one find each other; the local API (``/v1/peers``, ``/v1/node``) and
``/metrics`` say so; a stopped node turns suspect then dead in the others' view and comes back
alive, with a new incarnation, when restarted on the same cache. A node without the cluster token
is refused (401, counted on both sides) and never listed; so is a node of another cluster (the
cluster name is part of the key). A fake peer that answers garbage, signed, is counted and never
stops gossip.
Holdings travel too: a blob one node fetched shows up in another's gossip view within a few rounds.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from cached.api.client import ApiClient
from cached.daemon import Daemon
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.peerauth import sign_answers
from tests.support.wait import wait_until

TOKEN = "integration-cluster-token-0123456789"
FAST = {"peer.gossip_interval_s": 0.2, "peer.suspect_after_s": 1.0, "peer.dead_after_s": 2.5}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def node_flags(token_file: Path, *seeds: Daemon, **extra: Any) -> dict[str, Any]:
    return {"cluster.token_file": str(token_file), **FAST, "peer.seeds": [s.peer_address for s in seeds], **extra}


async def api_get(d: Daemon, path: str) -> Any:
    async with ApiClient(d.api_address) as api:
        return await api.request("GET", path)


async def peer_states(d: Daemon) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in await api_get(d, "/v1/peers")}


async def metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the node's ``/metrics``, keyed by (name, sorted labels)."""
    async with ApiClient(d.api_address) as api:
        assert api._session is not None
        async with api._session.get(api.base + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def metric(d: Daemon, name: str, **labels: str) -> float:
    return (await metrics(d)).get((name, tuple(sorted(labels.items()))), 0.0)


async def sees_alive(d: Daemon, others: set[str]) -> bool:
    states = await peer_states(d)
    return set(states) == others and all(states[n] == "alive" for n in others)


async def test_three_nodes_find_each_other_notice_a_death_and_a_return(tmp_path: Path, token_file: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file)))
        b = await stack.enter_async_context(running_daemon(tmp_path / "b", node_id="b", **node_flags(token_file, a)))
        c_stack = contextlib.AsyncExitStack()
        stack.push_async_callback(c_stack.aclose)
        c = await c_stack.enter_async_context(running_daemon(tmp_path / "c", node_id="c", **node_flags(token_file, a)))
        nodes = {"a": a, "b": b, "c": c}

        async def all_see_all() -> bool:
            return all([await sees_alive(d, set(nodes) - {name}) for name, d in nodes.items()])

        await wait_until(all_see_all, timeout_s=15, what="every node lists the other two alive")
        for name, d in nodes.items():
            listed = await api_get(d, "/v1/peers")
            assert {p["node_id"]: p["address"] for p in listed} == {
                n: o.peer_address for n, o in nodes.items() if n != name
            }
            assert all({"node_id", "address", "state"} <= set(p) for p in listed), listed
            node = await api_get(d, "/v1/node")
            assert node["node_id"] == name
            assert {p["node_id"]: p["state"] for p in node["peers"]} == {n: "alive" for n in nodes if n != name}
        # The gauge is refreshed on every merge and every gossip round.
        for d in nodes.values():

            async def two_alive(d: Daemon = d) -> bool:
                return await metric(d, "cached_peers", state="alive") == 2

            await wait_until(two_alive, timeout_s=5, what='cached_peers{state="alive"} == 2')
            got = await metrics(d)
            assert got[("cached_peers", (("state", "suspect"),))] == got[("cached_peers", (("state", "dead"),))] == 0

        # c stops: suspect, then dead, in both other views.
        old_incarnation = {p["node_id"]: p for p in await api_get(a, "/v1/peers")}["c"]["incarnation"]
        await c_stack.aclose()
        seen: dict[str, list[str]] = {"a": [], "b": []}

        async def c_dead_everywhere() -> bool:
            for name, d in (("a", a), ("b", b)):
                state = (await peer_states(d)).get("c", "absent")
                if not seen[name] or seen[name][-1] != state:
                    seen[name].append(state)
            return all(s[-1] == "dead" for s in seen.values())

        await wait_until(c_dead_everywhere, timeout_s=15, what="c dead in a's and b's view")
        for name, states in seen.items():
            assert states[-2:] == ["suspect", "dead"], f"{name} saw c go {states}"
            assert "absent" not in states, f"{name} forgot c too early: {states}"
        assert await metric(a, "cached_peers", state="dead") == 1
        assert await sees_alive(a, {"b", "c"}) is False and (await peer_states(a))["b"] == "alive"

        # c restarts on the same cache dir: a new incarnation, alive again everywhere.
        c = await c_stack.enter_async_context(running_daemon(tmp_path / "c", node_id="c", **node_flags(token_file, a)))
        nodes["c"] = c
        await wait_until(all_see_all, timeout_s=15, what="c alive again in every view")
        for d in (a, b):
            entry = {p["node_id"]: p for p in await api_get(d, "/v1/peers")}["c"]
            assert entry["incarnation"] > old_incarnation
            assert entry["address"] == c.peer_address


async def test_a_wrong_token_is_refused_and_another_cluster_ignored(tmp_path: Path, token_file: Path) -> None:
    wrong_token = tmp_path / "wrong.token"
    wrong_token.write_text("not-the-cluster-token-at-all-9876")
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file)))
        b = await stack.enter_async_context(running_daemon(tmp_path / "b", node_id="b", **node_flags(token_file, a)))
        intruder = await stack.enter_async_context(
            running_daemon(
                tmp_path / "w",
                node_id="intruder",
                **node_flags(token_file, a, b, **{"cluster.token_file": str(wrong_token)}),
            )
        )
        stranger = await stack.enter_async_context(
            running_daemon(tmp_path / "o", node_id="stranger", **node_flags(token_file, a, **{"cluster.name": "other"}))
        )

        async def refused_a_few_times() -> bool:
            return (
                await metric(intruder, "cached_gossip_errors_total", kind="unauthorized") >= 3
                and await metric(a, "cached_peer_auth_failures_total") >= 3
                and await metric(b, "cached_peer_auth_failures_total") >= 1
                # The cluster name is part of the key: another cluster's requests do not verify.
                and await metric(stranger, "cached_gossip_errors_total", kind="unauthorized") >= 3
                and await metric(a, "cached_peer_auth_refused_total", reason="bad_mac") >= 6
            )

        await wait_until(
            refused_a_few_times, timeout_s=15, what="several refused gossip rounds from the intruder and the stranger"
        )
        await wait_until(lambda: sees_alive(a, {"b"}), timeout_s=10, what="a sees b")
        await wait_until(lambda: sees_alive(b, {"a"}), timeout_s=10, what="b sees a")
        assert await peer_states(a) == {"b": "alive"}, "neither the intruder nor the stranger is listed"
        assert await peer_states(b) == {"a": "alive"}
        assert await peer_states(intruder) == {}, "a refused node learns nothing of the cluster"
        assert await peer_states(stranger) == {}
        assert await metric(a, "cached_gossip_errors_total", kind="unauthorized") == 0, (
            "a's own gossip is never refused"
        )


async def test_holdings_reach_other_nodes_through_gossip(tmp_path: Path, token_file: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.gguf", 300 * 1024 + 17, seed=11)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        a = await stack.enter_async_context(
            running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file, **{"store.piece_size_bytes": "64K"}))
        )
        b = await stack.enter_async_context(running_daemon(tmp_path / "b", node_id="b", **node_flags(token_file, a)))
        await wait_until(lambda: sees_alive(b, {"a"}), timeout_s=10, what="b sees a")
        assert b.gossip is not None

        ref = origin.file_url("model.gguf")
        async with ApiClient(a.api_address) as api:
            model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert model["state"] == "ready"
        digest = model["manifest"].removeprefix("blake3:")
        manifest = a.store.manifest(digest)
        assert manifest is not None
        blob = manifest.files[0].blob.hex
        rounds_then = b.gossip.rounds

        await wait_until(
            lambda: b.gossip.view.with_blob(blob) == ["a"], timeout_s=10, what="b's view lists a as holder of the blob"
        )
        assert b.gossip.rounds - rounds_then <= 5, f"took {b.gossip.rounds - rounds_then} of b's gossip rounds"
        assert b.gossip.view.with_ref(model["ref"]) == [("a", digest)]
        assert not b.gossip.view.with_partial(blob), "no partial left once the blob is complete"
        assert a.gossip is not None and a.gossip.view.with_blob(blob) == [], "b holds nothing"


# --- a peer that answers garbage -----------------------------------------------------------------

FAKE_ID = "garbage-peer"
INF = "1e400"  # valid JSON; Python reads it as float('inf')
DEEP = "[" * 100_000 + "]" * 100_000


def fake_member(address: str, holdings_version: int) -> str:
    return json.dumps(
        {
            "node_id": FAKE_ID,
            "address": address,
            "cluster": "default",
            "incarnation": 1,
            "heartbeat": int(time.monotonic() * 10),
            "holdings_version": holdings_version,
        }
    )


GARBAGE_ANSWERS = {
    # (gossip answer, holdings answer); {me} is the fake's own, well-formed member entry
    "gossip-not-object": ("[1, 2, 3]", None),
    "gossip-members-not-list": ('{"cluster": "default", "members": 5}', None),
    "gossip-entry-inf-incarnation": (
        '{"cluster": "default", "members": [{me}, {"node_id": "x", "address": "h:1", "cluster": "default", "incarnation": '
        + INF
        + "}]}",
        None,
    ),
    "gossip-deep-nesting": ('{"cluster": "default", "members": ' + DEEP + "}", None),
    "holdings-not-object": ('{"cluster": "default", "members": [{me}]}', "[]"),
    "holdings-inf-version": (
        '{"cluster": "default", "members": [{me}]}',
        '{"version": 1, "snapshot": {"version": ' + INF + "}}",
    ),
    "holdings-inf-size": (
        '{"cluster": "default", "members": [{me}]}',
        '{"version": 1, "snapshot": {"version": 1, "blobs": {"ab": ' + INF + "}}}",
    ),
    "holdings-deep-nesting": ('{"cluster": "default", "members": [{me}]}', '{"version": 1, "snapshot": ' + DEEP + "}"),
}


@pytest.mark.parametrize("answers", list(GARBAGE_ANSWERS.values()), ids=list(GARBAGE_ANSWERS))
async def test_garbage_from_a_peer_is_counted_and_never_stops_gossip(
    tmp_path: Path, token_file: Path, answers: tuple[str, str | None]
) -> None:
    """An authenticated peer answering nonsense costs one failed exchange, never the gossip loop."""
    gossip_answer, holdings_answer = answers
    hits = {"gossip": 0, "holdings": 0}

    async def on_gossip(request: web.Request) -> web.Response:
        hits["gossip"] += 1
        me = fake_member(f"127.0.0.1:{request.url.port}", 1 if holdings_answer else 0)
        return web.Response(text=gossip_answer.replace("{me}", me), content_type="application/json")

    async def on_holdings(request: web.Request) -> web.Response:
        hits["holdings"] += 1
        return web.Response(text=holdings_answer or "{}", content_type="application/json")

    app = web.Application()
    sign_answers(app, TOKEN)  # a token holder: its answers verify, what they say is nonsense
    app.router.add_post("/p2p/v1/gossip", on_gossip)
    app.router.add_get("/p2p/v1/holdings", on_holdings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake = f"127.0.0.1:{runner.addresses[0][1]}"
        async with running_daemon(tmp_path / "a", node_id="a", **node_flags(token_file, **{"peer.seeds": [fake]})) as a:
            assert a.gossip is not None
            want = "holdings" if holdings_answer else "gossip"
            await wait_until(lambda: hits[want] >= 3, timeout_s=10, what=f"the daemon keeps asking the peer ({want})")
            rounds = a.gossip.rounds
            await wait_until(lambda: a.gossip.rounds >= rounds + 2, timeout_s=10, what="gossip rounds go on")
            errors = {
                labels: v
                for (name, labels), v in (await metrics(a)).items()
                if name == "cached_gossip_errors_total" and v
            }
            assert errors, (
                "each refused answer is counted (malformed, or holdings/unreachable when the JSON itself is bad)"
            )
            assert "x" not in await peer_states(a)
            if holdings_answer:
                assert a.gossip.view.get(FAKE_ID) is None or a.gossip.view.get(FAKE_ID).version == 0
    finally:
        await runner.cleanup()
