"""The HF-compatible endpoint: ``HF_ENDPOINT=http://HOST:PORT/hf`` for unmodified clients.

Answers the hub protocol that huggingface_hub 0.36, 1.x and 2.x speak (HF.md §4): revision and
tree calls from local manifests when this node holds the whole repo (passed to the upstream hub
otherwise), and ``/resolve`` with exactly the headers the client needs -- X-Repo-Commit, ETag,
X-Linked-Etag/Size for LFS files, Content-Length, Range -- never a redirect and never any Xet
header. A file this node does not hold yet is fetched as a one-file prefetch job and streamed to
the client piece by piece as each verified piece lands, so a cold miss never stalls the client.
Errors carry X-Error-Code so the client raises EntryNotFound, RepositoryNotFound,
RevisionNotFound or GatedRepo rather than a connection error.

Pulled files become models: each file fetched (or found already here under another repo's
content) for ``org/m`` at a commit is folded into one model ``hf://org/m@<commit>``
(``Store.merge_model``; the one-file job's own ref goes), partial until it holds every file the
commit's listing names (``store.pulls``). The commit each branch resolved to is remembered, for
the hf view's ``refs/<branch>`` and for outages: while the hub cannot be reached (no connection, a
timeout, a 5xx), revision, tree, paths-info, refs and resolve calls for what the node holds are
answered from the store, marked ``X-Cached-Offline: 1``. llama.cpp's ``-hf`` calls are answered
too: ``/api/models/{repo}/refs`` (current releases) and ``/v2/{repo}/manifests/{tag}`` (older
ones; only under this prefix -- the top-level ``/v2/`` is the OCI mirror's).

A client that closes or resets its connection mid-body is normal: logged at debug and counted as
``cached_api_errors_total{code="client_closed"}``. Bytes sent are counted in
``cached_local_served_bytes_total{api="hf"}``. Bytes of a partial go out piece by piece as they
verify; once the file is a complete blob the rest goes by the kernel (``cached.api.blobsend``),
from the inode opened then, so an eviction meanwhile does not cut the body.

Trust boundary: whoever can reach the local API can read every file this node holds, including
files of gated repos fetched with the daemon's token. The API listens on loopback (or a unix
socket with a mode) for that reason. What the node does not hold is asked of the hub with the
caller's own ``authorization`` (or none), never the daemon's token, unless the operator lends it
for that repo or org (``origins.hf.lend_token_to``). Upstream paths are rebuilt from validated
parts (repo id, revision, file path; no ``.``/``..``/empty segments, each segment encoded): the
client's raw path is never forwarded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from typing import Any
from urllib.parse import quote, unquote, urlencode

from aiohttp import web

from cached.api.blobsend import send_blob
from cached.errors import CachedError, OriginError, RefError
from cached.jobs import Job, Jobs
from cached.metrics import Metrics
from cached.origins.hf import HfOrigin
from cached.ranges import parse_range, unsatisfiable
from cached.store import Store
from cached.types import (
    BlobId,
    FileEntry,
    JobState,
    Manifest,
    ModelRef,
    OriginFile,
    Priority,
    RefKind,
    validate_file_path,
)

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 1 << 20
STALL_LIMIT_S = 120.0  # give up on a miss whose bytes stopped arriving
OFFLINE_HEADER = "X-Cached-Offline"  # "1": answered from the store because the hub is unreachable


def _lfs_pointer_size(sha256: str, size: int) -> int:
    return len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")


def _tree_entry(f: FileEntry) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": f.origin.get("git_sha1", ""), "size": f.size, "path": f.path}
    if f.origin.get("sha256"):
        entry["lfs"] = {
            "oid": f.origin["sha256"],
            "size": f.size,
            "pointerSize": _lfs_pointer_size(f.origin["sha256"], f.size),
        }
    return entry


def _dir_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


def _strip_xet(value: Any) -> Any:
    """HF.md §1 rule 12: a relayed xetHash would send 1.x/2.x clients to a Xet route we lack."""
    if isinstance(value, list):
        return [_strip_xet(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_xet(v) for k, v in value.items() if k not in ("xetHash", "xet_hash")}
    return value


def hf_error(status: int, code: str | None, message: str, commit: str | None = None) -> web.Response:
    # Printable ASCII only: the message may quote what the client sent (header injection).
    headers = {"X-Error-Message": "".join(c if 32 <= ord(c) < 127 else "?" for c in message[:500])}
    if code:
        headers["X-Error-Code"] = code
    if commit:
        headers["X-Repo-Commit"] = commit
    return web.json_response({"error": message}, status=status, headers=headers)


def origin_error_response(e: OriginError, commit: str | None = None) -> web.Response:
    status = e.status if e.status and 400 <= e.status < 600 else 502
    if not e.retryable and e.status is None:
        status = 502
    return hf_error(status, e.upstream_code, e.message, commit if e.upstream_code == "EntryNotFound" else None)


class HfEndpoint:
    """``origin`` carries the daemon's token; ``anonymous`` (same hub, no token of its own) is
    used for every upstream call made on a caller's behalf unless the repo is lent the token."""

    def __init__(
        self,
        *,
        store: Store,
        jobs: Jobs,
        origin: HfOrigin,
        anonymous: HfOrigin | None = None,
        lend_token_to: tuple[str, ...] = (),
        metrics: Metrics | None = None,
        prefetch_on_pull: bool = False,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._origin = origin
        self._anonymous = anonymous if anonymous is not None else origin
        self._lend = frozenset(lend_token_to)
        self._metrics = metrics
        self._prefetch_on_pull = prefetch_on_pull

    def add_routes(self, app: web.Application, prefix: str = "/hf") -> None:
        r = app.router
        r.add_get(prefix + "/api/agent-harnesses", self.not_found)
        for repo in ("{org}/{name}", "{name}"):
            api = f"{prefix}/api/models/{repo}"
            r.add_get(api, self.repo_info)
            r.add_get(api + "/revision/{rev}", self.repo_info)
            r.add_get(api + "/tree/{rev}", self.tree)
            r.add_get(api + "/tree/{rev}/{path:.*}", self.tree)
            r.add_post(api + "/paths-info/{rev}", self.paths_info)
            r.add_get(api + "/refs", self.refs)  # llama.cpp -hf (current)
            r.add_get(f"{prefix}/{repo}/resolve/{{rev}}/{{path:.+}}", self.resolve)  # and HEAD
        # llama.cpp -hf (older releases): the hub's Ollama-style GGUF manifest. Only under /hf:
        # the top-level /v2/ is the OCI registry mirror's.
        r.add_get(prefix + "/v2/{org}/{name}/manifests/{tag}", self.gguf_manifest)
        r.add_route("*", prefix + "/{tail:.*}", self.not_found)

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _repo(request: web.Request) -> str:
        # No '.' or '..' segment anywhere in what the client sent, encoded or not.
        if any(seg in (".", "..") for seg in unquote(request.raw_path.split("?", 1)[0]).split("/")):
            raise _bad_request("'.' and '..' path segments are not allowed")
        m = request.match_info
        repo = f"{m['org']}/{m['name']}" if "org" in m else m["name"]
        try:
            return ModelRef.parse(f"hf://{repo}").repo
        except CachedError:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}) from None

    @staticmethod
    def _rev(request: web.Request, repo: str) -> str:
        rev = request.match_info.get("rev", "main")
        try:
            return ModelRef.parse(f"hf://{repo}@{rev}").revision
        except RefError:
            raise _bad_request(f"invalid revision {rev[:300]!r}") from None

    @staticmethod
    def _token(request: web.Request) -> str | None:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() or None if auth.lower().startswith("bearer ") else None
        if token is not None and not (token.isascii() and token.isprintable()):
            raise _bad_request("the Authorization header is not a printable ASCII bearer token")
        return token

    def _upstream(self, request: web.Request, repo: str) -> tuple[HfOrigin, str | None]:
        """Who asks the hub for this caller: with the caller's token, or the daemon's if lent."""
        token = self._token(request)
        if token is None and (repo in self._lend or repo.split("/", 1)[0] in self._lend):
            return self._origin, None
        return self._anonymous, token

    def _manifests(self, repo: str, *, whole: bool = False) -> list[tuple[ModelRef, Manifest]]:
        """Current manifests of ``repo`` on this node (``whole``: only refs without patterns)."""
        out = []
        for rec in self._store.models():
            ref = ModelRef.parse(rec.ref)
            if ref.kind is not RefKind.HF or ref.repo != repo:
                continue
            # A model pulled file by file is not the whole repo until it holds every file.
            if whole and (ref.include or ref.exclude or self._store.pulled_missing(ref, rec.manifest) != ()):
                continue
            out.append((ref, rec.manifest))
        return out

    def _local_commit(self, repo: str, rev: str) -> str | None:
        if _COMMIT.match(rev):
            return rev
        for ref, m in self._manifests(repo):
            if ref.revision == rev and m.revision:
                return m.revision
        return None

    def _whole_manifest(self, repo: str, rev: str) -> Manifest | None:
        for ref, m in self._manifests(repo, whole=True):
            if ref.revision == rev or m.revision == rev:
                return m
        return None

    def _local_file(self, repo: str, commit: str, path: str) -> FileEntry | None:
        for _, m in self._manifests(repo):
            if m.revision == commit:
                for f in m.files:
                    if f.path == path:
                        return f
        return None

    async def _commit(self, request: web.Request, repo: str, rev: str) -> tuple[str, bool]:
        """(the commit ``rev`` names, whether it came from the store because the hub is down)."""
        local = self._local_commit(repo, rev)
        if local is not None:
            return local, False
        origin, token = self._upstream(request, repo)
        try:
            sha, _ = await origin.commit_of(repo, rev, token=token)
        except OriginError as e:
            held = self._offline_commit(repo, rev) if _unreachable(e) else None
            if held is None:
                raise
            return held, True
        await self._store.note_hf_branch(repo, rev, sha)
        return sha, False

    def _offline_commit(self, repo: str, rev: str) -> str | None:
        """While the hub is unreachable: the commit ``rev`` last resolved to, if any of it is here."""
        commit = rev if _COMMIT.match(rev) else self._store.pulls.branch(repo, rev)
        if commit is None:
            return None
        return commit if any(m.revision == commit for _, m in self._manifests(repo)) else None

    def _held_manifest(self, repo: str, rev: str) -> Manifest | None:
        """Every file of ``repo`` at the commit ``rev`` last resolved to that this node holds,
        whichever refs hold them: what is answered while the hub is unreachable."""
        commit = self._offline_commit(repo, rev)
        if commit is None:
            return None
        files: dict[str, FileEntry] = {}
        piece_size = 0
        for _, m in self._manifests(repo):
            if m.revision == commit:
                files.update({f.path: f for f in m.files})
                piece_size = m.piece_size
        return Manifest(
            ref=f"hf://{repo}@{commit}", revision=commit, piece_size=piece_size, files=tuple(files.values())
        )

    # --- API routes ----------------------------------------------------------------------------

    async def not_found(self, request: web.Request) -> web.Response:
        return hf_error(404, None, f"no such route {request.path}")

    async def repo_info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        rev = self._rev(request, repo)
        m = self._whole_manifest(repo, rev)
        offline = False
        if m is None:
            tail = f"/revision/{quote(rev, safe='')}" if "rev" in request.match_info else ""
            try:
                return await self._passthrough(request, repo, tail, note_rev=rev)
            except OriginError as e:
                m = self._held_manifest(repo, rev) if _unreachable(e) else None
                if m is None:
                    return hf_error(502, None, e.message)
                offline = True
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings = []
        for f in sorted(m.files, key=lambda f: f.path):
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                entry = _tree_entry(f)
                s.update(size=f.size, blobId=entry["oid"])
                if "lfs" in entry:
                    s["lfs"] = {
                        "sha256": entry["lfs"]["oid"],
                        "size": f.size,
                        "pointerSize": entry["lfs"]["pointerSize"],
                    }
            siblings.append(s)
        return web.json_response(
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "sha": m.revision,
                "private": False,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
            },
            headers=_offline_headers(offline),
        )

    def _listing(self, m: Manifest, prefix: str, recursive: bool) -> list[dict[str, Any]] | None:
        prefix = prefix.strip("/")
        files = [f for f in m.files if not prefix or f.path == prefix or f.path.startswith(prefix + "/")]
        if prefix and not files:
            return None
        if len(files) == 1 and files[0].path == prefix:
            return [_tree_entry(files[0])]
        base = len(prefix) + 1 if prefix else 0
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for f in sorted(files, key=lambda f: f.path):
            rest = f.path[base:].split("/")
            for depth in range(1, len(rest)):
                d = f.path[:base] + "/".join(rest[:depth])
                if d not in dirs and (recursive or depth == 1):
                    dirs.add(d)
                    out.append(_dir_entry(d))
            if recursive or len(rest) == 1:
                out.append(_tree_entry(f))
        return out

    async def tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        rev = self._rev(request, repo)
        m = self._whole_manifest(repo, rev)
        offline = False
        if m is None:
            path = request.match_info.get("path", "").strip("/")
            tail = f"/tree/{quote(rev, safe='')}" + (f"/{_encoded_path(path)}" if path else "")
            try:
                return await self._passthrough(request, repo, tail)
            except OriginError as e:
                m = self._held_manifest(repo, rev) if _unreachable(e) else None
                if m is None:
                    return hf_error(502, None, e.message)
                offline = True
        listing = self._listing(
            m, request.match_info.get("path", ""), request.query.get("recursive", "").lower() == "true"
        )
        if listing is None:
            return hf_error(
                404, "EntryNotFound", f"{request.match_info.get('path')} not found in {repo}@{m.revision}", m.revision
            )
        return web.json_response(listing, headers=_offline_headers(offline))

    async def paths_info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        rev = self._rev(request, repo)
        m = self._whole_manifest(repo, rev)
        offline = False
        if m is None:
            try:
                return await self._passthrough(request, repo, f"/paths-info/{quote(rev, safe='')}")
            except OriginError as e:
                m = self._held_manifest(repo, rev) if _unreachable(e) else None
                if m is None:
                    return hf_error(502, None, e.message)
                offline = True
        form = await request.post()
        out: list[dict[str, Any]] = []
        for path in form.getall("paths", []):
            if not isinstance(path, str):
                continue
            listing = self._listing(m, path, False)
            if listing is None:
                continue
            exact = [e for e in listing if e["path"] == path.strip("/")]
            out.extend(exact or [_dir_entry(path.strip("/"))])
        return web.json_response(out, headers=_offline_headers(offline))

    async def _passthrough(
        self, request: web.Request, repo: str, tail: str, *, note_rev: str | None = None
    ) -> web.Response:
        """Relay an API call to the upstream hub (a repo this node does not hold), on a path
        rebuilt from validated parts: ``/api/models/{repo}{tail}``. OriginError when the hub
        cannot be reached (the caller may answer from the store). ``note_rev``: a revision
        call, whose answer's ``sha`` is remembered as what that branch resolved to."""
        path = f"/api/models/{quote(repo, safe='/')}{tail}"
        query = urlencode(list(request.query.items()))
        data = await request.read() if request.method == "POST" else None
        origin, token = self._upstream(request, repo)
        status, headers, content_type, body = await origin.relay(
            request.method,
            path + ("?" + query if query else ""),
            token=token,
            data=data,
            content_type=request.headers.get("Content-Type"),
        )
        if status >= 500:
            raise OriginError(f"the hub answered {status} for {path}", status=status, retryable=True)
        out = {k: v for k, v in headers.items() if k.lower() in ("x-error-code", "x-error-message", "x-repo-commit")}
        if "Link" in headers:
            # Pagination links name the upstream host; the client must come back to us.
            out["Link"] = headers["Link"].replace(self._origin.endpoint, str(request.url.origin()) + "/hf")
        if status == 200 and content_type == "application/json":
            try:
                doc = json.loads(body)
                body = json.dumps(_strip_xet(doc)).encode()
            except ValueError:
                doc = None
            sha = doc.get("sha") if isinstance(doc, dict) else None
            if note_rev is not None and not _COMMIT.match(note_rev) and isinstance(sha, str) and _COMMIT.match(sha):
                await self._store.note_hf_branch(repo, note_rev, sha)
            if tail == "/refs":
                for name, commit in _branches_of(doc).items():
                    await self._store.note_hf_branch(repo, name, commit)
        return web.Response(status=status, body=body, headers=out, content_type=content_type or "application/json")

    # --- llama.cpp -------------------------------------------------------------------------------

    async def refs(self, request: web.Request) -> web.Response:
        """``GET /api/models/{repo}/refs``: relayed; while the hub is unreachable, the branches
        whose last resolved commit this node holds."""
        repo = self._repo(request)
        try:
            return await self._passthrough(request, repo, "/refs")
        except OriginError as e:
            held = self._held_branches(repo) if _unreachable(e) else {}
            if not held:
                return hf_error(502, None, e.message)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(held.items())]
        return web.json_response({"branches": branches, "tags": [], "converts": []}, headers=_offline_headers(True))

    def _held_branches(self, repo: str) -> dict[str, str]:
        held = {m.revision for _, m in self._manifests(repo) if m.revision}
        out = {r: c for r, (c, _) in self._store.pulls.branches(repo).items() if c in held and "/" not in r}
        for ref, m in self._manifests(repo):
            if m.revision and not _COMMIT.match(ref.revision) and "/" not in ref.revision:
                out.setdefault(ref.revision, m.revision)
        return out

    async def gguf_manifest(self, request: web.Request) -> web.Response:
        """``GET /v2/{repo}/manifests/{tag}`` as older llama.cpp asks it (``-hf org/m[:tag]``):
        ``ggufFile``/``mmprojFile`` named from the listing of ``main`` -- the node's own when it
        holds the commit (or the hub is down), else the hub's tree. The files then come through
        ``/resolve/main/...`` like any other."""
        repo = self._repo(request)
        tag = request.match_info["tag"]
        if not _GGUF_TAG.match(tag):
            return hf_error(400, None, f"invalid tag {tag[:100]!r}")
        try:
            commit, offline = await self._commit(request, repo, "main")
        except OriginError as e:
            return origin_error_response(e)
        whole = self._whole_manifest(repo, commit)
        if whole is not None or offline:
            m = whole if whole is not None else self._held_manifest(repo, commit)
            entries = [_tree_entry(f) for f in (m.files if m is not None else ())]
        else:
            origin, token = self._upstream(request, repo)
            try:
                entries = await origin.tree(repo, commit, token=token)
            except OriginError as e:
                return origin_error_response(e)
        by_path = {e["path"]: e for e in entries if isinstance(e.get("path"), str)}
        model, mmproj = pick_gguf(sorted(by_path), tag)
        if model is None:
            return hf_error(404, None, f"no GGUF file for tag {tag!r} in {repo}@{commit}", commit)
        out = {"ggufFile": _gguf_file(by_path[model])}
        if mmproj is not None:
            out["mmprojFile"] = _gguf_file(by_path[mmproj])
        return web.json_response(out, headers=_offline_headers(offline))

    # --- /resolve ------------------------------------------------------------------------------

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        rev = self._rev(request, repo)
        path = request.match_info["path"]
        try:
            validate_file_path(path)
        except ValueError:
            return hf_error(400, None, f"invalid file path {path[:300]!r}")
        try:
            commit, offline = await self._commit(request, repo, rev)
        except OriginError as e:
            return origin_error_response(e)
        local = self._local_file(repo, commit, path)
        ofile: OriginFile | None = None
        if local is not None:
            meta = {
                "size": local.size,
                "git_sha1": local.origin.get("git_sha1", ""),
                "sha256": local.origin.get("sha256"),
            }
        else:
            whole = self._whole_manifest(repo, commit)
            if whole is not None:
                return hf_error(404, "EntryNotFound", f"{path} does not exist in {repo}@{commit}", commit)
            try:
                ofile = await self._remote_file(request, repo, commit, path)
            except OriginError as e:
                return origin_error_response(e, commit)
            if ofile is None:
                return hf_error(404, "EntryNotFound", f"{path} does not exist in {repo}@{commit}", commit)
            meta = {
                "size": ofile.size,
                "git_sha1": ofile.checksums.get("git_sha1", ""),
                "sha256": ofile.checksums.get("sha256"),
            }
            await self._begin_pull(request, repo, commit)

        size = meta["size"]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{meta["sha256"] or meta["git_sha1"]}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            **_offline_headers(offline),
        }
        if meta["sha256"]:
            headers["X-Linked-Etag"] = f'"{meta["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        start, end = 0, size - 1
        status = 200
        rng = parse_range(request.headers.get("Range"))  # one the hub protocol cannot use: the whole file
        if rng is not None:
            span = rng.span(size)
            if span is None:
                return web.Response(status=416, headers={**headers, "Content-Range": unsatisfiable(size)})
            start, end, status = span.start, span.end, 206
            headers["Content-Range"] = span.content_range
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        key = None
        blob_hex = local.blob.hex if local is not None else None
        if ofile is not None:
            key = ofile.key
            blob_hex = self._store.blob_for_identity(key)
            if blob_hex is not None:
                # The bytes are here already (another repo or commit has the same content):
                # the file joins this repo's model without a fetch.
                entry = FileEntry(path=path, size=ofile.size, blob=BlobId(blob_hex), origin=_origin_meta(ofile))
                await self._absorb(repo, commit, [entry], {})
            elif request.method != "HEAD":
                self._start_fetch(repo, commit, path)
        resp = web.StreamResponse(status=status, headers=headers)
        try:
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            ref = ModelRef.parse(self._file_ref(repo, commit, path))
            await self._send(request, resp, blob_hex, key, start, length, ref)
            await resp.write_eof()
        except ConnectionResetError as e:
            # The client went away (aria2c closing its extra connections, a cancelled
            # download): normal, not an error of ours.
            log.debug("hf client closed the connection repo=%s path=%s error=%s", repo, path, e)
            if self._metrics is not None:
                self._metrics.api_errors.labels("client_closed").inc()
        except OSError as e:
            # Ours (ConnectionAbortedError: the fetch failed, the file left) or a socket or disk
            # error mid-body. Headers are gone already: cut the connection so the client sees a
            # short body and retries (1.x/2.x resume with Range) instead of keeping wrong or missing bytes.
            log.warning("hf stream aborted repo=%s path=%s error=%s", repo, path, e)
            resp.force_close()
            if request.transport is not None:
                request.transport.close()
        return resp

    async def _remote_file(self, request: web.Request, repo: str, commit: str, path: str) -> OriginFile | None:
        """The upstream's description of one file (paths-info), or None if it has no such file."""
        origin, token = self._upstream(request, repo)
        entries = await origin.paths_info(repo, commit, [path], token=token)
        for e in entries:
            if isinstance(e, dict) and e.get("path") == path and e.get("type") == "file":
                return self._origin.origin_file(repo, commit, e)
        return None

    # --- pulled files become one model per repo and commit -------------------------------------

    async def _begin_pull(self, request: web.Request, repo: str, commit: str) -> None:
        """The first file of ``repo@commit`` this node does not hold: learn the commit's whole
        listing (so the model knows what it still lacks), and optionally prefetch all of it."""
        if self._store.pulls.is_pulled(repo, commit) or self._store.model(ModelRef.parse(f"hf://{repo}@{commit}")):
            return
        origin, token = self._upstream(request, repo)
        try:
            entries = await origin.tree(repo, commit, token=token)
            paths = tuple(sorted(str(e["path"]) for e in entries if isinstance(e.get("path"), str)))
        except OriginError as e:
            # Not fatal: the model is then partial until a prefetch of it lists the commit.
            log.info("hf pull without the commit's listing repo=%s commit=%s error=%s", repo, commit, e)
            paths = ()
        await self._store.note_hf_listing(repo, commit, paths)
        if self._prefetch_on_pull:
            self._jobs.submit(ModelRef.parse(f"hf://{repo}@{commit}"), Priority.LOW)

    async def _absorb(self, repo: str, commit: str, entries: list[FileEntry], sources: dict[str, int]) -> None:
        """Fold files into the model ``hf://repo@commit`` (made if new): one model per repo and
        commit, known to ls/status/path/evict/eviction/leases, and to the hf view."""
        ref = ModelRef.parse(f"hf://{repo}@{commit}")
        if self._store.model(ref) is None and not self._store.pulls.is_pulled(repo, commit):
            await self._store.note_hf_listing(repo, commit, ())  # listing not known: partial
        rec = await self._store.merge_model(ref, entries, revision=commit, sources=sources)
        if rec is not None:
            added = ",".join(sorted({e.path for e in entries}))
            log.info("hf pull added files ref=%s files=%d added=%.200s", ref, len(rec.manifest.files), added)

    async def _absorb_job(self, job: Job) -> None:
        """A one-file fetch finished: its file joins the repo's model, the one-file ref goes."""
        rec = self._store.model(job.ref)
        if rec is None or rec.manifest.revision is None:
            return
        await self._absorb(job.ref.repo, rec.manifest.revision, list(rec.manifest.files), rec.sources)
        await self._store.remove_model(job.ref)

    @staticmethod
    def _file_ref(repo: str, commit: str, path: str) -> str:
        # fnmatch treats [ ] * ? specially; wrap them so the pattern names exactly this path.
        pattern = re.sub(r"([\[\]*?])", r"[\1]", path)
        return f"hf://{repo}@{commit}?include={quote(pattern, safe='/[]*')}"

    def _start_fetch(self, repo: str, commit: str, path: str) -> None:
        ref = ModelRef.parse(self._file_ref(repo, commit, path))
        self._jobs.submit(ref, Priority.HIGH, on_ready=self._absorb_job)

    async def _send(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        blob_hex: str | None,
        key: str | None,
        start: int,
        length: int,
        ref: ModelRef,
    ) -> None:
        """Stream bytes [start, start+length): from the partial as pieces verify, and from the
        complete blob (by the kernel) as soon as there is one."""
        pos, end = start, start + length
        last_progress = time.monotonic()
        while pos < end:
            if blob_hex is None and key is not None:
                blob_hex = self._store.blob_for_identity(key)
            if blob_hex is not None:
                await self._send_blob(request, resp, blob_hex, pos, end - pos)
                return
            else:
                # None until the piece at ``pos`` verified (or the partial finalized meanwhile:
                # the next round reads the blob).
                chunk = await self._store.read_verified(partial_key=key, offset=pos, length=min(CHUNK, end - pos))
                if chunk is None:
                    job = self._jobs.get(ref)
                    if job is not None and job.state is JobState.FAILED:
                        raise ConnectionAbortedError(f"fetch failed: {job.error}")
                    if time.monotonic() - last_progress > STALL_LIMIT_S:
                        raise ConnectionAbortedError("no bytes arrived for too long")
                    await asyncio.sleep(0.05)
                    continue
            if not chunk:
                raise ConnectionAbortedError("file ended early")
            await resp.write(chunk)
            if self._metrics is not None:
                self._metrics.local_served_bytes.labels("hf").inc(len(chunk))
            pos += len(chunk)
            last_progress = time.monotonic()

    async def _send_blob(self, request: web.Request, resp: web.StreamResponse, blob_hex: str, pos: int, n: int) -> None:
        source = await self._store.open_verified(blob_hex=blob_hex)
        if source is None:
            raise ConnectionAbortedError("the file left this node")
        count = self._metrics.local_served_bytes.labels("hf").inc if self._metrics is not None else _uncounted
        with source:
            sent = await send_blob(request, resp, source, pos, n, count)
        if sent < n:
            raise ConnectionAbortedError("file ended early")


