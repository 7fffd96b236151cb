"""A ModelScope hub double on 127.0.0.1 for tests, written from the SDK's own client code.

The subset of the hub's ``/api/v1`` API that a download uses (``modelscope_hub._legacy_api`` and
``_download``, which ``modelscope.hub`` >= 1.38 delegates to; the pre-1.38 ``hub/api.py`` used the
same URLs and JSON):

* ``GET /api/v1/models/{org}/{name}`` -> ``Data`` with ``Id``, ``Path``, ``Name``, ``Private``.
* ``GET /api/v1/models/{org}/{name}/revisions`` -> ``Data.RevisionMap.{Branches,Tags}[]`` with
  ``Revision`` and ``CreatedAt`` (and ``CommitId`` when ``commit_ids=True``).
* ``GET /api/v1/models/{org}/{name}/commits?Ref=R&PageNumber=1&PageSize=N`` -> ``Data.Commit[]``
  (``Id``, ``ShortId``, ``Title``, ``CommittedDate``), newest first, and ``TotalCount``
  (``HubApi.list_repo_commits`` of the 1.2x-1.37 SDK); ``commits_api=False`` makes it a 404.
* ``GET /api/v1/models/{org}/{name}/repo/files?Revision=R&Recursive=True[&Root=D]`` ->
  ``Data.Files[]`` with ``Path``, ``Name``, ``Size``, ``Sha256``, ``Type`` (``blob``/``tree``),
  ``Revision`` (the commit that last changed the file), ``CommitMessage``, ``CommittedDate``,
  ``IsLFS``, ``Mode``.
* ``GET /api/v1/models/{org}/{name}/repo?Revision=R&FilePath=P``: the bytes, ``Range`` honoured
  (206 + ``Content-Range``).

Every answer is the hub's envelope ``{"Code", "Data", "Message", "RequestId", "Success"}``. R is a
branch, a tag or a commit id. A private model wants the token as ``Authorization: Bearer`` or the
``m_session_id`` cookie (the SDK sends both): none is 401, a wrong one 403. ``lie_sha256`` makes the
listing give a wrong ``Sha256`` for one path, ``fail_file`` answers the next file reads with an error
status, ``storage_redirect`` answers file reads with a 302 to "object storage" on 127.0.0.2 (as the
public hub does). Counters record what the hub (and the storage) was asked and served.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"
STORAGE_HOST = "127.0.0.2"  # "object storage" the public hub redirects file reads to
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_EPOCH = 1_700_000_000


@dataclass
class MsModel:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes
    last_change: dict[str, dict[str, str]] = field(default_factory=dict)  # commit -> path -> commit
    created: dict[str, int] = field(default_factory=dict)  # revision name -> CreatedAt
    parent: dict[str, str | None] = field(default_factory=dict)  # commit -> its parent

    def resolve(self, rev: str) -> str | None:
        if rev in self.tags:
            return self.tags[rev]
        if rev in self.branches:
            return self.branches[rev]
        return rev if rev in self.commits else None


@dataclass
class Counters:
    requests: collections.Counter[str] = field(default_factory=collections.Counter)  # kind -> count
    file_bytes: int = 0
    file_revisions: list[str] = field(default_factory=list)  # the Revision= of each file read
    auth_seen: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, bearer, cookie)


class _Error(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ModelScopeHub:
    def __init__(
        self,
        *,
        token: str | None = None,
        commit_ids: bool = False,
        commits_api: bool = True,
        storage_redirect: bool = False,
    ) -> None:
        self.token = token
        self.commit_ids = commit_ids
        self.commits_api = commits_api  # False: a mirror without /commits (404)
        self.storage_redirect = storage_redirect  # file reads answered 302 to STORAGE_HOST
        self.fail_file: list[int] = []  # statuses answered to the next file reads, one each
        self.listing_body: bytes | None = None  # a raw answer to every listing (hostile-input tests)
        self.models: dict[str, MsModel] = {}
        self.lie_sha256: dict[tuple[str, str], str] = {}
        self.after_listing: list[Any] = []  # callables run once each, right after a listing is answered
        self.counters = Counters()
        self._runner: web.AppRunner | None = None
        self._storage: web.AppRunner | None = None
        self._port = 0
        self._storage_port = 0
        self._blobs: dict[str, bytes] = {}  # sha256 -> bytes, for the storage
        self._seq = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._port}"

    async def start(self) -> ModelScopeHub:
        app = web.Application()
        app.router.add_get("/api/v1/models/{org}/{name}", self._info)
        app.router.add_get("/api/v1/models/{org}/{name}/revisions", self._revisions)
        app.router.add_get("/api/v1/models/{org}/{name}/repo/files", self._files)
        app.router.add_get("/api/v1/models/{org}/{name}/commits", self._commits)
        app.router.add_get("/api/v1/models/{org}/{name}/repo", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.storage_redirect:
            storage = web.Application()
            storage.router.add_get("/oss/{sha256}", self._storage_get)
            self._storage = web.AppRunner(storage, access_log=None)
            await self._storage.setup()
            ssite = web.TCPSite(self._storage, STORAGE_HOST, 0)
            await ssite.start()
            self._storage_port = ssite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._storage is not None:
            await self._storage.cleanup()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> ModelScopeHub:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self) -> None:
        self.counters = Counters()

    # --- building models -------------------------------------------------------------------------

    def add_model(self, repo: str, files: dict[str, bytes], *, private: bool = False) -> str:
        self.models[repo] = MsModel(private=private)
        return self.commit(repo, files)

    def commit(self, repo: str, files: dict[str, bytes], branch: str = "master") -> str:
        """A new commit holding exactly ``files`` on ``branch``; returns its id."""
        m = self.models[repo]
        self._seq += 1
        parent = m.branches.get(branch)
        commit = hashlib.sha1(f"{repo}\0{branch}\0{self._seq}".encode()).hexdigest()
        old, old_change = (m.commits[parent], m.last_change[parent]) if parent else ({}, {})
        m.commits[commit] = dict(files)
        m.last_change[commit] = {p: old_change[p] if old.get(p) == data else commit for p, data in files.items()}
        m.branches[branch] = commit
        m.parent[commit] = parent
        m.created.setdefault(branch, _EPOCH + self._seq)
        return commit

    def add_tag(self, repo: str, tag: str, rev: str = "master") -> str:
        m = self.models[repo]
        commit = m.resolve(rev)
        assert commit is not None, rev
        m.tags[tag] = commit
        self._seq += 1
        m.created[tag] = _EPOCH + self._seq
        return commit

    def files(self, repo: str, rev: str = "master") -> dict[str, bytes]:
        m = self.models[repo]
        commit = m.resolve(rev)
        assert commit is not None, rev
        return dict(m.commits[commit])

    # --- requests --------------------------------------------------------------------------------

    def _model(self, request: web.Request, kind: str) -> MsModel:
        self.counters.requests[kind] += 1
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        cookie = request.cookies.get("m_session_id", "")
        self.counters.auth_seen.append((kind, bearer, cookie))
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        m = self.models.get(repo)
        if m is None:
            raise _Error(404, 10010205, f"model {repo} does not exist")
        if m.private:
            offered = {t for t in (bearer, cookie) if t}
            if not offered:
                raise _Error(401, 10010901, "login required: this model is private")
            if self.token not in offered:
                raise _Error(403, 10010903, "permission denied for this model")
        return m

    def _commit(self, request: web.Request, m: MsModel) -> str:
        rev = request.query.get("Revision") or "master"
        commit = m.resolve(rev)
        if commit is None:
            raise _Error(404, 10010206, f"revision {rev} does not exist")
        return commit

    @staticmethod
    def _ok(data: Any) -> web.Response:
        body = {"Code": 200, "Data": data, "Message": "success", "RequestId": uuid.uuid4().hex, "Success": True}
        return web.json_response(body)

    @staticmethod
    def _fail(e: _Error) -> web.Response:
        body = {"Code": e.code, "Data": None, "Message": e.message, "RequestId": uuid.uuid4().hex, "Success": False}
        return web.Response(status=e.status, text=json.dumps(body), content_type="application/json")

    async def _info(self, request: web.Request) -> web.Response:
        try:
            m = self._model(request, "info")
        except _Error as e:
            return self._fail(e)
        org, name = request.match_info["org"], request.match_info["name"]
        return self._ok({"Id": 1, "Path": org, "Name": name, "Private": m.private})

    async def _revisions(self, request: web.Request) -> web.Response:
        try:
            m = self._model(request, "revisions")
        except _Error as e:
            return self._fail(e)

        def entries(named: dict[str, str]) -> list[dict[str, Any]]:
            out = []
            for name, commit in sorted(named.items(), key=lambda kv: -m.created.get(kv[0], 0)):
                e: dict[str, Any] = {"Revision": name, "CreatedAt": m.created.get(name, _EPOCH), "CreatedBy": "test"}
                if self.commit_ids:
                    e["CommitId"] = commit
                out.append(e)
            return out

        return self._ok({"RevisionMap": {"Branches": entries(m.branches), "Tags": entries(m.tags)}})

    async def _commits(self, request: web.Request) -> web.Response:
        """The branch's history, newest first, paged (``Ref``, ``PageNumber``, ``PageSize``)."""
        try:
            if not self.commits_api:
                raise _Error(404, 10010404, "no such API")
            m = self._model(request, "commits")
            rev = request.query.get("Ref") or "master"
            commit = m.resolve(rev)
            if commit is None:
                raise _Error(404, 10010206, f"revision {rev} does not exist")
        except _Error as e:
            return self._fail(e)
        history: list[str] = []
        at: str | None = commit
        while at is not None:
            history.append(at)
            at = m.parent.get(at)
        number = max(1, int(request.query.get("PageNumber", "1")))
        size = max(1, min(100, int(request.query.get("PageSize", "50"))))
        page = history[(number - 1) * size : number * size]
        entries = [
            {"Id": c, "ShortId": c[:8], "Title": "update", "Message": "update", "CommittedDate": _EPOCH} for c in page
        ]
        body = {"Code": 200, "Data": {"Commit": entries}, "TotalCount": len(history), "Success": True}
        return web.json_response(body)

    async def _files(self, request: web.Request) -> web.Response:
        try:
            m = self._model(request, "files")
            commit = self._commit(request, m)
        except _Error as e:
            return self._fail(e)
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if self.listing_body is not None:
            return web.Response(body=self.listing_body, content_type="application/json")
        recursive = request.query.get("Recursive", "False").lower() == "true"
        root = request.query.get("Root", "").strip("/")
        files = m.commits[commit]
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path in sorted(files):
            if root and not path.startswith(root + "/"):
                continue
            rel = path[len(root) + 1 :] if root else path
            if not recursive and "/" in rel:
                dirs.add((root + "/" if root else "") + rel.split("/")[0])
                continue
            parts = path.split("/")
            for i in range(len(root.split("/")) if root else 0, len(parts) - 1):
                dirs.add("/".join(parts[: i + 1]))
            data = files[path]
            changed = m.last_change[commit][path]
            out.append(
                {
                    "CommitMessage": "update",
                    "CommittedDate": _EPOCH,
                    "CommitterName": "test",
                    "InCheck": False,
                    "IsLFS": len(data) > 1024,
                    "Mode": "33188",
                    "Name": parts[-1],
                    "Path": path,
                    "Revision": changed,
                    "Sha256": self.lie_sha256.get((repo, path), hashlib.sha256(data).hexdigest()),
                    "Size": len(data),
                    "Type": "blob",
                }
            )
        trees = [
            {"CommitId": None, "CommitMessage": "", "Name": d.split("/")[-1], "Path": d, "Size": 0, "Type": "tree"}
            for d in sorted(dirs)
        ]
        answer = self._ok({"Files": trees + out})
        while self.after_listing:
            self.after_listing.pop(0)()
        return answer

    async def _file(self, request: web.Request) -> web.StreamResponse:
        try:
            m = self._model(request, "file")
            commit = self._commit(request, m)
            path = request.query.get("FilePath", "")
            data = m.commits[commit].get(path)
            if data is None:
                raise _Error(404, 10010207, f"file {path} does not exist at {commit}")
        except _Error as e:
            return self._fail(e)
        self.counters.file_revisions.append(request.query.get("Revision", ""))
        if self.fail_file:
            return self._fail(_Error(self.fail_file.pop(0), 10050001, "injected failure"))
        if self.storage_redirect:
            sha = hashlib.sha256(data).hexdigest()
            self._blobs[sha] = data
            where = f"http://{STORAGE_HOST}:{self._storage_port}/oss/{sha}?Expires=1&Signature=x"
            return web.Response(status=302, headers={"Location": where})
        return self._serve(request, data)

    async def _storage_get(self, request: web.Request) -> web.StreamResponse:
        self.counters.requests["storage"] += 1
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.counters.auth_seen.append(("storage", bearer, request.cookies.get("m_session_id", "")))
        data = self._blobs.get(request.match_info["sha256"])
        if data is None:
            return web.Response(status=404)
        return self._serve(request, data)

    def _serve(self, request: web.Request, data: bytes) -> web.Response:
        start, end, status = 0, len(data), 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        match = _RANGE.match(request.headers.get("Range", ""))
        if match and (match[1] or match[2]):
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
            else:
                start = max(0, len(data) - int(match[2]))
            if start >= len(data) or start >= end:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        self.counters.file_bytes += len(body)
        return web.Response(status=status, body=body, headers=headers)
