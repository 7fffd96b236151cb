"""Hostile input on every route of a real daemon: no 5xx, no traceback, nothing outside the cache.

Property-based (hypothesis, bounded and derandomized) over every local API route -- ``/v1/*``,
``/v1/k8s/*``, ``/metrics``, ``/healthz``, ``/readyz`` and the HF endpoint ``/hf/...`` -- and every
peer API route (with the cluster token): traversal refs (``file:///../..``, ``hf://../../x``,
``hf://org/..``), percent-encoded and NUL-carrying paths, lone surrogates, invalid UTF-8, deep
JSON nesting, absurd ``Range`` headers. Requests go over a raw socket, so nothing normalizes
them on the way. Every answer must be below 500, carry no Python traceback, and never contain the
canary: a file in a sentinel directory beside the cache dir, which the daemon must never serve,
modify, or write beside. After each run the tree around the cache dir is compared with a snapshot
taken before: same files, same bytes, nothing new.

Explicit tables complete the picture: 10 MiB bodies (413 on every route that reads a body),
``Range`` edge cases on ``/hf/.../resolve`` and on peer blobs, ``../`` in ``/hf`` resolve paths.
Last, a launcher of a model that is ready gets it at once, with its path, even while other
downloads hold every job slot. Peer API authentication (401 without the token) is covered by
``test_peer_api.py``.

Network safety: every ref a test sends that could make the daemon fetch names 127.0.0.1 (the test
origin or the hub double) or a path that does not exist; member addresses in gossip are closed
loopback ports. Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from yarl import URL

from cached.api.client import ApiClient
from cached.daemon import Daemon
from cached.peers.auth import sign_request
from cached.types import ModelRef, RefKind
from tests.support.hfclients import tiny_model_files
from tests.support.hub import Hub
from tests.support.node import ADMIN_TOKEN, running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.peerauth import key, signed
from tests.support.wait import wait_until

TOKEN = "hostile-input-cluster-token-0123456789"
HF_REPO = "acme/tiny"
PIECE = 64 * 1024
CLOSED = "127.0.0.1:9"  # discard port: refused at once
TEN_MIB = 10 << 20
REQUEST_TIMEOUT_S = 20.0
LOCAL_EXAMPLES = 1200
PEER_EXAMPLES = 600
TRACEBACK = re.compile(rb"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|\bline \d+, in \w+")


# --- the sandbox: cache dir, sentinel beside it, snapshot -----------------------------------------


@dataclass
class Sandbox:
    """``root/cache`` for the daemon; ``root/sentinel/canary.txt`` (and everything else under
    ``root``) must come out of the run byte for byte as it went in."""

    root: Path
    secret: str = field(default_factory=lambda: "CANARY-" + secrets.token_hex(16))

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def sentinel(self) -> Path:
        return self.root / "sentinel"

    @property
    def canary(self) -> Path:
        return self.sentinel / "canary.txt"

    def prepare(self) -> None:
        self.sentinel.mkdir(parents=True)
        self.canary.write_text(f"{self.secret}\n")
        (self.sentinel / "weights.safetensors").write_bytes(self.secret.encode() * 64)
        (self.root / "token").write_text(TOKEN)

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Every path under ``root`` except the cache dir: kind, mode, size, mtime, content hash."""
        out: dict[str, tuple[Any, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if here / d != self.cache]
            for name in dirnames + filenames:
                p = here / name
                st_ = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
                out[str(p.relative_to(self.root))] = (
                    st_.st_mode,
                    st_.st_size if p.is_file() else 0,
                    st_.st_mtime_ns,
                    digest,
                )
        return out

    def assert_untouched(self, before: dict[str, tuple[Any, ...]]) -> None:
        after = self.snapshot()
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
        assert not (added or removed or changed), (
            f"outside the cache dir: added={added} removed={removed} changed={changed}"
        )
        assert self.canary.read_text() == f"{self.secret}\n"


# --- a raw HTTP/1.1 client: nothing normalizes what we send ---------------------------------------


@dataclass
class Reply:
    status: int
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                return v.strip().decode("latin-1")
        return None


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            return bytes(data)
        if size == 0:
            break
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)


def encode_target(target: str | bytes) -> bytes:
    # surrogatepass: a lone surrogate becomes the invalid UTF-8 bytes it would be, on purpose.
    return target if isinstance(target, bytes) else target.encode("utf-8", "surrogatepass")