def _uncounted(n: int) -> None:
    pass


_GGUF_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
DEFAULT_GGUF_TAGS = ("Q4_K_M", "Q8_0")  # llama.cpp's own preference when no tag is given


def _is_model_gguf(path: str) -> bool:
    name = path.rsplit("/", 1)[-1].lower()
    if not name.endswith(".gguf") or "mmproj" in name or "imatrix" in name:
        return False
    split = _SPLIT.search(name)
    return split is None or int(split.group(1)) == 1  # a split model is named by its first part


def pick_gguf(paths: list[str], tag: str) -> tuple[str | None, str | None]:
    """(the model file, its mmproj file) for ``org/m:tag``, as llama.cpp chooses: the first GGUF
    whose name has ``<tag>.`` or ``<tag>-`` (any case); with no tag (``latest``) Q4_K_M, then
    Q8_0, then the first GGUF. The mmproj file is one in the model's folder, else any."""
    models = [p for p in paths if _is_model_gguf(p)]
    tags = DEFAULT_GGUF_TAGS if tag.lower() == "latest" else (tag,)
    model = None
    for t in tags:
        pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
        model = next((p for p in models if pattern.search(p)), None)
        if model is not None:
            break
    if model is None and tag.lower() == "latest" and models:
        model = models[0]
    if model is None:
        return None, None
    folder = model.rsplit("/", 1)[0] if "/" in model else ""
    projs = [p for p in paths if p.lower().endswith(".gguf") and "mmproj" in p.rsplit("/", 1)[-1].lower()]
    same = [p for p in projs if (p.rsplit("/", 1)[0] if "/" in p else "") == folder]
    return model, (same or projs or [None])[0]


