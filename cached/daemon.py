"""Composition root: parse flags, build every component, start them in order, stop in reverse.

This is the only module that wires components together. Start order: store (indexed) -> HTTP
client session -> origins -> jobs -> local API listening -> READY=1. Stop order is the reverse:
stop accepting, cancel jobs (verified pieces are already on disk), close sessions. A bad config or
flag exits 78 (EX_CONFIG) with one line on stderr, which systemd's RestartPreventExitStatus honours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from aiohttp import web

from cached import __version__
from cached.api.access import AdminPolicy, HostPolicy, read_admin_token
from cached.api.hf import HfEndpoint
from cached.api.listener import ListenerGuard, listener_guards
from cached.api.local import LocalApi
from cached.api.peer import PeerApi
from cached.cluster import Catalog, Locator, Reconciler
from cached.cluster import Member as ClusterMember
from cached.config import DEFAULT_CONFIG_FILE, Config, load
from cached.errors import CachedError, ConfigError
from cached.jobs import Jobs
from cached.metrics import Metrics
from cached.origins import Origins
from cached.origins.hf import HfOrigin
from cached.peers.auth import ClusterKey
from cached.peers.client import PeerClient, client_ssl
from cached.peers.gossip import Gossip, default_advertise
from cached.peers.holdings import HoldingsView, LocalHoldings
from cached.peers.mdns import MdnsDiscovery
from cached.rangeio import ThreadedRangeReader
from cached.peers.membership import MemberInfo, Membership, Status
from cached.origins.http import HttpOrigin
from cached.origins.local import FilePolicy, LocalOrigin
from cached.store import Store
from cached.transfer.model import ModelFetcher
from cached.transfer.scheduler import Scheduler
from cached.types import ModelRef, Priority, RefKind

log = logging.getLogger("cached")

EX_CONFIG = 78
HOUSEKEEPING_INTERVAL_S = 10.0
PEER_CONNECT_TIMEOUT_S = 3.0
# Keys SIGHUP applies in place; any other change is reported as needing a restart.
RELOADABLE = frozenset(
    {"log.level", "store.max_bytes", "store.high_watermark", "store.low_watermark", "jobs.max_concurrent"}
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass as dotted keys (``store.max_bytes``), to diff two configs."""
    if not dataclasses.is_dataclass(value):
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        out.update(flatten(getattr(value, f.name), f"{prefix}{f.name}."))
    return out


