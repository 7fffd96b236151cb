"""The peer API's ``POST /p2p/v1/wants`` (origin single-flight) on a real daemon, spoken by hand.

Signed like every peer route (unsigned: 401, nothing recorded); a malformed body is a 400 naming
the problem and counted; a well-formed one is recorded as it is answered: a node that later
starts wanting the same file counts the sender among the wanters without any gossip round, and a
sender that says it no longer wants it is dropped. A node that holds the file but is not fetching
it answers "not wanting" with the pieces it holds, so the asker takes them from it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cached.api.client import ApiClient
from cached.daemon import Daemon
from tests.support.cluster import metric
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.peerauth import signed

TOKEN = "peer-wants-cluster-token-0123456789"
KEY = "ab" * 32


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN)
    return path


@contextlib.asynccontextmanager
async def server(tmp_path: Path, token_file: Path) -> AsyncIterator[Daemon]:
    async with running_daemon(
        tmp_path / "server",
        node_id="server",
        **{"cluster.token_file": str(token_file), "store.piece_size_bytes": "64K"},
    ) as d:
        yield d


async def post(d: Daemon, body: Any, *, sign: bool = True, node_id: str = "asker") -> tuple[int, Any]:
    url = f"http://{d.peer_address}/p2p/v1/wants"
    data = json.dumps(body).encode()
    headers = signed(TOKEN, "POST", url, data, node_id=node_id) if sign else {}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=data, headers={**headers, "Content-Type": "application/json"}) as r,
    ):
        return r.status, await r.json()


def want(key: str = KEY, *, on: bool = True, claimed: list[int] | None = None) -> dict[str, Any]:
    return {"key": key, "want": on, "size": 1 << 20, "piece_size": 1 << 16, "claimed": claimed or []}


async def test_a_want_is_recorded_as_it_is_answered_and_a_withdrawal_drops_it(tmp_path: Path, token_file: Path) -> None:
    async with server(tmp_path, token_file) as d:
        status, answer = await post(d, want(claimed=[3, 4]))
        assert status == 200
        assert answer == {"key": KEY, "wants": False, "claimed": []}

        # The server starts wanting the same file: the asker is already counted, with its claims.
        w = d.wants.register(KEY, 1 << 20, 1 << 16, held=[7])
        assert set(w.others) == {"asker"} and w.others["asker"].claimed == {3, 4}
        status, answer = await post(d, want(), node_id="other")
        assert answer == {"key": KEY, "wants": True, "claimed": [7]}
        assert set(w.others) == {"asker", "other"}

        status, _ = await post(d, want(on=False, claimed=list(range(16))))
        assert status == 200
        assert set(w.others) == {"other"}
        assert w.holders["asker"] == frozenset(range(16)), "a leaver's pieces are known to be held"


async def test_unsigned_or_malformed_wants_are_refused_and_nothing_is_recorded(
    tmp_path: Path, token_file: Path
) -> None:
    async with server(tmp_path, token_file) as d:
        status, body = await post(d, want(), sign=False)
        assert status == 401 and body["error"] == "unauthorized"
        before = await metric(d, "cached_gossip_errors_total", kind="malformed")
        for bad, word in [
            ({"key": "nothex", "want": True, "size": 1, "piece_size": 1}, "key"),
            ({**want(), "want": "yes"}, "want"),
            ({**want(), "size": -1}, "size"),
            ({**want(), "claimed": [-1]}, "claimed"),
            ([1, 2], "object"),
        ]:
            status, body = await post(d, bad)
            assert status == 400 and word in body["message"], (bad, body)
        assert await metric(d, "cached_gossip_errors_total", kind="malformed") == before + 5
        w = d.wants.register(KEY, 1 << 20, 1 << 16, held=[])
        assert w.others == {}, "a refused message recorded a wanter"


async def test_a_node_holding_the_file_answers_with_its_pieces(tmp_path: Path, token_file: Path) -> None:
    size = 256 * 1024 + 5
    src = write_random_file(tmp_path / "origin" / "w.bin", size, seed=61)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(src.parent))
        d = await stack.enter_async_context(server(tmp_path, token_file))
        async with ApiClient(d.api_address) as api:
            model = await api.request("POST", "/v1/prefetch", body={"ref": origin.file_url("w.bin"), "wait": True})
        assert model["state"] == "ready"
        (key,) = d.holdings.state.blob_keys  # the origin file's identity key, as gossip announces it
        status, answer = await post(d, {"key": key, "want": True, "size": size, "piece_size": 1 << 16})
        assert status == 200
        assert answer == {"key": key, "wants": False, "claimed": [0, 1, 2, 3, 4]}