def _gguf_file(entry: dict[str, Any]) -> dict[str, Any]:
    lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else None
    out: dict[str, Any] = {"rfilename": entry["path"], "size": entry.get("size", 0)}
    if lfs:
        out["blobId"] = lfs.get("oid", "")
        out["lfs"] = {
            "sha256": lfs.get("oid", ""),
            "size": lfs.get("size", 0),
            "pointerSize": lfs.get("pointerSize", 0),
        }
    else:
        out["blobId"] = entry.get("oid", "")
    return out


def _branches_of(doc: Any) -> dict[str, str]:
    """``{name: commit}`` of a ``/refs`` answer's branches (bounded, validated)."""
    out: dict[str, str] = {}
    branches = doc.get("branches") if isinstance(doc, dict) else None
    for b in branches[:64] if isinstance(branches, list) else ():
        name, commit = (b.get("name"), b.get("targetCommit")) if isinstance(b, dict) else (None, None)
        if isinstance(name, str) and isinstance(commit, str) and _COMMIT.match(commit):
            try:
                out[ModelRef.parse(f"hf://x/y@{name}").revision] = commit
            except CachedError:
                continue
    return out


def _unreachable(e: OriginError) -> bool:
    """The hub could not answer (no connection, a timeout, a 5xx): the store may answer instead.
    A 4xx is the hub's answer and is relayed."""
    return e.status is None or e.status >= 500


def _offline_headers(offline: bool) -> dict[str, str]:
    return {OFFLINE_HEADER: "1"} if offline else {}


def _origin_meta(f: OriginFile) -> dict[str, str]:
    # What ModelFetcher records per file: identity and address, then the hub's checksums.
    return {"identity": f.identity, "locator": f.locator, **f.checksums}


def _bad_request(message: str) -> web.HTTPBadRequest:
    # Printable ASCII only: it becomes a status line and a header, and may quote the client.
    safe = "".join(c if 32 <= ord(c) < 127 else "?" for c in message[:500])
    return web.HTTPBadRequest(reason=safe, headers={"X-Error-Message": safe})


def _encoded_path(path: str) -> str:
    """A repo file path, validated and percent-encoded segment by segment."""
    try:
        validate_file_path(path)
    except ValueError:
        raise _bad_request(f"invalid file path {path[:300]!r}") from None
    return "/".join(quote(seg, safe="") for seg in path.split("/"))
