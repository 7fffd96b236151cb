"""Daemon configuration: defaults < TOML file < command-line flags, validated once and frozen.

Each component receives only its own section. Every error names the offending key
(``store.max_bytes: not a size: '12Q'``) so the daemon can exit 78 with one clear line.
Nothing here reads the environment at import time; ``load`` is handed what it needs.

Each default is written once, on its dataclass field; the table of keys a file may contain
(``_DEFAULTS``) is derived from those fields. Keys that moved keep their old name as an alias
(``MOVED_KEYS``): a file or flag may still say ``origins.http.retries``, and an error about its
value names the key as the user spelled it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from cached.errors import ConfigError
from cached.types import (
    DEFAULT_PIECE_SIZE,
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
    parse_size,
)

DEFAULT_CONFIG_FILE = Path("/etc/cached/config.toml")
DEFAULT_API_LISTEN = "127.0.0.1:7470"
DEFAULT_PEER_LISTEN = "0.0.0.0:7471"


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    """A TCP ``host:port`` or a ``unix:/path`` socket."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @classmethod
    def parse(cls, value: str, key: str) -> Listen:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "expected HOST:PORT or unix:/path")
        if value.startswith("unix:"):
            path = value[len("unix:") :]
            if not path.startswith("/"):
                raise ConfigError(key, f"unix socket path must be absolute: {value!r}")
            return cls(unix_path=path)
        host, sep, port = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(key, f"expected HOST:PORT or unix:/path, got {value!r}")
        host = host.strip("[]")
        try:
            port_n = int(port)
        except ValueError:
            raise ConfigError(key, f"port must be a number, got {port!r}") from None
        if not 0 <= port_n <= 65535:
            raise ConfigError(key, f"port out of range: {port_n}")
        return cls(host=host, port=port_n)

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerLimits:
    """What one listener (the local API or the peer API) tolerates from a connection."""

    header_timeout_s: float = 10.0  # a new connection must finish its request headers within this
    idle_timeout_s: float = 60.0  # a keep-alive connection with no request for this long is closed
    body_timeout_s: float = 60.0  # a request body must arrive within this
    max_connections: int = 1024  # open connections at once, on this listener
    # Open connections at once from one remote address (one calling uid on a unix socket). The
    # local API defaults to its global cap: every TCP caller there is 127.0.0.1, so a lower cap
    # would only throttle the launchers of this node (200 of them at once in scripts/bench_load.py).
    max_connections_per_ip: int = 1024


