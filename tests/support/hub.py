"""A faithful Hugging Face Hub double on 127.0.0.1 for tests, the demo and the benchmarks.

Implements the subset of the Hub HTTP API that the real ``huggingface_hub`` client (0.36, 1.x, 2.x)
uses to download (see docs: /work/shared/design/HF.md §4, §7.2, §10):

* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (also ``datasets/`` and ``spaces/`` prefixes) with
  ``X-Repo-Commit``, quoted ``ETag`` (git blob sha1, or sha256 for LFS files), ``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files, ``Accept-Ranges``, ``Content-Length``; GET honours ``Range``.
* ``GET /api/{models|datasets|spaces}/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes and LFS info),
  ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=`` (``Link: rel="next"`` pagination),
  ``POST /api/models/{repo}/paths-info/{rev}`` (form ``paths=`` repeated), ``GET /api/agent-harnesses`` (404).
* Errors carry ``X-Error-Code`` like huggingface.co: ``EntryNotFound`` (404, with ``X-Repo-Commit``),
  ``RevisionNotFound`` (404), ``RepoNotFound`` (401), ``GatedRepo`` (401).

Revisions are parsed from the *encoded* request path, so ``refs%2Fpr%2F1`` is one revision. Repos are built
in code with real git object ids (blob, tree and commit sha1s), so commits, tags, branches and
``refs/pr/N`` behave like the real thing. Switches inject the upstream behaviours the daemon must cope
with: LFS served by a 302 to a "CDN" on 127.0.0.2, Xet advertisement, paginated trees, 5xx with
``Retry-After``, a body cut half-way. Counters record every request, per server.

Run standalone: ``python -m tests.support.hub [--port N] [--lfs-mode redirect_cdn] ...`` (binds 127.0.0.1,
and 127.0.0.2 for the CDN, only); prints the hub URL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from aiohttp import web

HOST = "127.0.0.1"
CDN_HOST = "127.0.0.2"
CHUNK = 1 << 20
DEFAULT_LFS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack")
LFS_MODES = ("direct", "redirect_cdn", "redirect_other_port", "redirect_same_origin")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
_PLURALS = {v: k for k, v in _TYPES.items()}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_ACTIONS = ("revision", "tree", "paths-info", "xet-read-token", "refs", "commits")
_EPOCH = 1_700_000_000


# --------------------------------------------------------------------------------------------------
# git-like object model


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (the ETag of a non-LFS file on the Hub)."""
    return _git_hash(b"blob", data)


