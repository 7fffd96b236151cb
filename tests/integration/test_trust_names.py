"""Names come from origins, bytes may come from peers (issue 18, finding 3; the peer half of
"file:// is local").

The attacker M is a real daemon holding the cluster token whose store or memory the test tampers
with in-process, the way a malicious node would: it publishes a forged manifest for
``hf://org/llama`` (other bytes for ``config.json``; or the same metadata over other bytes; or a
``locator`` pointing at the attacker's own server), or gossips catalog entries naming a local file
and an internal URL. The victim V, started with an HF token, must end up with the hub's bytes
(models/ view, hf/ view and its /hf endpoint), never request the attacker's address, never send
the token anywhere but the hub, never fetch the gossiped refs, and count every rejection. With
``cluster.names_from_peers`` on and the hub down, V resolves through an honest peer (the
documented trade-off); with it off, the prefetch fails with a clear origin error. A file:// ref a
node imported is invisible to peers and cannot be replicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import blake3
import pytest
from aiohttp import web

from cached.api.client import ApiClient, ApiError
from cached.cluster import CatalogEntry
from cached.daemon import Daemon
from cached.peers.client import PeerError
from cached.store import Store
from cached.types import BlobId, BlobRemoved, FileEntry, Manifest, ModelRef, piece_span
from tests.support.cluster import MIB, all_see_all, metric, node_flags, prefetch, token_file  # noqa: F401 - token_file is a fixture
from tests.support.hub import Hub, git_blob_sha1, random_bytes
from tests.support.node import test_config as node_config
from tests.support.wait import wait_until

REPO = "org/llama"
REF = f"hf://{REPO}"
HF_TOKEN = "hf_victims_secret_token_0123456789"
CONFIG = b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32}\n'
EVIL = b'{"auto_map": {"AutoModel": "evil.Model"}, "trust_remote_code": true}\n'
WEIGHTS = random_bytes(2 * MIB + 123, seed=18)
PIECE = "256K"


class Recorder:
    """An attacker's HTTP server on 127.0.0.1: records every request (and its headers), answers 404."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs, dict(request.headers)))
        return web.Response(status=404)

    async def __aenter__(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@contextlib.asynccontextmanager
async def hub_with_llama() -> AsyncIterator[Hub]:
    async with Hub(tokens=[HF_TOKEN]) as hub:
        hub.add_repo(REPO, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
        yield hub


def hub_files(hub: Hub) -> dict[str, bytes]:
    return {p: b.data for p, b in hub.repo(REPO).resolve("main").files.items()}


async def start(
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
    name: str,
    token: Path,
    hub: Hub,
    *seeds: Daemon,
    labels: dict[str, str] | None = None,
    **extra: Any,
) -> Daemon:
    flags = {"node_id": name, "origins.hf.endpoint": hub.url, **node_flags(token, *seeds, piece=PIECE), **extra}
    cfg = node_config(tmp_path / name, **flags)
    if labels:
        cfg = dataclasses.replace(cfg, labels=labels)
    return await stack.enter_async_context(Daemon(cfg))


def victim_flags(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "hf-token"
    path.write_text(HF_TOKEN + "\n")
    path.chmod(0o600)
    return {"origins.hf.token_file": str(path)}


async def put_blob(store: Store, data: bytes, piece_size: int) -> BlobId:
    """The attacker writes bytes of its choice into its own store as a blob."""
    key = blake3.blake3(b"forged\0" + data).hexdigest()
    async with store.partial(key=key, size=len(data), piece_size=piece_size, identity_key=key) as partial:
        for i in range(partial.pieces):
            off, length = piece_span(i, len(data), piece_size)
            await asyncio.to_thread(partial.write_piece_sync, i, data[off : off + length])
        return await store.finalize(partial)


async def forge(
    m: Daemon, config: bytes, origin: dict[str, str] | None = None, weights_locator: str | None = None
) -> tuple[str, BlobId]:
    """M republishes REF with ``config`` as config.json (its own manifest, committed through its
    Store, so its holdings advertise it). Returns (the forged manifest's digest, the forged blob)."""
    ref = ModelRef.parse(REF)
    real = m.store.model(ref)
    assert real is not None
    blob = await put_blob(m.store, config, real.manifest.piece_size)
    files = []
    for f in real.manifest.files:
        if f.path == "config.json":
            sha1 = git_blob_sha1(config)
            meta = (
                origin
                if origin is not None
                else {"identity": f"gitblob|{sha1}|{len(config)}", "locator": f.origin["locator"], "git_sha1": sha1}
            )
            f = FileEntry(path=f.path, size=len(config), blob=blob, origin=meta)
        elif weights_locator is not None:
            f = dataclasses.replace(f, origin={**f.origin, "locator": weights_locator})
        files.append(f)
    forged = Manifest(
        ref=real.manifest.ref, revision=real.manifest.revision, piece_size=real.manifest.piece_size, files=tuple(files)
    )
    await m.store.commit_model(ref, forged)
    return forged.digest, blob


async def views(v: Daemon, model: dict[str, Any]) -> list[dict[str, bytes]]:
    """config.json and the weights as a launcher reads them: models/ view, hf/ view, /hf endpoint."""
    out = []
    for root in (Path(model["path"]), Path(model["snapshot_path"])):
        out.append({p: (root / p).read_bytes() for p in ("config.json", "model.safetensors")})
    got = {}
    async with aiohttp.ClientSession() as http:
        for p in ("config.json", "model.safetensors"):
            async with http.get(f"{v.api_address}/hf/{REPO}/resolve/main/{p}") as r:
                assert r.status == 200, (p, r.status)
                got[p] = await r.read()
    out.append(got)
    return out


def advertises(v: Daemon, node: str, digest: str) -> bool:
    assert v.gossip is not None
    return (node, digest) in v.gossip.view.with_ref(ModelRef.parse(REF).canonical)


# --- (a) a forged manifest does not rewrite the model -----------------------------------------------


@pytest.mark.parametrize("lie", ["other-file", "same-metadata"])
async def test_a_token_holders_forged_manifest_does_not_rewrite_the_model(
    tmp_path: Path, token_file: Path, lie: str
) -> None:
    """``other-file``: M's manifest names another config.json (its own size and sha1); V must see
    it disagrees with the hub's listing. ``same-metadata``: M copies the hub's size, sha1 and
    identity for config.json but points at its own bytes of the same size; V must catch it by the
    hub's checksum over what the peer sent and fetch config.json again from the hub."""
    evil = EVIL if lie == "other-file" else EVIL.ljust(len(CONFIG) - 1, b" ") + b"\n"
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(hub_with_llama())
        want = hub_files(hub)
        m = await start(stack, tmp_path, "m", token_file, hub)
        await prefetch(m, REF)
        real = m.store.model(ModelRef.parse(REF))
        assert real is not None
        config_entry = next(f for f in real.manifest.files if f.path == "config.json")
        digest, _ = await forge(m, evil, origin=dict(config_entry.origin) if lie == "same-metadata" else None)
        v = await start(stack, tmp_path, "v", token_file, hub, m, **victim_flags(tmp_path))
        await wait_until(lambda: all_see_all({"m": m, "v": v}), timeout_s=15, what="m and v see each other")
        await wait_until(lambda: advertises(v, "m", digest), timeout_s=10, what="v learns m's forged manifest")

        model = await prefetch(v, REF)
        for seen in await views(v, model):
            assert seen == {p: want[p] for p in seen}, "the victim serves the hub's bytes, not the peer's"
        assert model["sources"]["peer"] > 0, "the weights, which M holds truly, still came from the peer"
        assert model["manifest"] != f"blake3:{digest}"
        if lie == "other-file":
            assert await metric(v, "cached_peer_manifest_rejected_total") == 1
        else:
            assert await metric(v, "cached_peer_content_rejected_total") == 1


# --- (b) a peer's locator never gets the token ------------------------------------------------------


async def test_a_forged_locator_is_never_requested_and_the_token_stays_with_the_hub(
    tmp_path: Path, token_file: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(hub_with_llama())
        want = hub_files(hub)
        rec = await stack.enter_async_context(Recorder())
        m = await start(stack, tmp_path, "m", token_file, hub)
        await prefetch(m, REF)
        sha1 = git_blob_sha1(EVIL)
        steal = f"{rec.url}/steal/config.json"
        meta = {"identity": f"gitblob|{sha1}|{len(EVIL)}", "locator": steal, "git_sha1": sha1}
        digest, blob = await forge(m, EVIL, origin=meta, weights_locator=f"{rec.url}/steal/weights")
        # M keeps the forged config.json to itself, so a victim that believed the manifest would
        # read it from "the origin": the address M chose, with the victim's HF token.
        assert m.gossip is not None
        m.gossip.holdings.record(BlobRemoved(blob_hex=blob.hex))
        v = await start(stack, tmp_path, "v", token_file, hub, m, **victim_flags(tmp_path))
        await wait_until(lambda: all_see_all({"m": m, "v": v}), timeout_s=15, what="m and v see each other")
        await wait_until(lambda: advertises(v, "m", digest), timeout_s=10, what="v learns m's forged manifest")

        hub.reset()
        async with ApiClient(v.api_address) as api:
            with contextlib.suppress(ApiError):  # judged below: first where the token went
                await api.request("POST", "/v1/prefetch", body={"ref": REF, "wait": True})
        leaked = [(method, path) for method, path, headers in rec.seen if HF_TOKEN in headers.get("Authorization", "")]
        assert leaked == [], f"the victim sent its HF token to the attacker's address: {leaked}"
        assert rec.seen == [], f"the victim requested the attacker's address: {[(m_, p) for m_, p, _ in rec.seen]}"
        model = await prefetch(v, REF)
        for seen in await views(v, model):
            assert seen == {p: want[p] for p in seen}
        assert hub.counters.auth_requests > 0, "the token is in use, on the hub's own URLs"
        assert hub.counters.cdn_auth_requests == 0
        v_manifest = v.store.manifest(model["manifest"].removeprefix("blake3:"))
        assert v_manifest is not None
        assert all(f.origin["locator"].startswith(f"{hub.url}/{REPO}/resolve/") for f in v_manifest.files)
        assert await metric(v, "cached_peer_manifest_rejected_total") == 1


# --- (c) gossiped catalog entries for local files and internal URLs --------------------------------


async def test_gossiped_catalog_entries_for_a_local_file_or_an_internal_url_are_dropped(
    tmp_path: Path, token_file: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(hub_with_llama())
        rec = await stack.enter_async_context(Recorder())
        m = await start(stack, tmp_path, "m", token_file, hub)
        # Only V matches the entries' labels, so M does not fetch them itself.
        v = await start(stack, tmp_path, "v", token_file, hub, m, labels={"role": "victim"})
        await wait_until(lambda: all_see_all({"m": m, "v": v}), timeout_s=15, what="m and v see each other")
        refs = ["file:///etc/passwd", f"{rec.url}/x.gguf", f"http://localhost:{rec.url.rsplit(':', 1)[1]}/y.gguf"]
        assert m.catalog is not None and v.catalog is not None and v.reconciler is not None
        for r in refs:
            # M's own Catalog.set refuses these; a malicious node writes its memory directly.
            canonical = ModelRef.parse(r).canonical
            m.catalog._entries[canonical] = CatalogEntry(
                ref=canonical, replicas=2, labels={"role": "victim"}, updated_at=time.time(), updated_by="m"
            )

        await wait_until(
            lambda: metric_at_least(v, "cached_catalog_entries_dropped_total", len(refs), reason="local_ref"),
            timeout_s=10,
            what="v drops the gossiped entries",
        )
        passes = v.reconciler.passes
        await wait_until(
            lambda: v.reconciler is not None and v.reconciler.passes >= passes + 2,
            timeout_s=10,
            what="two reconcile passes",
        )
        assert rec.seen == [], "the victim fetched an internal URL it was told about by gossip"
        for r in refs:
            ref = ModelRef.parse(r)
            assert v.catalog.get(ref.canonical) is None
            assert v.store.model(ref) is None and v.jobs.get(ref) is None
        async with ApiClient(v.api_address) as api:
            assert [e["ref"] for e in await api.request("GET", "/v1/catalog")] == []


async def metric_at_least(d: Daemon, name: str, value: float, **labels: str) -> bool:
    return await metric(d, name, **labels) >= value


# --- (d) names from peers only when asked, and only when the hub is down -----------------------------


async def test_names_from_peers_only_when_enabled_and_the_hub_is_unreachable(tmp_path: Path, token_file: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(hub_with_llama())
        want = hub_files(hub)
        h = await start(stack, tmp_path, "h", token_file, hub)
        model_h = await prefetch(h, REF)
        on = await start(
            stack, tmp_path, "on", token_file, hub, h, **{"cluster.names_from_peers": True, **victim_flags(tmp_path)}
        )
        off = await start(stack, tmp_path, "off", token_file, hub, h, **victim_flags(tmp_path))
        nodes = {"h": h, "on": on, "off": off}
        await wait_until(lambda: all_see_all(nodes), timeout_s=15, what="all see all")
        digest = model_h["manifest"].removeprefix("blake3:")
        for d in (on, off):
            await wait_until(
                lambda d=d: advertises(d, "h", digest), timeout_s=10, what="the honest peer's ref is known"
            )
        await hub.stop()

        # Off (the default): the hub alone names the files; it is down, so the prefetch fails.
        async with ApiClient(off.api_address) as api:
            with pytest.raises(ApiError) as e:
                await api.request("POST", "/v1/prefetch", body={"ref": REF, "wait": True})
        assert (e.value.status, e.value.code) == (502, "origin_error"), (e.value.status, e.value.code, str(e.value))
        assert "cannot connect" in str(e.value), str(e.value)

        # On: the honest peer's manifest names them (the trade-off: every token holder is trusted
        # for names while the hub is unreachable); the addresses are still the hub's.
        model = await prefetch(on, REF)
        for seen in await views_without_endpoint(model):
            assert seen == want
        assert model["sources"] == {"peer": sum(len(b) for b in want.values()), "origin": 0}
        manifest = on.store.manifest(model["manifest"].removeprefix("blake3:"))
        assert manifest is not None
        assert all(
            f.origin["locator"].startswith(f"http://127.0.0.1:{hub.port}/{REPO}/resolve/") for f in manifest.files
        )


async def views_without_endpoint(model: dict[str, Any]) -> list[dict[str, bytes]]:
    """Every file of the models/ and hf/ views (the hub is down: its /hf endpoint would ask it)."""
    roots = (Path(model["path"]), Path(model["snapshot_path"]))
    return [
        {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} for root in roots
    ]


# --- (e) file:// stays on the node that imported it --------------------------------------------------


async def test_a_file_ref_is_invisible_to_peers_and_cannot_be_replicated(tmp_path: Path, token_file: Path) -> None:
    src = tmp_path / "src" / "private-model"
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random_bytes(300_000, seed=5))
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(hub_with_llama())
        a = await start(stack, tmp_path, "a", token_file, hub)
        b = await start(stack, tmp_path, "b", token_file, hub, a)
        await wait_until(lambda: all_see_all({"a": a, "b": b}), timeout_s=15, what="a and b see each other")
        model = await prefetch(a, f"file://{src}")
        ref = ModelRef.parse(model["ref"])
        await prefetch(a, REF)  # an hf model, announced as usual: gossip is flowing
        await wait_until(
            lambda: advertises(b, "a", a.store.ref_digest(ModelRef.parse(REF)) or ""),
            timeout_s=10,
            what="b learns a's hf ref",
        )

        assert b.gossip is not None and a.gossip is not None
        assert b.gossip.view.with_ref(ref.canonical) == [], "b never learns a's file:// ref"
        assert ref.canonical not in a.gossip.holdings.state.refs
        assert a.store.ref_digest(ref) not in a.gossip.holdings.state.manifests
        # What b's own peer client gets when it asks a directly.
        assert a.peer_address is not None
        assert await b.gossip.client.ref(a.peer_address, ref.canonical) is None
        hf_ref = ModelRef.parse(REF)
        assert await b.gossip.client.ref(a.peer_address, hf_ref.canonical) == a.store.ref_digest(hf_ref)
        with pytest.raises(PeerError) as e:
            await b.gossip.client.status(a.peer_address, ref.canonical)
        assert e.value.status == 404, e.value
        assert (await b.gossip.client.status(a.peer_address, ModelRef.parse(REF).canonical))["state"] == "ready"

        async with ApiClient(a.api_address) as api:
            for bad in (ref.canonical, "http://127.0.0.1:9/x.gguf", "http://169.254.169.254/latest/x.bin"):
                with pytest.raises(ApiError) as err:
                    await api.request("POST", "/v1/replicate", body={"ref": bad, "replicas": 2})
                assert err.value.status == 400, (bad, err.value.status, str(err.value))
                assert "cannot replicate" in str(err.value)
            assert await api.request("GET", "/v1/catalog") == []