# The file spells this field as an octal string ("0660").
_OCTAL = {"octal": True}


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    listen: Listen = field(default_factory=lambda: Listen.parse(DEFAULT_API_LISTEN, "api.listen"))
    socket_mode: int = field(default=0o660, metadata=_OCTAL)
    # Admin routes (evict --force, pin, unpin, replicate, gc, verify) need this bearer token, or
    # a unix-socket caller that is root, the daemon's own user, or a member of admin_group.
    admin_token_file: Path | None = None
    admin_group: str = ""
    # Host header values accepted besides loopback names and the listen address (a node IP that
    # pods reach through the downward API). Anything else is refused (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()
    limits: ListenerLimits = field(default_factory=ListenerLimits)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerConfig:
    listen: Listen = field(default_factory=lambda: Listen.parse(DEFAULT_PEER_LISTEN, "peer.listen"))
    advertise: str = ""
    seeds: tuple[str, ...] = ()
    gossip_interval_s: float = 1.0
    fanout: int = 3
    suspect_after_s: float = 5.0
    dead_after_s: float = 15.0
    forget_after_s: float = 3600.0
    max_uploads: int = 16
    serve_rate_bps: int = 0  # 0 = unlimited
    stall_timeout_s: float = 10.0  # a peer that sends no byte for this long is dropped for the piece
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # set: peers must present a certificate signed by it (mutual TLS)
    limits: ListenerLimits = field(
        default_factory=lambda: ListenerLimits(max_connections=2048, max_connections_per_ip=64)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    name: str = "default"
    token_file: Path | None = None
    # Take a peer's ref -> manifest binding when the origin cannot be reached. Off by default:
    # turning it on trusts every holder of the cluster token to name what a ref contains.
    names_from_peers: bool = False
    # host:port of http(s) origins on internal addresses (loopback, link-local, ...) that the
    # catalog may still name: a model server every node reaches at that same address (tests, a
    # one-host demo). Empty: such URLs are never replicated nor taken from gossip.
    internal_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryConfig:
    mdns: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpOriginConfig:
    """How the HTTP-speaking origins (http, hf) talk to a server."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferConfig:
    """Limits of the transfer layer over every origin (formerly under ``origins.http``)."""

    connections: int = 8  # origin requests in flight for one file
    retries: int = 5  # of one failed origin request, before the fetch fails
    backoff_s: float = 0.5  # first delay between retries; doubled each time, with jitter
    backoff_max_s: float = 10.0
    max_rate_bps: int = 0  # origin download budget for the whole node; 0 = unlimited


@dataclass(frozen=True, slots=True, kw_only=True)
class FileOriginConfig:
    # file:// refs are imported only from under these directories (none by default).
    allowed_roots: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HfOriginConfig:
    endpoint: str = "https://huggingface.co"
    token_file: Path | None = None
    # Repos ("org/name") or orgs ("org") for which /hf passthrough requests that bring no token of
    # their own are sent upstream with the daemon's token. Empty: the daemon lends it to nobody.
    lend_token_to: tuple[str, ...] = ()
    # Re-resolve branch/tag hf:// models this often and fetch what changed; 0 = only on --refresh.
    refresh_interval_s: float = 0.0
    # A first request through /hf for a commit of a repo also prefetches the whole commit in the
    # background (low priority); off: /hf fetches only the files clients ask for.
    prefetch_on_pull: bool = False


S3_ADDRESSING_STYLES = ("auto", "path", "virtual")


@dataclass(frozen=True, slots=True, kw_only=True)
class S3OriginConfig:
    """s3:// refs. Empty values fall back to the AWS environment (AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, ...), read by the origin, not here."""

    endpoint_url: str = ""
    region: str = ""
    addressing_style: str = "auto"  # auto, path or virtual
    profile: str = ""  # a profile of the shared AWS config/credentials files
    anonymous: bool = False  # unsigned requests (public buckets)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelScopeOriginConfig:
    endpoint: str = "https://www.modelscope.cn"
    token_file: Path | None = None  # else MODELSCOPE_API_TOKEN


@dataclass(frozen=True, slots=True, kw_only=True)
class OciOriginConfig:
    plain_http: tuple[str, ...] = ()  # HOST:PORT of registries spoken to over plain HTTP
    default_registry: str = ""  # upstream of /v2 mirror requests that carry no ?ns=
    auth_file: Path | None = None  # a Docker-style config.json with registry credentials
    tag_ttl_s: float = 30.0  # how long the mirror reuses a tag's upstream answer
    # Unpacking an archive layer (a modelcar) may write at most this many times the layer's size
    # (0: no ratio cap) and at most max_unpacked_bytes (0: none); always within the store's room.
    max_unpack_ratio: float = 100.0
    max_unpacked_bytes: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OriginsConfig:
    http: HttpOriginConfig = field(default_factory=HttpOriginConfig)
    hf: HfOriginConfig = field(default_factory=HfOriginConfig)
    file: FileOriginConfig = field(default_factory=FileOriginConfig)
    s3: S3OriginConfig = field(default_factory=S3OriginConfig)
    modelscope: ModelScopeOriginConfig = field(default_factory=ModelScopeOriginConfig)
    oci: OciOriginConfig = field(default_factory=OciOriginConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    cache_dir: Path = Path("/var/cache/cached")  # the file names it at the top level, not under [store]
    max_bytes: int | None = None  # None: 90% of the filesystem holding cache_dir
    piece_size_bytes: int = DEFAULT_PIECE_SIZE
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    scrub_interval_s: float = 7 * 86400  # a full re-hash of the store this often; 0 = off
    scrub_rate_bps: int = 64 << 20  # how fast the scrub reads, to leave the disk to launchers


@dataclass(frozen=True, slots=True, kw_only=True)
class JobsConfig:
    max_concurrent: int = 4
    # A failed prefetch leaves `ls` (GET /v1/models) this long after it failed; ?all=1 still
    # lists it. 0 = listed until prefetched again or evicted.
    failed_ttl_s: float = 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    node_id: str
    labels: Mapping[str, str]
    api: ApiConfig
    peer: PeerConfig
    cluster: ClusterConfig
    discovery: DiscoveryConfig
    origins: OriginsConfig
    transfer: TransferConfig
    store: StoreConfig
    jobs: JobsConfig
    log: LogConfig


def _file_form(value: Any, *, octal: bool = False) -> Any:
    """A default as a TOML file spells it: sections as tables, tuples as lists, paths and
    addresses as strings."""
    if isinstance(value, (Path, Listen)):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {
            f.name: _file_form(getattr(value, f.name), octal=bool(f.metadata.get("octal")))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, (tuple, list)):
        return [_file_form(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _file_form(v) for k, v in value.items()}
    if octal:
        return f"{value:04o}"
    return value


def _file_defaults() -> dict[str, Any]:
    sections = {name: t for name, t in get_type_hints(Config).items() if dataclasses.is_dataclass(t)}
    tree = {name: _file_form(t()) for name, t in sections.items()}
    cache_dir = tree["store"].pop("cache_dir")
    # node_id: unset means the host name; labels: a free-form table (see _FREEFORM).
    return {"node_id": None, "labels": {}, "cache_dir": cache_dir, **tree}


# Every key the file may contain, with its default. Anything else is a typo and an error.
_DEFAULTS: dict[str, Any] = _file_defaults()

# Old name -> new name of keys that moved. The old name stays accepted in files and flags.
MOVED_KEYS: Mapping[str, str] = {f"origins.http.{k}": f"transfer.{k}" for k in _DEFAULTS["transfer"]}


# Tables whose keys are the user's own (node labels): taken whole, never checked key by key.
_FREEFORM = frozenset({"labels"})


def _merge(base: dict[str, Any], over: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(dotted, "unknown key")
        if isinstance(base[key], dict) and dotted not in _FREEFORM:
            if not isinstance(value, Mapping):
                raise ConfigError(dotted, "expected a table")
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ConfigError(dotted, "unknown key")
    if leaf not in node:
        raise ConfigError(dotted, "unknown key")
    if isinstance(node[leaf], dict) and dotted not in _FREEFORM:
        raise ConfigError(dotted, "is a table; name one of its keys")
    node[leaf] = value


def read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError("--config", f"{path}: {e.strerror}") from None


def load(file: Path | None, flags: Mapping[str, Any], *, default_file: Path = DEFAULT_CONFIG_FILE) -> Config:
    """Build the frozen Config. ``flags`` maps dotted keys (``store.max_bytes``) to values."""
    tree: dict[str, Any] = _deep_copy(_DEFAULTS)
    spelled: dict[str, str] = {}  # new key -> the old name its value was given under
    path = file if file is not None else (default_file if default_file.exists() else None)
    if path is not None:
        _merge(tree, _move_old_names(read_file(path), spelled))
    for dotted, value in flags.items():
        if value is not None:
            new = MOVED_KEYS.get(dotted, dotted)
            spelled.pop(new, None)
            if new != dotted:
                spelled[new] = dotted
            _set_dotted(tree, new, value)
    return _build(tree, spelled)


def _move_old_names(data: dict[str, Any], spelled: dict[str, str]) -> dict[str, Any]:
    """A file's tree with moved keys under their new names; both names at once is an error."""
    origins = data.get("origins")
    http = origins.get("http") if isinstance(origins, dict) else None
    if not isinstance(http, dict):
        return data  # nothing moved, or a malformed table that _merge reports
    for old in [f"origins.http.{k}" for k in http if f"origins.http.{k}" in MOVED_KEYS]:
        new = MOVED_KEYS[old]
        section, key = new.split(".")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(section, "expected a table")
        if key in target:
            raise ConfigError(old, f"also set as {new}, its new name; keep one")
        target[key] = http.pop(key)
        spelled[new] = old
    return data


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_deep_copy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v)) for k, v in d.items()
    }


def _typed(value: Any, typ: type | tuple[type, ...], key: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise ConfigError(key, f"expected {what}, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(key, f"expected {what}, got {value!r}")
    return value


def _number(value: Any, key: str, *, lo: float, hi: float, integer: bool = False) -> Any:
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {value!r}") from None
    _typed(value, int if integer else (int, float), key, "an integer" if integer else "a number")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be between {lo:g} and {hi:g}, got {value}")
    return value


def _size(value: Any, key: str) -> int:
    try:
        return parse_size(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(e)) from None


def _optional_path(value: Any, key: str) -> Path | None:
    if value in (None, ""):
        return None
    _typed(value, str, key, "a path")
    return Path(value)


def _advertise(value: Any) -> str:
    _typed(value, str, "peer.advertise", "HOST:PORT")
    if value:
        if Listen.parse(value, "peer.advertise").unix_path:
            raise ConfigError("peer.advertise", "must be HOST:PORT that peers can reach, not a unix socket")
    return value


def _limits(t: dict[str, Any], section: str) -> ListenerLimits:
    k = f"{section}.limits"
    return ListenerLimits(
        header_timeout_s=_number(t["header_timeout_s"], f"{k}.header_timeout_s", lo=0.1, hi=3600),
        idle_timeout_s=_number(t["idle_timeout_s"], f"{k}.idle_timeout_s", lo=0.1, hi=86400),
        body_timeout_s=_number(t["body_timeout_s"], f"{k}.body_timeout_s", lo=0.1, hi=86400),
        max_connections=_number(t["max_connections"], f"{k}.max_connections", lo=1, hi=1 << 20, integer=True),
        max_connections_per_ip=_number(
            t["max_connections_per_ip"], f"{k}.max_connections_per_ip", lo=1, hi=1 << 20, integer=True
        ),
    )


def _strings(value: Any, key: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _typed(value, (list, tuple), key, what)
    for v in value:
        if not isinstance(v, str) or not v or len(v) > 1024:
            raise ConfigError(key, f"expected {what}, got {v!r}")
    return tuple(value)


def _allowed_roots(value: Any) -> tuple[Path, ...]:
    roots = []
    for v in _strings(value, "origins.file.allowed_roots", "a list of absolute directories"):
        if not os.path.isabs(v):
            raise ConfigError("origins.file.allowed_roots", f"must be absolute directories, got {v!r}")
        roots.append(Path(os.path.normpath(v)))
    return tuple(roots)


def _url(value: Any, key: str, *, empty: bool = False) -> str:
    url = _typed(value, str, key, "a URL")
    if not (empty and not url) and not url.startswith(("http://", "https://")):
        raise ConfigError(key, f"must be an http(s) URL, got {url!r}")
    return url.rstrip("/")


def _s3(t: Mapping[str, Any]) -> S3OriginConfig:
    style = _typed(t["addressing_style"], str, "origins.s3.addressing_style", "auto, path or virtual")
    if style not in S3_ADDRESSING_STYLES:
        raise ConfigError("origins.s3.addressing_style", f"must be auto, path or virtual, got {style!r}")
    return S3OriginConfig(
        endpoint_url=_url(t["endpoint_url"], "origins.s3.endpoint_url", empty=True),
        region=_typed(t["region"], str, "origins.s3.region", "a region name"),
        addressing_style=style,
        profile=_typed(t["profile"], str, "origins.s3.profile", "a profile name"),
        anonymous=_typed(t["anonymous"], bool, "origins.s3.anonymous", "true or false"),
    )


def _modelscope(t: Mapping[str, Any]) -> ModelScopeOriginConfig:
    return ModelScopeOriginConfig(
        endpoint=_url(t["endpoint"], "origins.modelscope.endpoint"),
        token_file=_optional_path(t["token_file"], "origins.modelscope.token_file"),
    )


def _oci(t: Mapping[str, Any]) -> OciOriginConfig:
    plain = _strings(t["plain_http"], "origins.oci.plain_http", "a list of HOST:PORT")
    for v in plain:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError("origins.oci.plain_http", f"expected HOST:PORT, got {v!r}")
    registry = _typed(t["default_registry"], str, "origins.oci.default_registry", "a registry HOST[:PORT]")
    if "/" in registry or registry.startswith(("http:", "https:")):
        raise ConfigError("origins.oci.default_registry", f"expected a registry HOST[:PORT], got {registry!r}")
    return OciOriginConfig(
        plain_http=plain,
        default_registry=registry,
        auth_file=_optional_path(t["auth_file"], "origins.oci.auth_file"),
        tag_ttl_s=_number(t["tag_ttl_s"], "origins.oci.tag_ttl_s", lo=0, hi=86400),
        max_unpack_ratio=_number(t["max_unpack_ratio"], "origins.oci.max_unpack_ratio", lo=0, hi=1e6),
        max_unpacked_bytes=_size(t["max_unpacked_bytes"], "origins.oci.max_unpacked_bytes"),
    )


def _lend_token_to(value: Any) -> tuple[str, ...]:
    out = _strings(value, "origins.hf.lend_token_to", "a list of 'org' or 'org/name'")
    for v in out:
        parts = v.split("/")
        if len(parts) > 2 or not all(parts):
            raise ConfigError("origins.hf.lend_token_to", f"expected 'org' or 'org/name', got {v!r}")
    return out


def _peer(p: dict[str, Any], seeds: list[str]) -> PeerConfig:
    interval = _number(p["gossip_interval_s"], "peer.gossip_interval_s", lo=0.05, hi=600)
    suspect = _number(p["suspect_after_s"], "peer.suspect_after_s", lo=0.1, hi=3600)
    dead = _number(p["dead_after_s"], "peer.dead_after_s", lo=0.2, hi=86400)
    if not interval < suspect < dead:
        raise ConfigError(
            "peer.dead_after_s",
            f"need gossip_interval_s < suspect_after_s < dead_after_s ({interval} < {suspect} < {dead})",
        )
    cert = _optional_path(p["tls_cert_file"], "peer.tls_cert_file")
    key = _optional_path(p["tls_key_file"], "peer.tls_key_file")
    if (cert is None) != (key is None):
        raise ConfigError("peer.tls_key_file", "tls_cert_file and tls_key_file go together")
    ca = _optional_path(p["tls_ca_file"], "peer.tls_ca_file")
    if ca is not None and cert is None:
        raise ConfigError("peer.tls_ca_file", "mutual TLS needs tls_cert_file and tls_key_file too")
    return PeerConfig(
        listen=Listen.parse(p["listen"], "peer.listen"),
        advertise=_advertise(p["advertise"]),
        seeds=tuple(seeds),
        gossip_interval_s=interval,
        fanout=_number(p["fanout"], "peer.fanout", lo=1, hi=64, integer=True),
        suspect_after_s=suspect,
        dead_after_s=dead,
        forget_after_s=_number(p["forget_after_s"], "peer.forget_after_s", lo=0, hi=30 * 86400),
        max_uploads=_number(p["max_uploads"], "peer.max_uploads", lo=1, hi=1024, integer=True),
        serve_rate_bps=_size(p["serve_rate_bps"], "peer.serve_rate_bps"),
        stall_timeout_s=_number(p["stall_timeout_s"], "peer.stall_timeout_s", lo=0.1, hi=3600),
        tls_cert_file=cert,
        tls_key_file=key,
        tls_ca_file=ca,
        limits=_limits(p["limits"], "peer"),
    )


def _transfer(t: dict[str, Any], spelled: Mapping[str, str]) -> TransferConfig:
    def key(name: str) -> str:
        return spelled.get(f"transfer.{name}", f"transfer.{name}")

    return TransferConfig(
        connections=_number(t["connections"], key("connections"), lo=1, hi=64, integer=True),
        retries=_number(t["retries"], key("retries"), lo=0, hi=100, integer=True),
        backoff_s=_number(t["backoff_s"], key("backoff_s"), lo=0, hi=600),
        backoff_max_s=_number(t["backoff_max_s"], key("backoff_max_s"), lo=0, hi=3600),
        max_rate_bps=_size(t["max_rate_bps"], key("max_rate_bps")),
    )


def _build(t: dict[str, Any], spelled: Mapping[str, str] | None = None) -> Config:
    node_id = t["node_id"] or socket.gethostname()
    _typed(node_id, str, "node_id", "a string")
    if not node_id or len(node_id) > 253 or any(c.isspace() or ord(c) < 0x20 for c in node_id):
        raise ConfigError("node_id", f"must be a non-empty name without spaces, got {node_id!r}")

    cache_dir = _typed(t["cache_dir"], str, "cache_dir", "a path")
    if not os.path.isabs(cache_dir):
        raise ConfigError("cache_dir", f"must be an absolute path, got {cache_dir!r}")

    mode = t["api"]["socket_mode"]
    try:
        socket_mode = int(mode, 8) if isinstance(mode, str) else int(mode)
    except (ValueError, TypeError):
        raise ConfigError("api.socket_mode", f"expected an octal mode like '0660', got {mode!r}") from None

    seeds = t["peer"]["seeds"]
    if isinstance(seeds, str):
        seeds = [seeds]
    _typed(seeds, (list, tuple), "peer.seeds", "a list of HOST:PORT")
    for s in seeds:
        Listen.parse(s, "peer.seeds")

    cluster_name = _typed(t["cluster"]["name"], str, "cluster.name", "a string")
    if not cluster_name or len(cluster_name) > 63:
        raise ConfigError("cluster.name", "must be 1..63 characters")

    endpoint = _typed(t["origins"]["hf"]["endpoint"], str, "origins.hf.endpoint", "a URL")
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError("origins.hf.endpoint", f"must be an http(s) URL, got {endpoint!r}")

    h = t["origins"]["http"]
    http = HttpOriginConfig(
        connect_timeout_s=_number(h["connect_timeout_s"], "origins.http.connect_timeout_s", lo=0.1, hi=600),
        read_timeout_s=_number(h["read_timeout_s"], "origins.http.read_timeout_s", lo=0.1, hi=3600),
    )

    s = t["store"]
    max_bytes = None if s["max_bytes"] in (None, "", 0) else _size(s["max_bytes"], "store.max_bytes")
    piece = _size(s["piece_size_bytes"], "store.piece_size_bytes")
    if not MIN_PIECE_SIZE <= piece <= MAX_PIECE_SIZE:
        raise ConfigError("store.piece_size_bytes", f"must be between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE}")
    high = _number(s["high_watermark"], "store.high_watermark", lo=0.1, hi=1.0)
    low = _number(s["low_watermark"], "store.low_watermark", lo=0.05, hi=1.0)
    if low > high:
        raise ConfigError("store.low_watermark", f"must not exceed store.high_watermark ({low} > {high})")

    fmt = t["log"]["format"]
    if fmt not in ("text", "json"):
        raise ConfigError("log.format", f"must be text or json, got {fmt!r}")
    level = str(t["log"]["level"]).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"must be debug, info, warning or error, got {level!r}")

    labels = t["labels"]
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ConfigError("labels", 'expected a table of strings, e.g. labels = { gpu = "h100" }')
    if len(labels) > MAX_LABELS or not all(
        0 < len(k) <= MAX_LABEL_KEY_CHARS and len(v) <= MAX_LABEL_VALUE_CHARS for k, v in labels.items()
    ):
        raise ConfigError(
            "labels",
            f"at most {MAX_LABELS} labels, keys of 1..{MAX_LABEL_KEY_CHARS} and values of at most "
            f"{MAX_LABEL_VALUE_CHARS} characters (peers refuse a member with more)",
        )
    return Config(
        node_id=node_id,
        labels=dict(labels),
        api=ApiConfig(
            listen=Listen.parse(t["api"]["listen"], "api.listen"),
            socket_mode=socket_mode,
            admin_token_file=_optional_path(t["api"]["admin_token_file"], "api.admin_token_file"),
            admin_group=_typed(t["api"]["admin_group"], str, "api.admin_group", "a group name"),
            allowed_hosts=_strings(t["api"]["allowed_hosts"], "api.allowed_hosts", "a list of host names"),
            limits=_limits(t["api"]["limits"], "api"),
        ),
        peer=_peer(t["peer"], seeds),
        cluster=ClusterConfig(
            name=cluster_name,
            token_file=_optional_path(t["cluster"]["token_file"], "cluster.token_file"),
            names_from_peers=_typed(
                t["cluster"]["names_from_peers"], bool, "cluster.names_from_peers", "true or false"
            ),
            internal_origins=_strings(
                t["cluster"]["internal_origins"], "cluster.internal_origins", "a list of HOST:PORT"
            ),
        ),
        discovery=DiscoveryConfig(mdns=_typed(t["discovery"]["mdns"], bool, "discovery.mdns", "true or false")),
        origins=OriginsConfig(
            http=http,
            hf=HfOriginConfig(
                endpoint=endpoint.rstrip("/"),
                token_file=_optional_path(t["origins"]["hf"]["token_file"], "origins.hf.token_file"),
                refresh_interval_s=_number(
                    t["origins"]["hf"]["refresh_interval_s"], "origins.hf.refresh_interval_s", lo=0, hi=30 * 86400
                ),
                lend_token_to=_lend_token_to(t["origins"]["hf"]["lend_token_to"]),
                prefetch_on_pull=_typed(
                    t["origins"]["hf"]["prefetch_on_pull"], bool, "origins.hf.prefetch_on_pull", "true or false"
                ),
            ),
            file=FileOriginConfig(allowed_roots=_allowed_roots(t["origins"]["file"]["allowed_roots"])),
            s3=_s3(t["origins"]["s3"]),
            modelscope=_modelscope(t["origins"]["modelscope"]),
            oci=_oci(t["origins"]["oci"]),
        ),
        transfer=_transfer(t["transfer"], spelled or {}),
        store=StoreConfig(
            cache_dir=Path(cache_dir),
            max_bytes=max_bytes,
            piece_size_bytes=piece,
            high_watermark=high,
            low_watermark=low,
            scrub_interval_s=_number(s["scrub_interval_s"], "store.scrub_interval_s", lo=0, hi=365 * 86400),
            scrub_rate_bps=_size(s["scrub_rate_bps"], "store.scrub_rate_bps"),
        ),
        jobs=JobsConfig(
            max_concurrent=_number(t["jobs"]["max_concurrent"], "jobs.max_concurrent", lo=1, hi=64, integer=True),
            failed_ttl_s=_number(t["jobs"]["failed_ttl_s"], "jobs.failed_ttl_s", lo=0, hi=365 * 86400),
        ),
        log=LogConfig(format=fmt, level=level),
    )


MIN_TOKEN_CHARS = 16


def read_secret(path: Path, key: str, *, min_chars: int = 0) -> str:
    """A token from a file the operator named (read once, at start); errors name the key."""
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ConfigError(key, f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: not a text file") from None
    if min_chars and (len(token) < min_chars or not token.isascii() or not token.isprintable()):
        raise ConfigError(key, f"{path}: the token must be at least {min_chars} printable ASCII characters")
    return token