class Daemon:
    """One node. Several can run in one process (tests): each owns its registry, session, store."""

    def __init__(self, cfg: Config, *, clock: Any = time.time, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self._env = dict(os.environ) if env is None else env
        self.clock = clock
        self.metrics = Metrics()
        # This node's holdings as peers see them: told of every store change from the start and
        # seeded with the store's whole state once it is open (_build_peers); with peer
        # networking off nobody reads it.
        self.holdings = LocalHoldings()
        self.store = Store(cfg.store, clock=clock, on_event=self.holdings.record)
        self._stack = contextlib.AsyncExitStack()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self.jobs: Jobs
        self.api: LocalApi
        self.gossip: Gossip | None = None
        self.peer_address: str | None = None
        self._server_ssl: ssl.SSLContext | None = None
        self.catalog: Catalog | None = None
        self.reconciler: Reconciler | None = None
        self.locator: Locator | None = None
        self.fetcher: ModelFetcher
        self._guards: dict[str, ListenerGuard] = {}

    async def __aenter__(self) -> "Daemon":
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        notify("STOPPING=1")
        await self._stack.aclose()
        log.info("stopped node=%s", self.cfg.node_id)

    async def _start(self) -> None:
        cfg = self.cfg
        await self.store.open()
        for kind, n in self.store.bad_entries.items():
            self.metrics.store_bad_entries.labels(kind).inc(n)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.origins.http.connections * 4, ttl_dns_cache=60),
            auto_decompress=False,
            headers={"User-Agent": f"cached/{__version__}"},
        )
        self._stack.push_async_callback(session.close)
        reader = ThreadedRangeReader(
            connect_timeout_s=cfg.origins.http.connect_timeout_s, read_timeout_s=cfg.origins.http.read_timeout_s,
            user_agent=f"cached/{__version__}",
        )
        self._stack.callback(reader.close)
        self.hf_origin = HfOrigin(session, cfg.origins.hf, cfg.origins.http, reader, token=hf_token(cfg, self._env))
        self.file_origin = LocalOrigin(file_policy(cfg))
        origins = Origins(
            {RefKind.FILE: self.file_origin, RefKind.HTTP: HttpOrigin(session, cfg.origins.http, reader), RefKind.HF: self.hf_origin}
        )
        token = cluster_token(cfg)
        self._guards = listener_guards(self.metrics, api=cfg.api.limits, peer=cfg.peer.limits if token is not None else None)
        directory = self._build_peers(session, token) if token is not None else None
        scheduler = Scheduler(cfg.origins.http, self.metrics, peer_client=directory.client if directory else None)
        self.fetcher = ModelFetcher(
            self.store, origins, scheduler, self.metrics, peers=directory, grace_s=2.5 * cfg.peer.gossip_interval_s,
            stall_timeout_s=cfg.peer.stall_timeout_s, names_from_peers=cfg.cluster.names_from_peers,
        )
        self.jobs = await self._stack.enter_async_context(Jobs(self.fetcher, self.store, self.metrics, cfg.jobs, clock=self.clock))

        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self.stop)  # runs before the TaskGroup joins: loops end (and wakes the reconciler)
        self._tg.create_task(self._housekeeping(), name="store.housekeeping")
        if cfg.store.scrub_interval_s > 0:
            self._tg.create_task(self._scrub(), name="store.scrub")
        if cfg.origins.hf.refresh_interval_s > 0:
            self._tg.create_task(self._refresh_hf(cfg.origins.hf.refresh_interval_s), name="hf.refresh")
        watchdog_s = watchdog_interval_s()
        if watchdog_s is not None:
            self._tg.create_task(self._watchdog(watchdog_s), name="systemd.watchdog")

        if token is None:
            log.info("peer networking off: no cluster.token_file (--cluster-token-file); this node works alone")
        else:
            await self._serve_peers(token)

        hf = HfEndpoint(
            store=self.store, jobs=self.jobs, origin=self.hf_origin, lend_token_to=cfg.origins.hf.lend_token_to,
            anonymous=HfOrigin(session, cfg.origins.hf, cfg.origins.http, reader, token=None),
        )
        self.api = LocalApi(
            node_id=cfg.node_id, store=self.store, jobs=self.jobs, fetcher=self.fetcher, metrics=self.metrics, hf=hf,
            peers=self.peers_view, catalog=self.catalog, reconciler=self.reconciler, locator=self.locator, clock=self.clock,
            files=self.file_origin,
            admin=AdminPolicy(token=read_admin_token(cfg.api.admin_token_file), group=cfg.api.admin_group),
            hosts=HostPolicy(listen_host=cfg.api.listen.host, allowed_hosts=cfg.api.allowed_hosts),
        )
        # handler_cancellation: a client that hangs up (a launcher killed while it waits for
        # --wait, a closed event stream) must not leave its handler running.
        guard = self._guards["api"]
        self._runner = web.AppRunner(
            self.api.app(), handle_signals=False, access_log=None, shutdown_timeout=2.0, handler_cancellation=True,
            **guard.runner_kwargs(),
        )
        await self._runner.setup()
        self._stack.push_async_callback(self._runner.cleanup)
        self._stack.callback(self.api.close)  # runs first: ends event streams so cleanup is quick
        listen = cfg.api.listen
        if listen.unix_path:
            Path(listen.unix_path).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.unix_path)
            await guard.start_unix(self._runner, listen.unix_path)
            os.chmod(listen.unix_path, cfg.api.socket_mode)
        else:
            await guard.start_tcp(self._runner, listen.host, listen.port)
        self.api.ready = True
        log.info("listening node=%s api=%s cache_dir=%s version=%s", cfg.node_id, self.api_address, cfg.store.cache_dir, __version__)
        notify("READY=1", f"STATUS=serving api={self.api_address}")

    def _build_peers(self, session: aiohttp.ClientSession, token: str) -> "GossipDirectory":
        """Membership, holdings and gossip, wired but not yet serving (no I/O)."""
        cfg = self.cfg
        holdings = self.holdings
        for event in self.store.state_events():
            holdings.record(event)
        self._server_ssl, client_ssl_ctx = tls_contexts(cfg)
        # Only the key derived from the token is used from here on; the token never leaves.
        self._cluster_key = ClusterKey(token, cfg.cluster.name)
        # Our address is known once the peer API listens; _serve_peers fills it in.
        membership = Membership(
            MemberInfo(node_id=cfg.node_id, address="", cluster=cfg.cluster.name, incarnation=0),
            suspect_after_s=cfg.peer.suspect_after_s, dead_after_s=cfg.peer.dead_after_s,
            forget_after_s=cfg.peer.forget_after_s, clock=time.monotonic,
        )
        reader = ThreadedRangeReader(
            # A peer on the LAN connects in milliseconds; a host that vanished must not hold a
            # piece request for the whole stall timeout before another source is tried.
            connect_timeout_s=min(PEER_CONNECT_TIMEOUT_S, cfg.peer.stall_timeout_s), read_timeout_s=cfg.peer.stall_timeout_s,
            user_agent=f"cached/{__version__}", ssl_context=client_ssl_ctx,
        )
        self._stack.callback(reader.close)
        client = PeerClient(
            session, reader, self._cluster_key, cfg.node_id, scheme="https" if self._server_ssl else "http",
            ssl_context=client_ssl_ctx, timeout_s=cfg.peer.stall_timeout_s, metrics=self.metrics,
        )
        self.gossip = Gossip(
            membership=membership, holdings=holdings, view=HoldingsView(), client=client, metrics=self.metrics,
            interval_s=cfg.peer.gossip_interval_s, fanout=cfg.peer.fanout, seeds=cfg.peer.seeds,
            capacity=lambda: self.store.capacity_bytes,
        )
        return GossipDirectory(self.gossip, client)

    async def _serve_peers(self, token: str) -> None:
        cfg = self.cfg
        assert self.gossip is not None
        holdings = self.gossip.holdings
        server_ssl = self._server_ssl
        peer_api = PeerApi(
            store=self.store, gossip=self.gossip, metrics=self.metrics, key=self._cluster_key, node_id=cfg.node_id,
            max_uploads=cfg.peer.max_uploads, serve_rate_bps=cfg.peer.serve_rate_bps,
        )
        guard = self._guards["peer"]
        runner = web.AppRunner(
            peer_api.app(), handle_signals=False, access_log=None, shutdown_timeout=2.0, handler_cancellation=True,
            **guard.runner_kwargs(),
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        listen = cfg.peer.listen
        await guard.start_tcp(runner, listen.host, listen.port, ssl_context=server_ssl)
        port = runner.addresses[0][1]
        advertise = cfg.peer.advertise or default_advertise(listen.host, port)
        # Incarnation: start time in ms, so a restarted node always outranks its previous life.
        self.gossip.membership.me = MemberInfo(
            node_id=cfg.node_id, address=advertise, cluster=cfg.cluster.name, incarnation=time.time_ns() // 1_000_000,
            capacity_bytes=self.store.capacity_bytes, labels=cfg.labels,
        )
        self._start_cluster(peer_api)
        self.peer_address = advertise
        assert self._tg is not None
        self._tg.create_task(self.gossip.run(self._stopping), name="peers.gossip")
        if cfg.discovery.mdns:
            mdns = MdnsDiscovery(
                node_id=cfg.node_id, cluster=cfg.cluster.name, address=advertise, key=ClusterKey(token, cfg.cluster.name),
                on_peer=lambda node_id, address: self.gossip.add_seed(address) if self.gossip else None,
                on_reject=lambda reason: self.metrics.mdns_rejected.labels(reason).inc(),
                summary=lambda: (holdings.version, holdings.state.summary()),
            )
            await self._stack.enter_async_context(mdns)
            self._tg.create_task(self._mdns_refresh(mdns), name="peers.mdns")
        log.info("peers on node=%s peer_api=%s advertise=%s cluster=%s seeds=%d mdns=%s",
                 cfg.node_id, f"{listen.host}:{port}", advertise, cfg.cluster.name, len(cfg.peer.seeds), cfg.discovery.mdns)

    def _start_cluster(self, peer_api: PeerApi) -> None:
        """Catalog in gossip, the reconcile loop, cluster-wide locate."""
        gossip = self.gossip
        assert gossip is not None and self._tg is not None
        me = self.cfg.node_id
        self.catalog = Catalog(me, clock=self.clock, metrics=self.metrics, internal_origins=self.cfg.cluster.internal_origins)
        gossip.extra_out = lambda: {"catalog": self.catalog.to_json()}
        gossip.extra_in = lambda payload: self.catalog.merge(payload.get("catalog") or []) if isinstance(payload, dict) else None

        # Placement moves a model only when gossip says its holder is dead (peer.dead_after_s), not
        # at the first missed heartbeats: a node that is merely slow for a few seconds must not
        # set off a full copy elsewhere. Suspect members stay owners and holders until then.
        def not_dead() -> list[MemberInfo]:
            return [gossip.membership.me] + [m.info for m in gossip.membership.members() if m.status is not Status.DEAD]

        def members() -> list[ClusterMember]:
            return [ClusterMember(node_id=i.node_id, capacity_bytes=i.capacity_bytes, labels=i.labels) for i in not_dead()]

        def holders(ref: str) -> set[str]:
            counted = {i.node_id for i in not_dead()}
            return {n for n, _ in gossip.view.with_ref(ref) if n in counted}

        self.reconciler = Reconciler(
            node_id=me, catalog=self.catalog, store=self.store, jobs=self.jobs, members=members, holders=holders,
            interval_s=max(1.0, self.cfg.peer.gossip_interval_s * 2),
        )
        self.store.extra_protected = self.reconciler.protects
        self.locator = Locator(
            node_id=me,
            local_status=lambda ref: self.api.model_object(ref),
            peers=lambda: [(m.info.node_id, m.info.address) for m in gossip.membership.alive()],
            remote_status=gossip.client.status,
        )
        peer_api.local_status = lambda ref: self.api.model_object(ref)
        gossip.on_status_change = lambda node_id, status: self.reconciler.kick() if self.reconciler else None
        self._tg.create_task(self.reconciler.run(self._stopping), name="cluster.reconcile")

    async def _mdns_refresh(self, mdns: MdnsDiscovery) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
            with contextlib.suppress(Exception):
                await mdns.refresh()

    def peers_view(self) -> list[dict[str, Any]]:
        if self.gossip is None:
            return []
        return [
            {
                "node_id": m.info.node_id, "address": m.info.address, "state": m.status.value,
                "incarnation": m.info.incarnation, "heartbeat": m.info.heartbeat, "holdings_version": m.info.holdings_version,
            }
            for m in self.gossip.membership.members()
        ]

    @property
    def api_address(self) -> str:
        """``http://HOST:PORT`` (the real port when configured with 0) or ``unix:/path``."""
        if self.cfg.api.listen.unix_path:
            return f"unix:{self.cfg.api.listen.unix_path}"
        assert self._runner is not None
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._stopping.set()
        if self.reconciler is not None:
            self.reconciler.kick()  # its loop waits on its own wake-up event

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def _watchdog(self, interval_s: float) -> None:
        # Pinged from the event loop itself: if the loop is stuck, systemd stops hearing from us
        # and restarts the service.
        while not self._stopping.is_set():
            notify("WATCHDOG=1")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)

    def reload(self, new: Config) -> list[str]:
        """SIGHUP: apply what can change at run time; return the keys that need a restart."""
        changed = {k for k, v in flatten(new).items() if flatten(self.cfg)[k] != v}
        if "store.cache_dir" in changed:  # the file and the flag call it cache_dir
            changed = (changed - {"store.cache_dir"}) | {"cache_dir"}
        restart = sorted(changed - RELOADABLE)
        applied = sorted(changed & RELOADABLE)
        if "log.level" in changed:
            logging.getLogger().setLevel(new.log.level.upper())
        store = dataclasses.replace(
            self.cfg.store,
            max_bytes=new.store.max_bytes,
            high_watermark=new.store.high_watermark,
            low_watermark=new.store.low_watermark,
        )
        if store != self.cfg.store:
            self.store.reconfigure(store)
        if new.jobs != self.cfg.jobs:
            self.jobs.reconfigure(new.jobs)
        self.cfg = dataclasses.replace(
            self.cfg, store=store, jobs=new.jobs, log=dataclasses.replace(self.cfg.log, level=new.log.level)
        )
        log.info("configuration reloaded applied=%s needs_restart=%s", ",".join(applied) or "-", ",".join(restart) or "-")
        notify(f"STATUS=reloaded; restart needed for: {', '.join(restart)}" if restart else "STATUS=reloaded")
        return restart

    async def _scrub(self) -> None:
        """Bit rot: re-hash every stored blob, paced, once per scrub_interval_s; repair and count."""
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.cfg.store.scrub_interval_s)
            if self._stopping.is_set():
                return
            try:
                report = await self.fetcher.verify(rate_bps=self.cfg.store.scrub_rate_bps)
            except CachedError as e:
                log.warning("scrub failed error=%s", e)
                continue
            log.info("scrub done checked_bytes=%d bad_pieces=%d repaired_blobs=%d errors=%d",
                     report.checked_bytes, report.bad_pieces, report.repaired_blobs, len(report.errors))

    async def _refresh_hf(self, interval_s: float) -> None:
        """Keep branch-tracking hf:// models current: re-resolve, fetch only what changed."""
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)
            if self._stopping.is_set():
                return
            for rec in self.store.models():
                ref = ModelRef.parse(rec.ref)
                if ref.kind is RefKind.HF and not re.fullmatch(r"[0-9a-f]{40}", ref.revision):
                    self.jobs.submit(ref, Priority.LOW, refresh=True)

    async def _housekeeping(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), HOUSEKEEPING_INTERVAL_S)
            if self._stopping.is_set():
                return
            try:
                expired = await self.store.claims.expire()
                for lease in expired:
                    log.info("lease expired lease=%s ref=%s holder=%s", lease.lease_id, lease.ref, lease.holder)
                if expired:
                    await self.store.release_unretained()
                freed, evicted = await self.store.gc()
                if evicted:
                    self.metrics.evictions.inc(len(evicted))
                    log.info("evicted under pressure models=%d freed_bytes=%d", len(evicted), freed)
            except CachedError as e:
                log.warning("housekeeping failed error=%s", e)