def _git_hash(kind: bytes, body: bytes) -> str:
    return hashlib.sha1(kind + b" %d\0" % len(body) + body).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random content (each MiB differs), for big test files."""
    block = hashlib.shake_256(f"hub-seed-{seed}".encode()).digest(min(size, CHUNK) or 1)
    out = bytearray()
    i = 0
    while len(out) < size:
        n = min(len(block), size - len(out))
        out += (i.to_bytes(4, "little") + block[4:])[:n]
        i += 1
    return bytes(out)


@dataclass(frozen=True, eq=False)
class Blob:
    """One file's content as stored at a commit."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str  # git blob sha1 of the content (non-LFS) or of the LFS pointer (LFS)
    pointer_size: int | None = None

    @classmethod
    def of(cls, data: bytes, lfs: bool) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        if lfs:
            ptr = lfs_pointer(sha256, len(data))
            return cls(data, True, sha256, git_blob_sha1(ptr), len(ptr))
        return cls(data, False, sha256, git_blob_sha1(data))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        """What the client names the blob after: sha256 for LFS files, git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def xet_hash(self) -> str:
        return hashlib.sha256(b"xet:" + self.data).hexdigest()


@dataclass(eq=False)
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    trees: dict[str, str]  # directory path ("" = root) -> git tree sha1
    title: str
    date: str  # "%Y-%m-%dT%H:%M:%S.000Z"

    @property
    def dirs(self) -> set[str]:
        return {d for d in self.trees if d}


@dataclass(eq=False)
class Repo:
    repo_id: str
    repo_type: str
    lfs: tuple[str, ...]
    gated: bool
    private: bool
    default_branch: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # other refs: "refs/pr/1" -> sha
    commits: dict[str, Commit] = field(default_factory=dict)

    def is_lfs(self, path: str) -> bool:
        base = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(path if "/" in p else base, p.lstrip("/")) for p in self.lfs)

    def resolve(self, rev: str) -> Commit | None:
        """Revision → commit, like the Hub: full commit sha, branch, tag, refs/pr/N, refs/heads|tags/X."""
        if _HEX40.match(rev) and rev in self.commits:
            return self.commits[rev]
        for table, name in (
            (self.branches, rev),
            (self.tags, rev),
            (self.refs, rev),
            (self.branches, rev.removeprefix("refs/heads/") if rev.startswith("refs/heads/") else None),
            (self.tags, rev.removeprefix("refs/tags/") if rev.startswith("refs/tags/") else None),
        ):
            if name is not None and name in table:
                return self.commits[table[name]]
        return None


def _tree_oids(files: Mapping[str, Blob]) -> dict[str, str]:
    root: dict[str, Any] = {}
    for path, blob in files.items():
        parts = path.split("/")
        node = root
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'/'.join(parts[: i + 1])!r} is both a file and a directory")
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"{path!r} is both a file and a directory")
        node[parts[-1]] = blob
    out: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> str:
        entries = []
        for name, child in node.items():
            if isinstance(child, dict):
                oid = walk(child, f"{prefix}{name}/")
                entries.append((name + "/", b"40000 " + name.encode() + b"\0" + bytes.fromhex(oid)))
            else:
                entries.append((name, b"100644 " + name.encode() + b"\0" + bytes.fromhex(child.git_oid)))
        body = b"".join(e for _, e in sorted(entries, key=lambda x: x[0].encode()))
        oid = _git_hash(b"tree", body)
        out[prefix.rstrip("/")] = oid
        return oid

    walk(root, "")
    return out


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad repo path {path!r}")
    return path


def _gitattributes(patterns: Iterable[str]) -> bytes:
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns).encode()


# --------------------------------------------------------------------------------------------------
# counters


@dataclass
class Logged:
    server: str  # "hub" or "cdn"
    method: str
    target: str  # raw path and query, exactly as received (revision still percent-encoded)
    kind: str  # resolve | info | tree | paths-info | harness | xet-token | cdn | other
    auth: bool  # carried an authorization header
    range: str | None = None
    status: int = 0
    token: str | None = None  # the bearer token it carried, if any

    @property
    def line(self) -> str:
        return f"{self.method} {self.target}"

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Counters:
    requests: int = 0  # requests to the hub (127.0.0.1)
    auth_requests: int = 0  # ... of which carried an authorization header
    bytes_sent: int = 0  # file body bytes sent by the hub
    cdn_requests: int = 0  # requests to the CDN (127.0.0.2, or 127.0.0.1:<other port>)
    cdn_auth_requests: int = 0  # ... of which carried an authorization header (should stay 0)
    cdn_bytes_sent: int = 0  # file body bytes sent by the CDN
    by_kind: collections.Counter = field(default_factory=collections.Counter)  # (server, method, kind) -> n
    ranges: list[str] = field(default_factory=list)  # "start-end" of every 206, either server
    log: list[Logged] = field(default_factory=list)

    @property
    def file_bytes(self) -> int:
        """All file bytes that left the upstream (hub and CDN)."""
        return self.bytes_sent + self.cdn_bytes_sent

    @property
    def lines(self) -> list[str]:
        """Hub request lines, e.g. ``HEAD /acme/tiny-model/resolve/main/config.json``."""
        return [r.line for r in self.log if r.server == "hub"]

    @property
    def cdn_lines(self) -> list[str]:
        return [r.line for r in self.log if r.server == "cdn"]

    def count(self, method: str | None = None, kind: str | None = None, server: str | None = None) -> int:
        return sum(
            n
            for (s, m, k), n in self.by_kind.items()
            if (server is None or s == server) and (method is None or m == method) and (kind is None or k == kind)
        )


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, dict(headers or {})

    def response(self) -> web.Response:
        headers = dict(self.headers)
        if self.code:
            headers["X-Error-Code"] = self.code
        headers["X-Error-Message"] = self.message
        body = json.dumps({"error": self.message})
        return web.Response(status=self.status, headers=headers, text=body, content_type="application/json")


# --------------------------------------------------------------------------------------------------
# the hub


class Hub:
    """An HF-compatible upstream. Build repos with ``add_repo``/``commit``/``add_ref``, then ``await start()``.

    Switches (plain attributes, may be flipped while running):
      lfs_mode        "direct" (200 with bytes) | "redirect_cdn" (302 + metadata → 127.0.0.2 CDN) |
                      "redirect_other_port" (302 + metadata → CDN on 127.0.0.1:<other port>) |
                      "redirect_same_origin" (302 *without* metadata → /cdn/… on the hub itself)
      xet_hint        LFS resolve answers advertise Xet (X-Xet-Hash + Link rel="xet-auth")
      tree_xet_hash   /tree and /paths-info entries of LFS files carry ``xetHash``
      tree_page_size  page /tree listings (Link rel="next", cursor=<offset>)
      fail_first / fail_status / fail_retry_after / fail_kinds
                      answer the first N matching hub requests with fail_status (+ Retry-After)
      cdn_fail_first / cdn_fail_status   same for the CDN (e.g. 403 = expired signed URL)
      truncate_once / truncate_at         cut the next file body (hub or CDN) half-way (or after N bytes)
      corrupt_bodies  every file body (or range) has its first byte flipped: same size, wrong bytes
      delay_s         sleep before every file body
      tokens          bearer tokens accepted for gated/private repos
    """

    def __init__(
        self,
        *,
        tokens: Iterable[str] = (),
        lfs_mode: str = "direct",
        tree_page_size: int | None = None,
        xet_hint: bool = False,
        tree_xet_hash: bool = False,
    ) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: set[str] = set(tokens)
        self.lfs_mode = lfs_mode
        self.xet_hint = xet_hint
        self.tree_xet_hash = tree_xet_hash
        self.tree_page_size = tree_page_size
        self.fail_first = 0
        self.fail_status = 503
        self.fail_retry_after: str | None = "0"
        self.fail_kinds: set[str] | None = None  # None: every kind except "harness"
        self.cdn_fail_first = 0
        self.cdn_fail_status = 403
        self.truncate_once = False
        self.corrupt_bodies = False  # flip the first byte of every file body (range) sent
        self.truncate_at: int | None = None
        self.delay_s = 0.0
        self.counters = Counters()
        self.port = 0
        self.cdn_port = 0
        self.cdn_local_port = 0
        self._runner: web.AppRunner | None = None
        self._cdn_runner: web.AppRunner | None = None
        self._blobs: dict[str, Blob] = {}  # sha256 -> blob, for the CDN

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def cdn_url(self) -> str:
        return f"http://{CDN_HOST}:{self.cdn_port}"

    @property
    def cdn_local_url(self) -> str:
        """The CDN on the hub's host name but another port (for ``redirect_other_port``)."""
        return f"http://{HOST}:{self.cdn_local_port}"

    async def start(self, port: int = 0) -> Hub:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._hub_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, port).start()
        self.port = self._runner.addresses[0][1]

        cdn = web.Application()
        cdn.router.add_route("*", "/{tail:.*}", self._cdn_handler)
        self._cdn_runner = web.AppRunner(cdn, access_log=None, handle_signals=False)
        await self._cdn_runner.setup()
        await web.TCPSite(self._cdn_runner, CDN_HOST, 0).start()
        await web.TCPSite(self._cdn_runner, HOST, 0).start()
        addrs = self._cdn_runner.addresses
        self.cdn_port = next(a[1] for a in addrs if a[0] == CDN_HOST)
        self.cdn_local_port = next(a[1] for a in addrs if a[0] == HOST)
        return self

    async def stop(self) -> None:
        for runner in (self._runner, self._cdn_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._cdn_runner = None

    async def __aenter__(self) -> Hub:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self) -> None:
        self.counters = Counters()

    # ---- building repos ---------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        lfs: Iterable[str] = DEFAULT_LFS,
        branch: str = "main",
        tags: Iterable[str] = (),
        gated: bool = False,
        private: bool = False,
        repo_type: str = "model",
        gitattributes: bool = True,
    ) -> str:
        """Create a repo with one commit on ``branch`` (tags point at it). Returns the commit sha.

        Files whose name matches an ``lfs`` pattern are LFS files (ETag = sha256). Unless ``gitattributes`` is
        false or ``files`` has one, a ``.gitattributes`` listing the patterns is added, as on the real Hub.
        """
        if repo_type not in _TYPES:
            raise ValueError(f"repo_type must be one of {sorted(_TYPES)}")
        if (repo_type, repo_id) in self.repos:
            raise ValueError(f"{repo_type} {repo_id} exists")
        if not repo_id or repo_id.count("/") > 1 or any(p in ("", ".", "..") for p in repo_id.split("/")):
            raise ValueError(f"bad repo id {repo_id!r}")
        repo = Repo(repo_id, repo_type, tuple(lfs), gated, private, branch)
        files = dict(files)
        if gitattributes and ".gitattributes" not in files:
            files[".gitattributes"] = _gitattributes(repo.lfs)
        self.repos[(repo_type, repo_id)] = repo
        sha = self._new_commit(repo, None, files, (), f"Initial commit of {repo_id}")
        repo.branches[branch] = sha
        for tag in tags:
            repo.tags[tag] = sha
        return sha

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        *,
        delete: Iterable[str] = (),
        branch: str = "main",
        base: str | None = None,
        message: str | None = None,
        repo_type: str = "model",
    ) -> str:
        """A new commit on ``branch`` (created if missing) on top of ``base`` (default: the branch head, else
        the default branch). Unchanged files keep their content. Moves the branch; returns the new sha."""
        repo = self.repo(repo_id, repo_type)
        start = base if base is not None else (branch if branch in repo.branches else repo.default_branch)
        parent = repo.resolve(start)
        if parent is None:
            raise KeyError(f"unknown revision {start!r} in {repo_id}")
        sha = self._new_commit(repo, parent, files or {}, delete, message or f"Update {repo_id} on {branch}")
        repo.branches[branch] = sha
        return sha

    def add_ref(self, repo_id: str, ref: str, rev: str, *, repo_type: str = "model") -> str:
        """Point ``ref`` at ``rev`` (a sha or any resolvable revision). ``refs/pr/N`` and other ``refs/…`` are
        kept as such; ``refs/heads/X`` and bare names are branches, ``refs/tags/X`` tags. Returns the sha."""
        repo = self.repo(repo_id, repo_type)
        commit = repo.resolve(rev)
        if commit is None:
            raise KeyError(f"unknown revision {rev!r} in {repo_id}")
        if ref.startswith("refs/heads/"):
            repo.branches[ref.removeprefix("refs/heads/")] = commit.sha
        elif ref.startswith("refs/tags/"):
            repo.tags[ref.removeprefix("refs/tags/")] = commit.sha
        elif ref.startswith("refs/"):
            repo.refs[ref] = commit.sha
        else:
            repo.branches[ref] = commit.sha
        return commit.sha

    def add_tag(self, repo_id: str, tag: str, rev: str = "main", *, repo_type: str = "model") -> str:
        return self.add_ref(repo_id, f"refs/tags/{tag}", rev, repo_type=repo_type)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def head(self, repo_id: str, rev: str = "main", *, repo_type: str = "model") -> str:
        commit = self.repo(repo_id, repo_type).resolve(rev)
        if commit is None:
            raise KeyError(rev)
        return commit.sha

    def blob(self, repo_id: str, path: str, rev: str = "main", *, repo_type: str = "model") -> Blob:
        """The file as stored at ``rev`` (``.etag``, ``.sha256``, ``.git_oid``, ``.data``, ``.lfs``)."""
        commit = self.repo(repo_id, repo_type).resolve(rev)
        if commit is None:
            raise KeyError(rev)
        return commit.files[path]

    def resolve_url(self, repo_id: str, path: str, rev: str = "main", *, repo_type: str = "model") -> str:
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}/resolve/{quote(rev, safe='')}/{quote(path)}"

    def _new_commit(
        self, repo: Repo, parent: Commit | None, changes: Mapping[str, bytes], delete: Iterable[str], title: str
    ) -> str:
        files = dict(parent.files) if parent else {}
        for path in delete:
            if files.pop(path, None) is None:
                raise KeyError(f"{path!r} is not in {repo.repo_id}")
        for path, data in changes.items():
            blob = Blob.of(bytes(data), repo.is_lfs(_check_path(path)))
            files[path] = blob
            if blob.lfs:
                self._blobs[blob.sha256] = blob
        trees = _tree_oids(files)
        ts = _EPOCH + 60 * len(repo.commits)
        ident = f"Hub Tester <hub@example.invalid> {ts} +0000"
        body = f"tree {trees['']}\n" + (f"parent {parent.sha}\n" if parent else "")
        body += f"author {ident}\ncommitter {ident}\n\n{title}\n"
        sha = _git_hash(b"commit", body.encode())
        date = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        repo.commits[sha] = Commit(sha, parent.sha if parent else None, files, trees, title, date)
        return sha

    # ---- request plumbing -------------------------------------------------------------------

    def _log(self, request: web.Request, server: str, kind: str) -> Logged:
        c = self.counters
        auth = "authorization" in request.headers
        bearer = request.headers.get("authorization", "")
        token = bearer[7:].strip() if bearer.lower().startswith("bearer ") else None
        rec = Logged(server, request.method, request.raw_path, kind, auth, request.headers.get("Range"), token=token)
        c.log.append(rec)
        c.by_kind[(server, request.method, kind)] += 1
        if server == "hub":
            c.requests += 1
            c.auth_requests += auth
        else:
            c.cdn_requests += 1
            c.cdn_auth_requests += auth
        return rec

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and token.strip() in self.tokens

    async def _hub_handler(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        segs = path.split("/")[1:]
        kind, route = self._route(segs)
        rec = self._log(request, "hub", kind)
        try:
            if self.fail_first > 0 and kind != "harness" and (self.fail_kinds is None or kind in self.fail_kinds):
                self.fail_first -= 1
                headers = {"Retry-After": self.fail_retry_after} if self.fail_retry_after is not None else {}
                raise _Error(self.fail_status, None, f"injected {self.fail_status}", headers)
            resp = await route(request)
        except _Error as e:
            resp = e.response()
        rec.status = resp.status
        return resp

    def _route(self, segs: list[str]) -> tuple[str, Any]:
        """Map the encoded path segments to (kind, handler)."""
        if segs == ["api", "agent-harnesses"]:
            return "harness", self._not_found
        if len(segs) >= 3 and segs[0] == "api" and segs[1] in _PLURALS:
            return self._route_api(_PLURALS[segs[1]], [s for s in segs[2:]])
        if len(segs) == 2 and segs[0] == "cdn":
            return "cdn", lambda r: self._serve_cdn(r, segs[1], "hub")
        rtype, rest = "model", segs
        if segs and segs[0] in ("datasets", "spaces") and "resolve" in segs[2:4]:
            rtype, rest = _PLURALS[segs[0]], segs[1:]
        candidates = []
        if len(rest) >= 5 and rest[2] == "resolve":
            candidates.append(("/".join(rest[:2]), rest[3], rest[4:]))
        if len(rest) >= 4 and rest[1] == "resolve":
            candidates.append((rest[0], rest[2], rest[3:]))
        if not candidates:
            return "other", self._not_found
        repo_id, rev, fpath = next((c for c in candidates if (rtype, unquote(c[0])) in self.repos), candidates[0])
        return "resolve", lambda r: self._resolve(r, rtype, unquote(repo_id), unquote(rev), unquote("/".join(fpath)))

    def _route_api(self, rtype: str, segs: list[str]) -> tuple[str, Any]:
        if segs and segs[-1] == "":
            segs = segs[:-1]  # tolerate a trailing slash (olah sends /tree/main/?...)
        options = []
        if len(segs) >= 2 and (len(segs) == 2 or segs[2] in _API_ACTIONS):
            options.append((segs[:2], segs[2:]))
        if len(segs) == 1 or (len(segs) >= 2 and segs[1] in _API_ACTIONS):
            options.append((segs[:1], segs[1:]))
        if not options:
            return "other", self._not_found
        rid, rest = next((o for o in options if (rtype, unquote("/".join(o[0]))) in self.repos), options[0])
        repo_id = unquote("/".join(rid))
        if not rest:
            return "info", lambda r: self._info(r, rtype, repo_id, None)
        action, args = rest[0], rest[1:]
        if action == "revision" and len(args) == 1:
            return "info", lambda r: self._info(r, rtype, repo_id, unquote(args[0]))
        if action == "tree" and args:
            sub = unquote("/".join(args[1:]))
            return "tree", lambda r: self._tree(r, rtype, repo_id, unquote(args[0]), sub)
        if action == "paths-info" and len(args) == 1:
            return "paths-info", lambda r: self._paths_info(r, rtype, repo_id, unquote(args[0]))
        if action == "refs" and not args:
            return "refs", lambda r: self._refs(r, rtype, repo_id)
        if action == "xet-read-token":
            return "xet-token", self._not_found
        return "other", self._not_found

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="Not Found")

    def _repo_for(self, request: web.Request, rtype: str, repo_id: str) -> Repo:
        repo = self.repos.get((rtype, repo_id))
        msg = "Repository not found"
        if repo is None or (repo.private and not self._authorized(request)):
            raise _Error(401, "RepoNotFound", msg)
        if repo.gated and not self._authorized(request):
            raise _Error(
                401,
                "GatedRepo",
                f"Access to {rtype} {repo_id} is restricted. You must have access to it and be authenticated"
                " to access it. Please log in.",
            )
        return repo

    def _commit_for(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # ---- /resolve ---------------------------------------------------------------------------

    async def _resolve(self, request: web.Request, rtype: str, repo_id: str, rev: str, path: str) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        repo = self._repo_for(request, rtype, repo_id)
        commit = self._commit_for(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise _Error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        meta = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.etag}"'}
        if blob.lfs:
            meta["X-Linked-Etag"] = f'"{blob.sha256}"'
            meta["X-Linked-Size"] = str(blob.size)
            if self.xet_hint:
                meta["X-Xet-Hash"] = blob.xet_hash
                token_url = f"{self.url}/api/{_TYPES[rtype]}/{repo_id}/xet-read-token/{commit.sha}"
                meta["Link"] = f'<{token_url}>; rel="xet-auth"'
            if self.lfs_mode != "direct":
                if self.lfs_mode not in LFS_MODES:
                    raise ValueError(f"lfs_mode must be one of {LFS_MODES}")
                target = f"/cdn/{blob.sha256}?sig=fake"
                if self.lfs_mode == "redirect_cdn":
                    headers = {**meta, "Location": self.cdn_url + target}
                elif self.lfs_mode == "redirect_other_port":
                    headers = {**meta, "Location": self.cdn_local_url + target}
                else:  # redirect_same_origin: relative, and no metadata on the 302
                    headers = {"Location": target}
                body = f"Found. Redirecting to {headers['Location']}"
                return web.Response(status=302, headers=headers, text=body)
        meta["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"
        return await self._send(request, blob.data, meta, "hub")

    # ---- CDN --------------------------------------------------------------------------------

    async def _cdn_handler(self, request: web.Request) -> web.StreamResponse:
        segs = request.raw_path.split("?", 1)[0].split("/")[1:]
        rec = self._log(request, "cdn", "cdn")
        if len(segs) == 2 and segs[0] == "cdn":
            if self.cdn_fail_first > 0:
                self.cdn_fail_first -= 1
                resp: web.StreamResponse = web.Response(status=self.cdn_fail_status, text="<Error>AccessDenied</Error>")
            else:
                resp = await self._serve_cdn(request, segs[1], "cdn")
        else:
            resp = web.Response(status=404, text="NoSuchKey")
        rec.status = resp.status
        return resp

    async def _serve_cdn(self, request: web.Request, sha256: str, server: str) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        if request.query.get("sig") != "fake":
            return web.Response(status=403, text="<Error>SignatureDoesNotMatch</Error>")
        blob = self._blobs.get(sha256)
        if blob is None:
            return web.Response(status=404, text="NoSuchKey")
        # A storage bucket: its own ETag, no Hub metadata.
        headers = {"ETag": f'"{hashlib.md5(blob.data).hexdigest()}"', "Cache-Control": "public, max-age=604800"}
        return await self._send(request, blob.data, headers, server)

    # ---- body with Range --------------------------------------------------------------------

    async def _send(
        self, request: web.Request, data: bytes, meta: Mapping[str, str], server: str
    ) -> web.StreamResponse:
        size = len(data)
        headers = {**meta, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, end, status = 0, size - 1, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and "," not in rng and (if_range is None or if_range == meta.get("ETag")):
            m = _RANGE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return web.Response(status=416, headers={**meta, "Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start > end or start >= size:
                return web.Response(status=416, headers={**meta, "Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self.counters.ranges.append(f"{start}-{end}")
        length = end - start + 1 if size else 0
        headers["Content-Length"] = str(length)
        resp = web.StreamResponse(status=status, headers=headers)
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        await resp.prepare(request)
        limit = length
        truncate = self.truncate_once and length > 1
        if truncate:
            self.truncate_once = False
            limit = min(length - 1, self.truncate_at if self.truncate_at is not None else length // 2)
        if self.corrupt_bodies and limit > 0:
            # Same length, wrong bytes: only a whole-file checksum can tell.
            data = bytes(data[:start]) + bytes([data[start] ^ 0xFF]) + bytes(data[start + 1 :])
        view = memoryview(data)[start : start + limit]
        sent = 0
        try:
            while sent < limit:
                chunk = view[sent : sent + CHUNK]
                await resp.write(chunk)
                sent += len(chunk)
                if server == "hub":
                    self.counters.bytes_sent += len(chunk)
                else:
                    self.counters.cdn_bytes_sent += len(chunk)
        except ConnectionResetError:
            return resp
        if truncate:
            # Drop the connection mid-body, as a failing server or proxy would.
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    # ---- /api -------------------------------------------------------------------------------

    @staticmethod
    def _flag(request: web.Request, name: str) -> bool:
        return request.query.get(name, "").lower() in ("true", "1")

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        blob = commit.files.get(path)
        if blob is None:
            entry: dict[str, Any] = {"type": "directory", "oid": commit.trees[path], "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
                if self.tree_xet_hash:
                    entry["xetHash"] = blob.xet_hash
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, path: str) -> Commit:
        def oid(c: Commit) -> str | None:
            b = c.files.get(path)
            return b.git_oid if b is not None else c.trees.get(path)

        want = oid(commit)
        while commit.parent is not None and oid(repo.commits[commit.parent]) == want:
            commit = repo.commits[commit.parent]
        return commit

    async def _info(self, request: web.Request, rtype: str, repo_id: str, rev: str | None) -> web.Response:
        repo = self._repo_for(request, rtype, repo_id)
        commit = self._commit_for(repo, rev if rev is not None else repo.default_branch)
        blobs = self._flag(request, "blobs")
        siblings = []
        for path in sorted(commit.files):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                b = commit.files[path]
                sib.update(size=b.size, blobId=b.git_oid)
                if b.lfs:
                    sib["lfs"] = {"sha256": b.sha256, "size": b.size, "pointerSize": b.pointer_size}
            siblings.append(sib)
        first = repo.commits[next(iter(repo.commits))]
        body = {
            "_id": hashlib.sha1(f"{rtype}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            **({"modelId": repo_id} if rtype == "model" else {}),
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": first.date,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if blobs:
            body["usedStorage"] = sum(b.size for b in commit.files.values())
        return web.json_response(body)

    async def _refs(self, request: web.Request, rtype: str, repo_id: str) -> web.Response:
        """``GET /api/models/{repo}/refs`` (HfApi.list_repo_refs; llama.cpp's first call)."""
        repo = self._repo_for(request, rtype, repo_id)
        return web.json_response(
            {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(repo.branches.items())
                ],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo.tags.items())],
                "converts": [],
            }
        )

    async def _tree(self, request: web.Request, rtype: str, repo_id: str, rev: str, sub: str) -> web.Response:
        repo = self._repo_for(request, rtype, repo_id)
        commit = self._commit_for(repo, rev)
        sub = sub.strip("/")
        if sub and sub not in commit.trees:
            raise _Error(404, "EntryNotFound", f'{sub} does not exist on "{rev}"', {"X-Repo-Commit": commit.sha})
        recursive, expand = self._flag(request, "recursive"), self._flag(request, "expand")
        prefix = f"{sub}/" if sub else ""
        paths = [p for p in [*commit.dirs, *commit.files] if p.startswith(prefix) and p != sub]
        if not recursive:
            paths = [p for p in paths if "/" not in p[len(prefix) :]]
        paths.sort(key=lambda p: (p.count("/") if not recursive else 0, p))
        entries = [self._entry(repo, commit, p, expand) for p in paths]
        headers = {}
        page = self.tree_page_size
        if page:
            try:
                cursor = int(request.query.get("cursor", "0"))
            except ValueError:
                raise _Error(400, None, "bad cursor") from None
            if cursor + page < len(entries):
                query = [(k, v) for k, v in parse_qsl(request.query_string, keep_blank_values=True) if k != "cursor"]
                query.append(("cursor", str(cursor + page)))
                raw = request.raw_path.split("?", 1)[0]
                headers["Link"] = f'<{self.url}{raw}?{urlencode(query)}>; rel="next"'
            entries = entries[cursor : cursor + page]
        return web.json_response(entries, headers=headers)

    async def _paths_info(self, request: web.Request, rtype: str, repo_id: str, rev: str) -> web.Response:
        if request.method != "POST":
            return web.Response(status=405)
        repo = self._repo_for(request, rtype, repo_id)
        commit = self._commit_for(repo, rev)
        if request.content_type == "application/json":
            payload = await request.json()
            paths, expand = list(payload.get("paths", [])), bool(payload.get("expand", False))
        else:
            form = await request.post()
            paths = [str(p) for p in form.getall("paths", [])]
            expand = str(form.get("expand", "false")).lower() in ("true", "1")
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files or (p and p in commit.trees):
                out.append(self._entry(repo, commit, p, expand))
        return web.json_response(out)


# --------------------------------------------------------------------------------------------------
# standalone


def demo(hub: Hub) -> str:
    """Populate ``hub`` with the repos used in HF.md: acme/tiny-model (+ tag v1.0, refs/pr/1),
    acme/gated-model (token hf_test_ok) and gpt2. Returns tiny-model's first commit."""
    config = json.dumps({"model_type": "gpt2", "n_layer": 2, "vocab_size": 128}, indent=2).encode() + b"\n"
    weights = random_bytes(112, seed=1)
    files = {"config.json": config, "model.safetensors": weights, "nested/notes.txt": b"hello from the hub double\n"}
    sha = hub.add_repo("acme/tiny-model", files, tags=("v1.0",))
    pr = hub.commit("acme/tiny-model", {"nested/notes.txt": b"notes on a pull request\n"}, branch="pr-1-work")
    hub.add_ref("acme/tiny-model", "refs/pr/1", pr)
    del hub.repo("acme/tiny-model").branches["pr-1-work"]
    hub.add_repo("acme/gated-model", {"config.json": config, "model.safetensors": weights}, gated=True)
    hub.add_repo("gpt2", {"config.json": config})
    hub.tokens.add("hf_test_ok")
    return sha


def main() -> None:
    p = argparse.ArgumentParser(description="serve a fake Hugging Face Hub on 127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lfs-mode", choices=LFS_MODES, default="direct")
    p.add_argument("--xet-hint", action="store_true")
    p.add_argument("--tree-xet-hash", action="store_true")
    p.add_argument("--tree-page-size", type=int, default=None)
    p.add_argument("--log", action="store_true", help="print every request line")
    args = p.parse_args()

    async def serve() -> None:
        hub = Hub(
            lfs_mode=args.lfs_mode,
            xet_hint=args.xet_hint,
            tree_xet_hash=args.tree_xet_hash,
            tree_page_size=args.tree_page_size,
        )
        demo(hub)
        await hub.start(args.port)
        print(hub.url, flush=True)
        try:
            seen = 0
            while True:
                await asyncio.sleep(0.2)
                if args.log:
                    for rec in hub.counters.log[seen:]:
                        print(f"[{rec.server}] {rec.line} -> {rec.status}", flush=True)
                    seen = len(hub.counters.log)
        finally:
            await hub.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
