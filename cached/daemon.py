"""Composition root: parse flags, build every component, start them in order, stop in reverse.

This is the only module that wires components together; every background loop is the ``run()``
of the component that owns it, started here in one task group under a name. Start order: store
(indexed) -> HTTP clients -> origins -> peers and cluster (built, no I/O) -> transfer -> jobs ->
loops -> peer API listening, then gossip, reconcile, mDNS -> local API listening -> READY=1. Stop
order is the reverse (an ``AsyncExitStack``): stop accepting, end every loop, cancel jobs
(verified pieces are already on disk), close sessions. A bad config or flag exits 78
(EX_CONFIG) with one line on stderr, which systemd's RestartPreventExitStatus honours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Protocol

import aiohttp
from aiohttp import web

from cached import __version__
from cached.api.access import AdminPolicy, HostPolicy, read_admin_token
from cached.api.hf import HfEndpoint
from cached.api.listener import ListenerGuard, listener_guards
from cached.api.local import LocalApi
from cached.api.peer import PeerApi
from cached.api.registry import RegistryMirror
from cached.cluster import Catalog, CatalogStatus, GossipMembers, Locator, Reconciler, ReplicaGuard
from cached.config import DEFAULT_CONFIG_FILE, MIN_TOKEN_CHARS, Config, load, read_secret
from cached.errors import CachedError, ConfigError
from cached.jobs import Jobs
from cached.logs import set_level, setup_logging
from cached.metrics import Metrics
from cached.origins import Origins
from cached.origins.hf import HfOrigin
from cached.origins.http import HttpOrigin
from cached.origins.local import FilePolicy, LocalOrigin
from cached.origins.modelscope import ModelScopeOrigin
from cached.origins.oci import OciOrigin
from cached.origins.registry import RegistryClient
from cached.origins.s3 import S3Origin
from cached.peers.auth import ClusterKey
from cached.peers.client import PeerClient, client_ssl
from cached.peers.directory import GossipDirectory
from cached.peers.gossip import Gossip, default_advertise
from cached.peers.holdings import HoldingsView, LocalHoldings
from cached.peers.mdns import MdnsDiscovery
from cached.peers.membership import MemberInfo, Membership
from cached.rangeio import ThreadedRangeReader
from cached.status import StatusBoard, StatusSource
from cached.store import Store
from cached.store.housekeeping import Housekeeping
from cached.systemd import Watchdog, notify, watchdog_interval_s
from cached.transfer.artifacts import SwarmArtifacts
from cached.transfer.blob import BlobFetcher
from cached.transfer.model import ModelFetcher
from cached.transfer.refresh import HfRefresh
from cached.transfer.scrub import Scrub
from cached.transfer.wants import Wants
from cached.types import RefKind

log = logging.getLogger("cached")

EX_CONFIG = 78
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


class Loop(Protocol):
    """A component with a background loop that runs until the daemon stops."""

    async def run(self, stopping: asyncio.Event) -> None: ...


class Daemon:
    """One node. Several can run in one process (tests): each owns its registry, session, store."""

    def __init__(self, cfg: Config, *, clock: Any = time.time, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self._env = dict(os.environ) if env is None else env
        self.clock = clock
        self.metrics = Metrics()
        self.replicas = ReplicaGuard()  # the store asks it; the reconciler, once built, answers
        # This node's holdings as peers see them: told of every store change from the start and
        # seeded with the store's whole state once it is open (_build_peers); with peer
        # networking off nobody reads it.
        self.holdings = LocalHoldings()
        self.wants = Wants()  # who else wants the files this node fetches (transfer.wants)
        self.store = Store(cfg.store, clock=clock, protector=self.replicas, on_event=self.holdings.record)
        self._stack = contextlib.AsyncExitStack()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self.jobs: Jobs
        self.api: LocalApi
        self.fetcher: ModelFetcher
        self.status: StatusSource  # with the catalog's replica plan once in a cluster
        self.gossip: Gossip | None = None
        self.catalog: Catalog | None = None
        self.reconciler: Reconciler | None = None
        self.locator: Locator | None = None
        self.peer_address: str | None = None
        self._server_ssl: ssl.SSLContext | None = None
        self._guards: dict[str, ListenerGuard] = {}

    async def __aenter__(self) -> Daemon:
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

    # --- start, in order; the exit stack stops in reverse -----------------------------------------

    async def _start(self) -> None:
        cfg = self.cfg
        await self.store.open()
        for kind, n in self.store.bad_entries.items():
            self.metrics.store_bad_entries.labels(kind).inc(n)
        session, reader = self._http_clients()
        self.hf_origin = HfOrigin(session, cfg.origins.hf, cfg.origins.http, reader, token=hf_token(cfg, self._env))
        self.file_origin = LocalOrigin(file_policy(cfg))
        self.oci_registry = RegistryClient(session, reader, cfg.origins.oci, cfg.origins.http)
        self.oci_origin = OciOrigin(self.oci_registry, self.store.tmp_dir / "oci-spool", cfg.origins.oci)
        self._stack.callback(self.file_origin.close)
        s3_origin = S3Origin(cfg.origins.s3, cfg.origins.http, reader, env=self._env)
        self._stack.callback(s3_origin.close)
        origins = Origins(
            {
                RefKind.FILE: self.file_origin,
                RefKind.HTTP: HttpOrigin(session, cfg.origins.http, reader),
                RefKind.HF: self.hf_origin,
                RefKind.OCI: self.oci_origin,
                RefKind.OLLAMA: self.oci_origin,
                RefKind.MODELSCOPE: ModelScopeOrigin(
                    session, cfg.origins.modelscope, cfg.origins.http, reader, token=modelscope_token(cfg, self._env)
                ),
                RefKind.S3: s3_origin,
            }
        )
        token = cluster_token(cfg)
        self._guards = listener_guards(
            self.metrics, api=cfg.api.limits, peer=cfg.peer.limits if token is not None else None
        )
        directory = self._build_peers(session, token) if token is not None else None
        blobs = BlobFetcher(cfg.transfer, self.metrics, peer_client=directory.client if directory else None)
        self.fetcher = ModelFetcher(
            self.store,
            origins,
            blobs,
            self.metrics,
            peers=directory,
            wants=self.wants,  # origin single-flight: an exchange with the peers, no timed grace
            stall_timeout_s=cfg.peer.stall_timeout_s,
            names_from_peers=cfg.cluster.names_from_peers,
        )
        # A modelcar's archive layers come through the swarm, not from the registry per node.
        self.oci_origin.use_artifacts(SwarmArtifacts(self.fetcher, self.store))
        self.jobs = await self._stack.enter_async_context(
            Jobs(self.fetcher, self.store, self.metrics, cfg.jobs, clock=self.clock)
        )
        self.status = StatusBoard(store=self.store, jobs=self.jobs, clock=self.clock)
        if directory is not None:
            self._build_cluster(directory)

        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self.stop)  # runs before the TaskGroup joins: every loop ends
        self._spawn("store.housekeeping", Housekeeping(self.store, self.metrics))
        if cfg.store.scrub_interval_s > 0:
            self._spawn(
                "store.scrub",
                Scrub(self.fetcher, interval_s=cfg.store.scrub_interval_s, rate_bps=cfg.store.scrub_rate_bps),
            )
        if cfg.origins.hf.refresh_interval_s > 0:
            self._spawn("hf.refresh", HfRefresh(self.store, self.jobs, interval_s=cfg.origins.hf.refresh_interval_s))
        watchdog_s = watchdog_interval_s()
        if watchdog_s is not None:
            self._spawn("systemd.watchdog", Watchdog(watchdog_s))

        if token is None:
            log.info("peer networking off: no cluster.token_file (--cluster-token-file); this node works alone")
        else:
            await self._serve_peers(token)
        await self._serve_api(session, reader)
        log.info(
            "listening node=%s api=%s cache_dir=%s version=%s",
            cfg.node_id,
            self.api_address,
            cfg.store.cache_dir,
            __version__,
        )
        notify("READY=1", f"STATUS=serving api={self.api_address}")

    def _spawn(self, name: str, loop: Loop) -> None:
        assert self._tg is not None
        self._tg.create_task(loop.run(self._stopping), name=name)

    def _http_clients(self) -> tuple[aiohttp.ClientSession, ThreadedRangeReader]:
        """The origins' HTTP session (metadata) and range reader (piece bodies), closed on stop."""
        cfg = self.cfg
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.transfer.connections * 4, ttl_dns_cache=60),
            auto_decompress=False,
            headers={"User-Agent": f"cached/{__version__}"},
        )
        self._stack.push_async_callback(session.close)
        reader = ThreadedRangeReader(
            connect_timeout_s=cfg.origins.http.connect_timeout_s,
            read_timeout_s=cfg.origins.http.read_timeout_s,
            user_agent=f"cached/{__version__}",
        )
        self._stack.callback(reader.close)
        return session, reader

    async def _serve_api(self, session: aiohttp.ClientSession, reader: ThreadedRangeReader) -> None:
        cfg = self.cfg
        hf = HfEndpoint(
            store=self.store,
            jobs=self.jobs,
            origin=self.hf_origin,
            lend_token_to=cfg.origins.hf.lend_token_to,
            anonymous=HfOrigin(session, cfg.origins.hf, cfg.origins.http, reader, token=None),
            metrics=self.metrics,
            prefetch_on_pull=cfg.origins.hf.prefetch_on_pull,
        )
        self.api = LocalApi(
            node_id=cfg.node_id,
            labels=cfg.labels,
            store=self.store,
            jobs=self.jobs,
            status=self.status,
            fetcher=self.fetcher,
            metrics=self.metrics,
            hf=hf,
            peers=self.peers_view,
            catalog=self.catalog,
            reconciler=self.reconciler,
            locator=self.locator,
            clock=self.clock,
            files=self.file_origin,
            admin=AdminPolicy(token=read_admin_token(cfg.api.admin_token_file), group=cfg.api.admin_group),
            hosts=HostPolicy(listen_host=cfg.api.listen.host, allowed_hosts=cfg.api.allowed_hosts),
            mirror=RegistryMirror(
                store=self.store, jobs=self.jobs, client=self.oci_registry, cfg=cfg.origins.oci, metrics=self.metrics
            ),
        )
        # handler_cancellation: a client that hangs up (a launcher killed while it waits for
        # --wait, a closed event stream) must not leave its handler running.
        guard = self._guards["api"]
        self._runner = web.AppRunner(
            self.api.app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=2.0,
            handler_cancellation=True,
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

    def _build_peers(self, session: aiohttp.ClientSession, token: str) -> GossipDirectory:
        """Membership, holdings and the peer client, wired but not yet serving (no I/O)."""
        cfg = self.cfg
        holdings = self.holdings
        for event in self.store.state_events():
            holdings.record(event)
        self._server_ssl, client_ssl_ctx = tls_contexts(cfg)
        # Only the key derived from the token is used from here on; the token never leaves.
        self._cluster_key = ClusterKey(token, cfg.cluster.name)
        # Our address is known once the peer API listens; _serve_peers fills it in.
        self._membership = Membership(
            MemberInfo(node_id=cfg.node_id, address="", cluster=cfg.cluster.name, incarnation=0),
            suspect_after_s=cfg.peer.suspect_after_s,
            dead_after_s=cfg.peer.dead_after_s,
            forget_after_s=cfg.peer.forget_after_s,
            clock=time.monotonic,
        )
        reader = ThreadedRangeReader(
            # A peer on the LAN connects in milliseconds; a host that vanished must not hold a
            # piece request for the whole stall timeout before another source is tried.
            connect_timeout_s=min(PEER_CONNECT_TIMEOUT_S, cfg.peer.stall_timeout_s),
            read_timeout_s=cfg.peer.stall_timeout_s,
            user_agent=f"cached/{__version__}",
            ssl_context=client_ssl_ctx,
        )
        self._stack.callback(reader.close)
        client = PeerClient(
            session,
            reader,
            self._cluster_key,
            cfg.node_id,
            scheme="https" if self._server_ssl else "http",
            ssl_context=client_ssl_ctx,
            timeout_s=cfg.peer.stall_timeout_s,
            metrics=self.metrics,
        )
        return GossipDirectory(self._membership, HoldingsView(), client)

    def _build_cluster(self, directory: GossipDirectory) -> None:
        """The catalog, the reconcile loop that acts on it, gossip that carries both, and the
        cluster's view of model status and location (no I/O)."""
        cfg = self.cfg
        self.catalog = Catalog(
            cfg.node_id, clock=self.clock, metrics=self.metrics, internal_origins=cfg.cluster.internal_origins
        )
        live = GossipMembers(self._membership, directory.view)
        self.reconciler = reconciler = Reconciler(
            node_id=cfg.node_id,
            catalog=self.catalog,
            store=self.store,
            jobs=self.jobs,
            members=live.members,
            holders=live.holders,
            interval_s=max(1.0, cfg.peer.gossip_interval_s * 2),
            guard=self.replicas,
        )
        self.gossip = Gossip(
            membership=self._membership,
            holdings=self.holdings,
            view=directory.view,
            client=directory.client,
            metrics=self.metrics,
            interval_s=cfg.peer.gossip_interval_s,
            fanout=cfg.peer.fanout,
            seeds=cfg.peer.seeds,
            capacity=lambda: self.store.capacity_bytes,
            extra_out=self.catalog.to_gossip,
            extra_in=self.catalog.from_gossip,
            on_status_change=lambda node_id, status: reconciler.kick(),
        )
        self.status = CatalogStatus(self.status, reconciler)
        self.locator = Locator(
            node_id=cfg.node_id,
            status=self.status,
            store=self.store,
            membership=self._membership,
            view=directory.view,
            client=directory.client,
        )

    async def _serve_peers(self, token: str) -> None:
        """The peer API listening; then gossip, reconciliation and mDNS under way."""
        cfg = self.cfg
        gossip, reconciler = self.gossip, self.reconciler
        assert gossip is not None and reconciler is not None
        peer_api = PeerApi(
            store=self.store,
            gossip=gossip,
            metrics=self.metrics,
            key=self._cluster_key,
            node_id=cfg.node_id,
            max_uploads=cfg.peer.max_uploads,
            serve_rate_bps=cfg.peer.serve_rate_bps,
            status=self.status,
            wants=self.wants,
        )
        guard = self._guards["peer"]
        runner = web.AppRunner(
            peer_api.app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=2.0,
            handler_cancellation=True,
            **guard.runner_kwargs(),
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        listen = cfg.peer.listen
        await guard.start_tcp(runner, listen.host, listen.port, ssl_context=self._server_ssl)
        port = runner.addresses[0][1]
        advertise = cfg.peer.advertise or default_advertise(listen.host, port)
        # Incarnation: start time in ms, so a restarted node always outranks its previous life.
        gossip.membership.me = MemberInfo(
            node_id=cfg.node_id,
            address=advertise,
            cluster=cfg.cluster.name,
            incarnation=time.time_ns() // 1_000_000,
            capacity_bytes=self.store.capacity_bytes,
            labels=cfg.labels,
        )
        self.peer_address = advertise
        self._spawn("cluster.reconcile", reconciler)
        self._spawn("peers.gossip", gossip)
        if cfg.discovery.mdns:
            holdings = self.holdings
            mdns = MdnsDiscovery(
                node_id=cfg.node_id,
                cluster=cfg.cluster.name,
                address=advertise,
                key=ClusterKey(token, cfg.cluster.name),
                on_peer=lambda node_id, address: gossip.add_seed(address),
                on_reject=lambda reason: self.metrics.mdns_rejected.labels(reason).inc(),
                summary=lambda: (holdings.version, holdings.state.summary()),
            )
            await self._stack.enter_async_context(mdns)
            self._spawn("peers.mdns", mdns)
        log.info(
            "peers on node=%s peer_api=%s advertise=%s cluster=%s seeds=%d mdns=%s",
            cfg.node_id,
            f"{listen.host}:{port}",
            advertise,
            cfg.cluster.name,
            len(cfg.peer.seeds),
            cfg.discovery.mdns,
        )

    # --- running -----------------------------------------------------------------------------------

    def peers_view(self) -> list[dict[str, Any]]:
        if self.gossip is None:
            return []
        return [
            {
                "node_id": m.info.node_id,
                "address": m.info.address,
                "state": m.status.value,
                "incarnation": m.info.incarnation,
                "heartbeat": m.info.heartbeat,
                "holdings_version": m.info.holdings_version,
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

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    def reload(self, new: Config) -> list[str]:
        """SIGHUP: apply what can change at run time; return the keys that need a restart."""
        changed = {k for k, v in flatten(new).items() if flatten(self.cfg)[k] != v}
        if "store.cache_dir" in changed:  # the file and the flag call it cache_dir
            changed = (changed - {"store.cache_dir"}) | {"cache_dir"}
        restart = sorted(changed - RELOADABLE)
        applied = sorted(changed & RELOADABLE)
        if "log.level" in changed:
            set_level(new.log.level)
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
        log.info(
            "configuration reloaded applied=%s needs_restart=%s", ",".join(applied) or "-", ",".join(restart) or "-"
        )
        notify(f"STATUS=reloaded; restart needed for: {', '.join(restart)}" if restart else "STATUS=reloaded")
        return restart


def cluster_token(cfg: Config) -> str | None:
    path = cfg.cluster.token_file
    if path is None:
        return None
    return read_secret(path, "cluster.token_file", min_chars=MIN_TOKEN_CHARS)


def file_policy(cfg: Config) -> FilePolicy:
    """file:// imports: the configured roots, never the daemon's own files or store."""
    secrets = (
        DEFAULT_CONFIG_FILE,
        cfg.cluster.token_file,
        cfg.api.admin_token_file,
        cfg.origins.hf.token_file,
        cfg.origins.modelscope.token_file,
        cfg.peer.tls_cert_file,
        cfg.peer.tls_key_file,
        cfg.peer.tls_ca_file,
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
        return read_secret(path, "origins.hf.token_file") or None
    return env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None


def modelscope_token(cfg: Config, env: dict[str, str]) -> str | None:
    """The ModelScope token: origins.modelscope.token_file, else $MODELSCOPE_API_TOKEN (as the SDK reads it)."""
    path = cfg.origins.modelscope.token_file
    if path is not None:
        return read_secret(path, "origins.modelscope.token_file") or None
    return env.get("MODELSCOPE_API_TOKEN") or None


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
    p.add_argument("--s3-endpoint", dest="origins.s3.endpoint_url", metavar="URL")
    p.add_argument("--modelscope-endpoint", dest="origins.modelscope.endpoint", metavar="URL")
    p.add_argument("--oci-plain-http", dest="origins.oci.plain_http", action="append", metavar="HOST:PORT")
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