def cluster_token(cfg: Config) -> str | None:
    path = cfg.cluster.token_file
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ConfigError("cluster.token_file", f"{path}: {e.strerror}") from None
    if len(token) < 16:
        raise ConfigError("cluster.token_file", f"{path}: the token must be at least 16 characters")
    return token


def file_policy(cfg: Config) -> FilePolicy:
    """file:// imports: the configured roots, never the daemon's own files or store."""
    secrets = (
        DEFAULT_CONFIG_FILE, cfg.cluster.token_file, cfg.api.admin_token_file, cfg.origins.hf.token_file,
        cfg.peer.tls_cert_file, cfg.peer.tls_key_file, cfg.peer.tls_ca_file,
        Path(cfg.api.listen.unix_path) if cfg.api.listen.unix_path else None,
    )
    return FilePolicy.build(cfg.origins.file.allowed_roots, secrets=secrets, private_dirs=(cfg.store.cache_dir,))


def tls_contexts(cfg: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) TLS contexts for the peer API, or (None, None) for plain HTTP."""
    p = cfg.peer
    if p.tls_cert_file is None or p.tls_key_file is None:
        return None, None
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(str(p.tls_cert_file), str(p.tls_key_file))
        if p.tls_ca_file is not None:
            server.load_verify_locations(str(p.tls_ca_file))
            server.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: peers must prove themselves too
        client = client_ssl(
            cert=str(p.tls_cert_file), key=str(p.tls_key_file), ca=str(p.tls_ca_file) if p.tls_ca_file else None
        )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("peer.tls_cert_file", f"cannot load TLS files: {e}") from None
    return server, client


def hf_token(cfg: Config, env: dict[str, str]) -> str | None:
    """The hub token: origins.hf.token_file, else $HF_TOKEN (as huggingface_hub itself reads it)."""
    path = cfg.origins.hf.token_file
    if path is not None:
        try:
            return path.read_text().strip() or None
        except OSError as e:
            raise ConfigError("origins.hf.token_file", f"{path}: {e.strerror}") from None
    return env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None


class GossipDirectory:
    """The transfer layer's view of the cluster (``transfer.sources.PeerDirectory``), over gossip."""

    def __init__(self, gossip: Gossip, client: PeerClient) -> None:
        self._gossip = gossip
        self.client = client
        self.view = gossip.view

    @property
    def me(self) -> str:
        return self._gossip.membership.me.node_id

    def alive(self) -> list[tuple[str, str]]:
        # Suspect members count too: one slow gossip round must not hand their pieces (or their
        # share of origin reads) to everyone else. Only dead ones are gone.
        return [
            (m.info.node_id, m.info.address) for m in self._gossip.membership.members() if m.status is not Status.DEAD
        ]

    def suspect(self) -> set[str]:
        # Asked last, and only for what no healthy peer has (see Swarm.peer_sources).
        return {m.info.node_id for m in self._gossip.membership.members() if m.status is Status.SUSPECT}


