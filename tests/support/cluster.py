"""A loopback cluster for tests: token file, node flags, daemons, and what to read off them.

Shared by the P2P, fault, bit-rot and disk tests (it started life in test_p2p.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cached.api.client import ApiClient
from cached.daemon import Daemon
from tests.support.node import running_daemon
from tests.support.wait import wait_until

TOKEN = "p2p-transfer-cluster-token-0123456789"
MIB = 1 << 20
FAST = {"peer.gossip_interval_s": 0.2, "peer.suspect_after_s": 1.0, "peer.dead_after_s": 2.5}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def node_flags(token_file: Path, *seeds: Daemon, piece: str = "1M", **extra: Any) -> dict[str, Any]:
    return {
        "cluster.token_file": str(token_file),
        **FAST,
        "store.piece_size_bytes": piece,
        "peer.seeds": [s.peer_address for s in seeds],
        **extra,
    }


async def cluster(
    stack: contextlib.AsyncExitStack, tmp_path: Path, token_file: Path, names: str, **extra: Any
) -> dict[str, Daemon]:
    """One node per letter of ``names`` (stopped with ``stack``), all seeded from the first;
    returns once every node lists every other alive."""
    first = names[0]
    nodes = {
        first: await stack.enter_async_context(
            running_daemon(tmp_path / first, node_id=first, **node_flags(token_file, **extra))
        )
    }
    for n in names[1:]:
        nodes[n] = await stack.enter_async_context(
            running_daemon(tmp_path / n, node_id=n, **node_flags(token_file, nodes[first], **extra))
        )
    await wait_until(lambda: all_see_all(nodes), timeout_s=15, what=f"nodes {names} all alive in every view")
    return nodes


def all_see_all(nodes: dict[str, Daemon]) -> bool:
    for name, d in nodes.items():
        assert d.gossip is not None
        alive = {m.info.node_id for m in d.gossip.membership.alive()}
        if alive != set(nodes) - {name}:
            return False
    return True


async def prefetch(d: Daemon, ref: str) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    assert model["state"] == "ready", model
    return model


async def metric(d: Daemon | str, name: str, **labels: str) -> float:
    """One sample of a node's ``/metrics`` (a daemon, or an API address), as a scraper reads it."""
    async with ApiClient(d if isinstance(d, str) else d.api_address) as api:
        assert api._session is not None
        async with api._session.get(api.base + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def sha256_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root`` (run in a thread)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(MIB):
                    h.update(chunk)
            out[str(p.relative_to(root))] = h.hexdigest()
    return out


async def tree_digests(root: Path) -> dict[str, str]:
    return await asyncio.to_thread(sha256_tree, root)


async def view_digests(model: dict[str, Any]) -> dict[str, str]:
    """What a launcher reads: the files under the model's path."""
    return await tree_digests(Path(model["path"]))


def knows_ref_from(d: Daemon, canonical: str, holders: set[str]) -> bool:
    """``d``'s gossip view lists every node of ``holders`` with ``canonical`` ready."""
    assert d.gossip is not None
    return {n for n, _ in d.gossip.view.with_ref(canonical)} >= holders


def blob_holders(d: Daemon, blob_hex: str) -> set[str]:
    assert d.gossip is not None
    return set(d.gossip.view.with_blob(blob_hex))


def blobs_of(d: Daemon, model: dict[str, Any]) -> dict[str, str]:
    manifest = d.store.manifest(model["manifest"].removeprefix("blake3:"))
    assert manifest is not None
    return {f.path: f.blob.hex for f in manifest.files}


def assert_from_peers(model: dict[str, Any], size: int) -> None:
    assert model["bytes_total"] == model["bytes_done"] == size
    assert model["sources"] == {"peer": size, "origin": 0}, model["sources"]