def http(
    address: str,
    method: str,
    target: str | bytes,
    *,
    headers: list[tuple[str, bytes | str]] = (),  # type: ignore[assignment]
    body: bytes | None = None,
    stream: bool = False,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Reply:
    """One request on a fresh connection to ``HOST:PORT`` (loopback). ``stream``: headers only."""
    host, _, port = address.rpartition(":")
    assert host.startswith("127."), address
    lines = [
        encode_target(method) + b" " + encode_target(target) + b" HTTP/1.1",
        b"Host: " + address.encode(),
        b"Connection: close",
    ]
    for k, v in headers:
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")))
    if body is not None:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    request = b"\r\n".join(lines) + b"\r\n\r\n"
    deadline = time.monotonic() + timeout_s
    data = bytearray()
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        try:
            s.sendall(request)
            if body:
                view = memoryview(body)
                for off in range(0, len(body), 1 << 16):
                    s.sendall(view[off : off + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (413) and stopped reading: read what it said
        try:
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                if stream and b"\r\n\r\n" in data:
                    break
        except ConnectionResetError:
            pass
        except TimeoutError:
            if not stream:
                raise AssertionError(f"no complete answer within {timeout_s}s: {method} {target!r}") from None
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    status = int(m.group(1)) if m else 0
    reply = Reply(status, head, rest)
    if (reply.header("Transfer-Encoding") or "").lower() == "chunked":
        reply.body = _dechunk(rest)
    return reply


@dataclass
class Findings:
    """What went wrong, one line per distinct problem (the run goes on to find more)."""

    sandbox: Sandbox
    problems: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def check(self, route: str, what: str, reply: Reply, *, json_errors: bool = False) -> None:
        """``route``: the route template, so one problem on one route is reported once."""
        self.requests += 1
        self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1
        wrong = []
        if reply.status == 0:
            wrong.append("no HTTP answer")
        if reply.status >= 500:
            wrong.append(f"status {reply.status}")
        if TRACEBACK.search(reply.head) or TRACEBACK.search(reply.body):
            wrong.append("a Python traceback in the answer")
        if self.sandbox.secret.encode() in reply.head or self.sandbox.secret.encode() in reply.body:
            wrong.append("served the canary from outside the cache dir")
        if (
            json_errors
            and not what.startswith("HEAD")
            and 400 <= reply.status < 500
            and (reply.header("Content-Type") or "").startswith("application/json")
        ):
            try:
                doc = json.loads(reply.body)
                if not (
                    isinstance(doc, dict) and isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str)
                ):
                    wrong.append("error body is not {error, message}")
            except ValueError:
                wrong.append("error body is not JSON")
        if wrong:
            self.problems.setdefault(
                f"{'; '.join(wrong)} <- {route}",
                f"{'; '.join(wrong)} on {route}: {what[:300]} -> {reply.status} {reply.body[:300]!r}",
            )

    def assert_clean(self) -> None:
        assert not self.problems, f"{len(self.problems)} distinct problem(s):\n" + "\n".join(
            sorted(self.problems.values())[:15]
        )


# --- the node under attack -------------------------------------------------------------------------


@dataclass
class Target:
    d: Daemon
    sandbox: Sandbox
    origin: Origin
    hub: Hub
    api: str  # 127.0.0.1:PORT
    peer: str
    model_ref: str  # an http model, ready
    blob: str  # its blob id
    manifest: str  # its manifest digest
    hf_blob: str  # the blob of HF_REPO's config.json
    lease_id: str

    def safe_ref(self, ref: str) -> str:
        return safe_ref(ref, self.origin.port)


def safe_ref(ref: str, origin_port: int) -> str:
    """``ref`` if sending it cannot make the daemon reach beyond 127.0.0.1 or read a real path;
    else a ref of the same kind that fails fast and locally (hf refs go to the loopback hub)."""
    try:
        parsed = ModelRef.parse(ref)
    except Exception:  # noqa: BLE001 - refused before any I/O: that is what is under test
        return ref
    tag = zlib.crc32(ref.encode("utf-8", "surrogatepass")) % 1000
    if parsed.kind is RefKind.HTTP and (URL(parsed.url).host, URL(parsed.url).port) not in (
        ("127.0.0.1", origin_port),
        ("127.0.0.1", 9),
    ):
        return f"http://127.0.0.1:{origin_port}/missing-{tag}.bin"
    if parsed.kind is RefKind.FILE and os.path.lexists(parsed.path):
        return f"file:///nonexistent-cached-hostile/{tag}"
    return ref


@contextlib.asynccontextmanager
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    sb = Sandbox(tmp_path)
    sb.prepare()
    write_random_file(tmp_path / "origin" / "model.bin", 3 * PIECE + 17, seed=71)
    async with Origin(tmp_path / "origin") as origin, Hub() as hub:
        hub.add_repo(HF_REPO, tiny_model_files(weights_size=100_000, seed=7))
        flags = {
            "node_id": "victim",
            "cluster.token_file": str(sb.root / "token"),
            "origins.hf.endpoint": hub.url,
            "store.piece_size_bytes": "64K",
            "peer.seeds": [CLOSED],
        }
        async with running_daemon(sb.cache, **flags) as d, ApiClient(d.api_address) as api:
            model = await api.request("POST", "/v1/prefetch", body={"ref": origin.file_url("model.bin"), "wait": True})
            hf_model = await api.request("POST", "/v1/prefetch", body={"ref": f"hf://{HF_REPO}", "wait": True})
            assert model["state"] == hf_model["state"] == "ready", (model, hf_model)
            lease = await api.request(
                "POST", "/v1/leases", body={"ref": model["ref"], "holder": "hostile-test", "ttl_s": 600}
            )
            manifest = d.store.manifest(model["manifest"].removeprefix("blake3:"))
            hf_manifest = d.store.manifest(hf_model["manifest"].removeprefix("blake3:"))
            assert manifest is not None and hf_manifest is not None
            hf_blob = next(f.blob.hex for f in hf_manifest.files if f.path == "config.json")
            yield Target(
                d=d,
                sandbox=sb,
                origin=origin,
                hub=hub,
                api=d.api_address.removeprefix("http://"),
                peer=d.peer_address or "",
                model_ref=model["ref"],
                blob=manifest.files[0].blob.hex,
                manifest=manifest.digest,
                hf_blob=hf_blob,
                lease_id=lease["lease_id"],
            )


async def attack(t: Target, run: Callable[[], None]) -> None:
    """Snapshot, run the (blocking) attack in a worker thread while the daemon serves, compare."""
    before = t.sandbox.snapshot()
    await asyncio.to_thread(run)
    async with ApiClient(t.d.api_address) as api:
        assert await api.request("GET", "/healthz") == {"status": "ok"}, "the daemon survives"
    t.sandbox.assert_untouched(before)


# --- strategies --------------------------------------------------------------------------------------


def hostile_refs(sb: Sandbox, origin_port: int) -> list[str]:
    o = f"http://127.0.0.1:{origin_port}"
    cache, sentinel = sb.cache, sb.sentinel
    return [
        "file:///../..",
        "file:///../../etc/passwd",
        "file:///..",
        "file://../../x",
        "file:////etc/../..",
        "file:///%2e%2e/%2e%2e/etc",
        "file:///%2E%2E%2F%2E%2E%2Fetc",
        "file:///nonexistent/%00/x",
        "file:///nonexistent\x00/x",
        f"file://{cache}/../sentinel/canary.txt",
        f"file://{cache}/../sentinel",
        f"file://{sentinel}/../../..",
        f"file://{cache}/%2e%2e/sentinel",
        f"file://{cache}/./../sentinel/canary.txt",
        "file:///tmp/\ud800",
        "file:///\udfff",
        "hf://../../x",
        "hf://org/..",
        "hf://../org",
        "hf://org/name/../../x",
        "hf://org/..%2f..",
        "hf://%2e%2e/x",
        "hf://org/name@..",
        "hf://org/name@../../x",
        "hf://org/name@refs/../../x",
        "hf://org/name@main/..",
        "hf://org\x00/name",
        f"hf://{HF_REPO}\x00",
        f"hf://{HF_REPO}@main\x00",
        f"hf://{HF_REPO}?include=../../*",
        f"hf://{HF_REPO}?include=%2e%2e/*",
        f"hf://{HF_REPO}?include=/etc/*",
        f"hf://{HF_REPO}?exclude=*&include=..",
        "hf://\ud800/x",
        "hf://org/\udfff",
        f"hf://{HF_REPO}",
        f"hf://{HF_REPO}@main",
        "hf://acme/nope",
        "hf://acme--x/y",
        "hf://org/name.git",
        f"{o}/../../sentinel/canary.txt",
        f"{o}/%2e%2e/%2e%2e/x.bin",
        f"{o}/a%00b.bin",
        f"{o}/model.bin",
        f"{o}/\ud800.bin",
        f"{o}/model.bin#../../x",
        f"{o}/model.bin?x=../..",
        f"http://{CLOSED}/x.bin",
        "http://127.0.0.1:99999/x.bin",
        "",
        " ",
        "\x00",
        "\ud800",
        "\x7f",
        "x" * 5000,
        "hf://" + "a" * 300 + "/b",
        "file:///" + "a/" * 3000,
    ]


def local_routes(t: Target) -> list[tuple[str, str]]:
    """(method, target template): {q} a query value, {s} one path segment, {p} a path."""
    return [
        ("POST", "/v1/prefetch"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/status?ref={q}"),
        ("POST", "/v1/evict"),
        ("POST", "/v1/pin"),
        ("POST", "/v1/unpin"),
        ("GET", "/v1/leases"),
        ("POST", "/v1/leases"),
        ("DELETE", "/v1/leases/{s}"),
        ("POST", "/v1/leases/{s}/renew"),
        ("POST", "/v1/verify"),
        ("POST", "/v1/gc"),
        ("GET", "/v1/node"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/peers"),
        ("GET", "/v1/locate?ref={q}"),
        ("GET", "/v1/events?ref={q}"),
        ("GET", "/v1/events"),
        ("POST", "/v1/replicate"),
        ("GET", "/v1/catalog"),
        ("POST", "/v1/k8s/filter"),
        ("POST", "/v1/k8s/prioritize"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/cluster"),
        ("GET", "/ui"),
        ("GET", "/ui/{s}"),
        ("GET", "/v2/"),
        ("HEAD", "/v2/"),
        ("GET", "/v2/{p}/manifests/{s}"),
        ("HEAD", "/v2/{p}/manifests/{s}"),
        ("GET", "/v2/{p}/blobs/{s}"),
        ("PUT", "/v2/{p}/manifests/{s}"),
        ("GET", "/hf/api/models/{s}/{s}"),
        ("GET", "/hf/api/models/{s}"),
        ("GET", "/hf/api/models/{s}/{s}/revision/{s}"),
        ("GET", "/hf/api/models/{s}/{s}/tree/{s}"),
        ("GET", "/hf/api/models/{s}/{s}/tree/{s}/{p}"),
        ("POST", "/hf/api/models/{s}/{s}/paths-info/{s}"),
        ("GET", "/hf/{s}/{s}/resolve/{s}/{p}"),
        ("HEAD", "/hf/{s}/{s}/resolve/{s}/{p}"),
        ("GET", "/hf/{s}/resolve/{s}/{p}"),
        ("GET", "/hf/{p}"),
        ("GET", "/{p}"),
        ("POST", "/v1/{p}"),
    ]


SEGMENTS = [
    "acme",
    "tiny",
    "main",
    "config.json",
    "model.safetensors",
    "nested",
    "..",
    ".",
    "%2e%2e",
    "%2E%2E%2F%2E%2E",
    "..%2F..%2Fsentinel",
    "%00",
    "a%00b",
    "%ff%fe",
    "%c0%ae%c0%ae",
    "%2F",
    "%5C..%5C",
    "..\\..\\",
    "~",
    "%u002e%u002e",
    "%",
    "%%",
    "%zz",
    "",
    "sentinel",
    "canary.txt",
    "refs%2Fpr%2F1",
    "0" * 40,
    "9" * 300,
    "a" * 2000,
    "\u202e",
    "\ufeff",
    "\U0001f600",
]
RANGES = [
    "bytes=-0",
    "bytes=0-0",
    "bytes=999999999999-",
    "bytes=0-999999999999",
    "bytes=0-1,3-4",
    "bytes=0-0, 5-9",
    "bytes=1-0",
    "bytes=-",
    "bytes=--1",
    "bytes=-1-2",
    "bytes=0x10-",
    "bytes= 0-1",
    "bytes=\uff11-\uff12",
    "bytes=\u0663-\u0665",
    "lines=0-1",
    "bytes=" + "9" * 5000 + "-",
    "bytes=0-" + "9" * 5000,
    "bytes=-" + "9" * 5000,
    "bytes=18446744073709551616-",
    "garbage",
    "",
]
FORM_PATHS = ["config.json", "../../sentinel/canary.txt", "..", "/", "", "nested/../../x", "\x00", "%2e%2e", "a" * 3000]


def text_bits() -> st.SearchStrategy[str]:
    # Every code point, surrogates included, biased towards the troublesome ones.
    return st.one_of(
        st.text(max_size=40),
        st.text(alphabet=st.characters(exclude_categories=()), max_size=12),
        st.sampled_from(["\x00", "\ud800", "\udfff", "\ud83d", "..", "/", "%00", "\r\n", "\t", "\\", "\u2028"]),
    )


def ref_strategy(t: Target) -> st.SearchStrategy[str]:
    prefixes = st.sampled_from(
        [
            "hf://",
            "hf://acme/",
            f"hf://{HF_REPO}@",
            "file:///nonexistent-cached-hostile/",
            f"file://{t.sandbox.cache}/",
            f"http://127.0.0.1:{t.origin.port}/",
            "",
        ]
    )
    composed = st.builds(lambda p, s: p + s, prefixes, text_bits())
    return st.one_of(st.sampled_from(hostile_refs(t.sandbox, t.origin.port)), composed, st.just(t.model_ref)).map(
        t.safe_ref
    )


def junk() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        text_bits(),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_bits(), inner, max_size=3),
        max_leaves=6,
    )


def json_bytes(value: Any) -> bytes:
    # ensure_ascii: a lone surrogate travels as a valid JSON escape (\ud800), as a client would send it.
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def local_requests(draw: st.DrawFn, t: Target) -> tuple[str, str, bytes, list[tuple[str, Any]], bytes | None, bool]:
    method, template = draw(st.sampled_from(local_routes(t)))
    if draw(st.integers(0, 19)) == 0:
        method = draw(st.sampled_from(["PUT", "PATCH", "OPTIONS", "TRACE", "BREW", "GET", "POST", "DELETE", "HEAD"]))
    refs = ref_strategy(t)
    segment = st.one_of(
        st.sampled_from(SEGMENTS + [t.lease_id]),
        text_bits().map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
    )
    parts = []
    for piece in re.split(r"(\{[qsp]\})", template):
        if piece == "{q}":
            ref = draw(refs)
            parts.append(
                quote(ref.encode("utf-8", "surrogatepass"), safe="") if draw(st.booleans()) else ref.replace(" ", "%20")
            )
        elif piece == "{s}":
            parts.append(draw(segment))
        elif piece == "{p}":
            parts.append("/".join(draw(st.lists(segment, min_size=1, max_size=5))))
        else:
            parts.append(piece)
    target = "".join(parts)
    # A target with raw whitespace or CR/LF is a different request line; keep the line one line.
    target_b = re.sub(rb"[\x00-\x20\x7f]", lambda m: b"%%%02X" % m.group(0)[0], encode_target(target))
    headers: list[tuple[str, Any]] = []
    if draw(st.booleans()):
        headers.append(("Range", draw(st.sampled_from(RANGES))))
    if draw(st.integers(0, 3)) == 0:
        headers.append(
            (
                "Authorization",
                draw(st.sampled_from(["Bearer " + TOKEN, "Bearer \x00", "Basic ..", "Bearer " + "x" * 3000])),
            )
        )
    body: bytes | None = None
    if method in ("POST", "PUT", "PATCH", "DELETE") and draw(st.integers(0, 9)) > 0:
        kind = draw(st.sampled_from(["object", "object", "object", "raw", "nested", "form", "junk"]))
        if kind == "object":
            obj: dict[str, Any] = {"ref": draw(refs)}
            for key in draw(
                st.lists(
                    st.sampled_from(
                        [
                            "wait",
                            "priority",
                            "holder",
                            "ttl_s",
                            "replicas",
                            "labels",
                            "include",
                            "exclude",
                            "timeout_s",
                            "force",
                            "refresh",
                            "NodeNames",
                            "Nodes",
                        ]
                    ),
                    max_size=4,
                    unique=True,
                )
            ):
                obj[key] = draw(junk())
            if "Pod" in template or "k8s" in template or draw(st.integers(0, 4)) == 0:
                obj["Pod"] = {
                    "metadata": {
                        "annotations": {"cached.io/model": draw(refs), "cached.io/require-local": draw(junk())}
                    }
                }
                obj["NodeNames"] = draw(st.one_of(st.lists(text_bits(), max_size=3), junk()))
            body = json_bytes(obj)
        elif kind == "raw":
            body = draw(
                st.sampled_from(
                    [
                        b"",
                        b"\xff\xfe\x00{",
                        b'{"ref": "\xff"}',
                        b"\x00" * 64,
                        b'{"ref": "a\x00b"}',
                        b"NaN",
                        b"{" * 10,
                        b'{"ref":"\\ud800"}',
                        b'{"ref": 1e999}',
                    ]
                )
            )
            body += draw(st.binary(max_size=64))
        elif kind == "nested":
            depth = draw(st.sampled_from([1_000, 50_000, 200_000]))
            body = draw(
                st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth])
            )
        elif kind == "form":
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
            body = urlencode([("paths", p) for p in draw(st.lists(st.sampled_from(FORM_PATHS), max_size=4))]).encode()
        else:
            body = json_bytes(draw(junk()))
        if kind != "form":
            headers.append(
                (
                    "Content-Type",
                    draw(
                        st.sampled_from(
                            [
                                "application/json",
                                "text/plain",
                                "multipart/form-data; boundary=x",
                                "application/x-www-form-urlencoded",
                            ]
                        )
                    ),
                )
            )
    stream = template.startswith("/v1/events")
    return f"{method} {template}", method, target_b, headers, body, stream


@st.composite
def peer_requests(draw: st.DrawFn, t: Target) -> tuple[str, str, bytes, list[tuple[str, Any]], bytes | None]:
    ids = st.one_of(
        st.sampled_from(
            [
                t.blob,
                f"blake3:{t.blob}",
                t.hf_blob,
                t.manifest,
                f"blake3:{t.manifest}",
                "0" * 64,
                t.blob.upper(),
                t.blob[:-1],
            ]
        ),
        st.sampled_from(SEGMENTS),
        text_bits().map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
    )
    refs = ref_strategy(t)
    route = draw(
        st.sampled_from(
            [
                "POST /gossip",
                "GET /holdings",
                "GET /blobs/{i}",
                "GET /blobs/{i}/pieces",
                "GET /partials/{i}",
                "GET /partials/{i}/pieces",
                "GET /manifests/{i}",
                "GET /refs",
                "GET /status",
                "GET /{i}/{i}",
                "GET /../../{i}",
                "GET /hf/{i}",
            ]
        )
    )
    method, path = route.split(" ")
    path = "/p2p/v1" + path.replace("{i}", draw(ids), 1).replace("{i}", draw(ids))
    if path.startswith("/p2p/v1/hf"):
        path = path.removeprefix("/p2p/v1")
    if route in ("GET /refs", "GET /status"):
        path += "?ref=" + quote(draw(refs).encode("utf-8", "surrogatepass"), safe="")
    if route == "GET /holdings":
        path += "?since=" + quote(
            draw(st.sampled_from(["0", "-1", "1.5", "", "9" * 5000, "\u0663", "0x10", "1e3"]) | st.integers().map(str)),
            safe="",
        )
    headers: list[tuple[str, Any]] = [("Authorization", "Bearer " + TOKEN)]
    if draw(st.integers(0, 9)) == 0:
        headers = [
            (
                "Authorization",
                draw(st.sampled_from(["", "Bearer ", "Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "\x00"])),
            )
        ]
    if draw(st.integers(0, 5)) > 0:
        headers.append(("Range", draw(st.sampled_from(RANGES + [f"bytes=0-{PIECE - 1}", f"bytes={PIECE}-"]))))
    body = None
    if method == "POST":
        member = st.fixed_dictionaries(
            {
                "node_id": st.one_of(text_bits(), junk()),
                "address": st.sampled_from(
                    [CLOSED, "127.0.0.1:1", "", "127.0.0.1:99999", "127.0.0.1:-1", "[::1]:9", 5, None]
                ),
                "cluster": st.sampled_from(["default", "other", "", None, 1]),
                "incarnation": st.one_of(st.integers(min_value=-5, max_value=2**70), junk()),
            },
            optional={"heartbeat": junk(), "holdings_version": junk(), "capacity_bytes": junk(), "labels": junk()},
        )
        entry = st.fixed_dictionaries(
            {
                "ref": refs,
                "replicas": st.one_of(st.integers(-3, 2000), junk()),
                "updated_at": junk(),
                "updated_by": junk(),
            }
        )
        payload = st.fixed_dictionaries(
            {
                "cluster": st.sampled_from(["default", "other", None, 7]),
                "members": st.one_of(st.lists(member, max_size=3), junk()),
            },
            optional={"catalog": st.one_of(st.lists(entry, max_size=2), junk()), "holdings": junk()},
        )
        body = draw(
            st.one_of(payload.map(json_bytes), junk().map(json_bytes), st.binary(max_size=64), st.just(b"[" * 100_000))
        )
        headers.append(("Content-Type", "application/json"))
    target = re.sub(rb"[\x00-\x20\x7f]", lambda m: b"%%%02X" % m.group(0)[0], encode_target(path))
    if ("Authorization", "Bearer " + TOKEN) in headers:  # a token holder: sign it as a node does (peers.auth)
        headers.remove(("Authorization", "Bearer " + TOKEN))
        headers += list(
            sign_request(key(TOKEN), "hostile", method, target.decode("utf-8", "surrogateescape"), body or b"").items()
        )
    return route, method, target, headers, body


SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


# --- property-based runs ------------------------------------------------------------------------


async def test_hostile_requests_on_every_local_route(tmp_path: Path) -> None:
    async with target(tmp_path) as t:
        found = Findings(t.sandbox)

        @settings(max_examples=LOCAL_EXAMPLES, **SETTINGS)
        @given(local_requests(t))
        def run(req: tuple[str, str, bytes, list[tuple[str, Any]], bytes | None, bool]) -> None:
            route, method, target_b, headers, body, stream = req
            reply = http(t.api, method, target_b, headers=headers, body=body, stream=stream)
            found.check(
                route,
                f"{method} {target_b[:200]!r} headers={headers!r:.200} body={(body or b'')[:120]!r}",
                reply,
                json_errors=target_b.startswith(b"/v1/"),
            )

        await attack(t, run)
        found.assert_clean()
        assert found.requests >= LOCAL_EXAMPLES // 2
        assert any(400 <= s < 500 for s in found.statuses) and any(s < 300 for s in found.statuses), found.statuses


async def test_hostile_requests_on_every_peer_route(tmp_path: Path) -> None:
    async with target(tmp_path) as t:
        found = Findings(t.sandbox)

        @settings(max_examples=PEER_EXAMPLES, **SETTINGS)
        @given(peer_requests(t))
        def run(req: tuple[str, str, bytes, list[tuple[str, Any]], bytes | None]) -> None:
            route, method, target_b, headers, body = req
            reply = http(t.peer, method, target_b, headers=headers, body=body)
            found.check(
                route, f"{method} {target_b[:200]!r} headers={headers!r:.200} body={(body or b'')[:120]!r}", reply
            )

        await attack(t, run)
        found.assert_clean()
        assert found.requests >= PEER_EXAMPLES // 2
        assert {200, 400, 401, 404, 416} <= set(found.statuses), found.statuses


# --- explicit tables -------------------------------------------------------------------------------


BODY_ROUTES = [
    "/v1/prefetch",
    "/v1/evict",
    "/v1/pin",
    "/v1/unpin",
    "/v1/leases",
    "/v1/leases/x/renew",
    "/v1/verify",
    "/v1/replicate",
    "/v1/k8s/filter",
    "/v1/k8s/prioritize",
    f"/hf/api/models/{HF_REPO}/paths-info/main",
]


async def test_ten_mib_bodies_are_413_on_every_route_that_reads_one(tmp_path: Path) -> None:
    async with target(tmp_path) as t:
        found = Findings(t.sandbox)
        huge = b'{"ref": "' + b"x" * TEN_MIB + b'"}'
        form = b"paths=" + b"a" * TEN_MIB

        def run() -> None:
            for route in BODY_ROUTES:
                body, ctype = (
                    (form, "application/x-www-form-urlencoded") if "paths-info" in route else (huge, "application/json")
                )
                admin = ("Authorization", f"Bearer {ADMIN_TOKEN}")  # admin routes: past the 401, to the body
                reply = http(t.api, "POST", route, headers=[("Content-Type", ctype), admin], body=body)
                found.check(route, f"POST {route} 10 MiB", reply)
                assert reply.status == 413, (route, reply.status, reply.body[:200])
            for route in ("/v1/gc", "/v1/models", "/healthz"):  # routes that never read a body
                found.check(route, f"POST {route} 10 MiB", http(t.api, "POST", route, body=huge))
            reply = http(
                t.peer,
                "POST",
                "/p2p/v1/gossip",
                headers=list(signed(TOKEN, "POST", "/p2p/v1/gossip", huge).items()),
                body=huge,
            )
            found.check("gossip", "POST /p2p/v1/gossip 10 MiB", reply)
            assert reply.status == 413, reply.status

        await attack(t, run)
        found.assert_clean()


async def test_absurd_ranges_on_hf_resolve_and_peer_blobs(tmp_path: Path) -> None:
    async with target(tmp_path) as t:
        found = Findings(t.sandbox)
        config = dict(tiny_model_files(weights_size=100_000, seed=7))["config.json"]
        size = len(config)

        def run() -> None:
            for rng in RANGES:
                for method in ("GET", "HEAD"):
                    reply = http(t.api, method, f"/hf/{HF_REPO}/resolve/main/config.json", headers=[("Range", rng)])
                    found.check(f"{method} resolve {rng[:40]!r}", f"{method} /hf resolve Range={rng[:40]!r}", reply)
                    if reply.status == 206 and method == "GET":
                        # Whatever part was granted is the right part of the file.
                        first, last = map(
                            int, re.match(r"bytes (\d+)-(\d+)/", reply.header("Content-Range") or "").groups()
                        )  # type: ignore[union-attr]
                        assert reply.body == config[first : last + 1], rng
                    elif reply.status == 200 and method == "GET":
                        assert reply.body == config, rng
                blob_path = f"/p2p/v1/blobs/{t.blob}"
                reply = http(
                    t.peer, "GET", blob_path, headers=[*signed(TOKEN, "GET", blob_path).items(), ("Range", rng)]
                )
                found.check(f"blob {rng[:40]!r}", f"GET peer blob Range={rng[:40]!r}", reply)
                assert reply.status in (206, 400, 416), (rng, reply.status)
            # The obvious ones answer what RFC 9110 says.
            assert (
                http(
                    t.api, "GET", f"/hf/{HF_REPO}/resolve/main/config.json", headers=[("Range", "bytes=999999999999-")]
                ).status
                == 416
            )
            assert (
                http(t.api, "GET", f"/hf/{HF_REPO}/resolve/main/config.json", headers=[("Range", "bytes=-0")]).status
                == 416
            )
            last = http(t.api, "GET", f"/hf/{HF_REPO}/resolve/main/config.json", headers=[("Range", "bytes=-5")])
            assert (last.status, last.body) == (206, config[size - 5 :])

        await attack(t, run)
        found.assert_clean()


async def test_traversal_in_hf_resolve_paths_never_serves_outside_files(tmp_path: Path) -> None:
    async with target(tmp_path) as t:
        found = Findings(t.sandbox)
        rel = os.path.relpath(t.sandbox.canary, t.sandbox.cache)  # ../sentinel/canary.txt
        deep = "../" * 12 + str(t.sandbox.canary).lstrip("/")
        paths = [
            rel,
            "../" + rel,
            "../../" + rel,
            deep,
            quote(deep, safe=""),
            deep.replace("../", "%2e%2e/"),
            deep.replace("/", "%2F"),
            deep.replace("../", "..%5c"),
            f"nested/../../{rel}",
            f"config.json/../../{rel}",
            str(t.sandbox.canary),
            quote(str(t.sandbox.canary), safe=""),
            f"%2e%2e%2f{rel}",
            f"....//....//{rel}",
            f"..;/{rel}",
            f"{rel}%00.json",
            f"config.json%00/../../{rel}",
            "..%c0%af" * 8 + "etc/passwd",
        ]
        repos = [HF_REPO, "acme/..", "..%2F..", "%2e%2e/%2e%2e", "acme/tiny/../.."]
        revs = ["main", "..", "%2e%2e", "main%2F..%2F..", "0" * 40]

        def run() -> None:
            for repo in repos:
                for rev in revs:
                    for p in paths:
                        for method in ("GET", "HEAD"):
                            reply = http(t.api, method, f"/hf/{repo}/resolve/{rev}/{p}")
                            found.check(
                                f"{method} resolve {repo} {rev}", f"{method} /hf/{repo}/resolve/{rev}/{p}", reply
                            )
                            if reply.status not in (400, 401, 403, 404):
                                found.problems.setdefault(
                                    f"status {reply.status} {repo} {rev}",
                                    f"{method} /hf/{repo}/resolve/{rev}/{p} -> {reply.status}",
                                )
            for p in paths:
                reply = http(t.api, "GET", f"/hf/api/models/{HF_REPO}/tree/main/{p}")
                found.check("tree", f"GET tree {p}", reply)

        await attack(t, run)
        found.assert_clean()
        assert t.d.store.model(ModelRef.parse(f"hf://{HF_REPO}")) is not None


async def test_a_ready_model_answers_ready_at_once_while_downloads_hold_every_job_slot(tmp_path: Path) -> None:
    """Launchers of a ready model must not wait behind other downloads, nor see it as "queued"
    with no path because a concurrent prefetch of it (a no-op) is waiting for a job slot."""
    src = write_random_file(tmp_path / "models" / "m" / "weights.bin", PIECE + 1, seed=72)
    write_random_file(tmp_path / "origin" / "big.bin", 4 << 20, seed=73)
    flags = {"store.piece_size_bytes": "64K", "jobs.max_concurrent": 1}
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **flags) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = f"file://{src.parent}"
        ready = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert ready["state"] == "ready" and ready["path"]
        origin.faults.rate_bps = 256 * 1024  # the one job slot stays busy for ~16 s
        big = origin.file_url("big.bin")
        await api.request("POST", "/v1/prefetch", body={"ref": big})
        try:
            await wait_until(
                lambda: (
                    d.jobs.get(ModelRef.parse(big)) is not None
                    and d.jobs.get(ModelRef.parse(big)).state.value == "fetching"
                ),
                timeout_s=10,
                what="the big download running",
            )
            await api.request("POST", "/v1/prefetch", body={"ref": ref})  # another launcher, not waiting
            status = await api.request("GET", "/v1/models/status", params={"ref": ref})
            again = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True, "timeout_s": 2})
            assert (status["state"], status["path"]) == ("ready", ready["path"]), (
                f"status of a ready model: {status['state']}, path {status['path']}"
            )
            assert (again["state"], again["path"]) == ("ready", ready["path"]), (
                f"prefetch --wait of a ready model: {again['state']}, path {again['path']}"
            )
        finally:
            await api.request("POST", "/v1/evict", body={"ref": big, "force": True})