# --- systemd ------------------------------------------------------------------------------------


def watchdog_interval_s() -> float | None:
    """Half of $WATCHDOG_USEC when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


def notify(*lines: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (no-op when unset)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
    except OSError as e:
        log.warning("sd_notify failed socket=%s error=%s", addr, e)


# --- logging ------------------------------------------------------------------------------------


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (sd-daemon(3)) so ``journalctl -p`` filters."""

    def format(self, record: logging.LogRecord) -> str:
        n = record.levelno
        prio = 2 if n >= logging.CRITICAL else 3 if n >= logging.ERROR else 4 if n >= logging.WARNING else 6 if n >= logging.INFO else 7
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # The journal adds its own timestamp; it reads the <N> prefix as the priority.
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# --- entry point --------------------------------------------------------------------------------


class _FlagParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError("flags", message)


def build_parser() -> argparse.ArgumentParser:
    p = _FlagParser(prog="cached", description="Node-local model cache daemon.")
    p.add_argument("--version", action="version", version=f"cached {__version__}")
    p.add_argument("--config", type=Path, help="TOML file (default /etc/cached/config.toml if it exists)")
    p.add_argument("--node-id", dest="node_id")
    p.add_argument("--cache-dir", dest="cache_dir")
    p.add_argument("--api-listen", dest="api.listen", metavar="ADDR")
    p.add_argument("--peer-listen", dest="peer.listen", metavar="HOST:PORT")
    p.add_argument("--advertise", dest="peer.advertise", metavar="HOST:PORT")
    p.add_argument("--seed", dest="peer.seeds", action="append", metavar="HOST:PORT")
    p.add_argument("--cluster", dest="cluster.name", metavar="NAME")
    p.add_argument("--cluster-token-file", dest="cluster.token_file", metavar="FILE")
    p.add_argument("--mdns", dest="discovery.mdns", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--hf-endpoint", dest="origins.hf.endpoint", metavar="URL")
    p.add_argument("--admin-token-file", dest="api.admin_token_file", metavar="FILE")
    p.add_argument("--allow-host", dest="api.allowed_hosts", action="append", metavar="HOST")
    p.add_argument("--allow-file-root", dest="origins.file.allowed_roots", action="append", metavar="DIR")
    p.add_argument("--max-cache-bytes", dest="store.max_bytes", metavar="N")
    p.add_argument("--piece-size", dest="store.piece_size_bytes", metavar="N")
    p.add_argument("--log-format", dest="log.format", choices=None, metavar="text|json")
    p.add_argument("--log-level", dest="log.level", metavar="LEVEL")
    return p


def parse_config(argv: list[str]) -> Config:
    args = vars(build_parser().parse_args(argv))
    file = args.pop("config")
    return load(file, args)


async def run(cfg: Config, argv: list[str]) -> None:
    loop = asyncio.get_running_loop()
    async with Daemon(cfg) as daemon:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)

        def on_hup() -> None:
            notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                daemon.reload(parse_config(argv))
            except ConfigError as e:
                log.error("reload refused, keeping the running configuration: %s", e.message)
            notify("READY=1")

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await daemon.wait_stopped()
        log.info("stopping node=%s", cfg.node_id)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"cached: config error: {e.message}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    setup_logging(cfg.log.format, cfg.log.level)
    try:
        asyncio.run(run(cfg, argv))
    except ConfigError as e:
        print(f"cached: config error: {e.message}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    except (CachedError, OSError) as e:
        # e.g. the API address is in use: one clear line, and systemd may retry.
        log.error("cannot start: %s", e)
        sys.exit(1)
