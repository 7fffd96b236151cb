"""``modelscope://`` origin: a ModelScope hub (or a mirror of its API), spoken as plain HTTP.

The protocol is the one the ModelScope SDK itself speaks (``modelscope_hub._legacy_api``, which
``modelscope.hub`` >= 1.38 delegates to; the older ``modelscope/hub/api.py`` used the same URLs):

* ``GET /api/v1/models/{org}/{name}/revisions`` -> ``Data.RevisionMap.{Branches,Tags}[]``, each
  with ``Revision`` (the name) and ``CreatedAt``. Used to refuse an unknown revision clearly and,
  where an entry carries a 40-hex ``CommitId``, to pin the revision to that commit.
* ``GET /api/v1/models/{org}/{name}/commits?Ref=R&PageNumber=1&PageSize=1`` -> ``Data.Commit[0].Id``,
  the newest commit of R (``HubApi.list_repo_commits`` of the 1.2x-1.37 SDK): the commit the
  revision is pinned to when the revisions answer has none.
* ``GET /api/v1/models/{org}/{name}/repo/files?Revision=R&Recursive=True`` ->
  ``Data.Files[]`` with ``Path``, ``Name``, ``Size``, ``Sha256``, ``Type`` (``blob``/``tree``)
  and ``Revision`` (the commit that last changed the file). The hub truncates one listing at
  3000 entries; a listing that long is refused (narrow the ref with ``include=``) rather than
  taken as the whole model.
* ``GET /api/v1/models/{org}/{name}/repo?Revision=R&FilePath=P``: the file's bytes (``Range``
  honoured; the public hub may answer with a redirect to object storage, followed without the
  token).

Pinning: the model's revision is the commit the branch or tag names at resolve time (``CommitId``,
else the newest of ``/commits``); a hub without the commits call leaves the revision name as
listed (then ``--refresh`` of a moved branch keeps the old copy). Each file is also read at its
own listed commit (``Revision`` of the entry, when it is a 40-hex id):
the branch moving after resolve cannot change what is fetched. Each file's ``Sha256`` from the
listing is its identity and is checked over the complete file before it may become a blob.

The token (``origins.modelscope.token_file``, else ``MODELSCOPE_API_TOKEN``) is sent as the SDK
sends it: ``Authorization: Bearer`` and the ``m_session_id`` cookie, to the hub only.

This module does not retry, write to the store or verify BLAKE3: the transfer layer does that.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from collections.abc import AsyncIterator, Mapping
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urljoin

import aiohttp
from yarl import URL

from cached.config import HttpOriginConfig, ModelScopeOriginConfig
from cached.errors import IntegrityError, OriginDenied, OriginError, OriginNotFound
from cached.origins import Resolution, stream_by_ranges
from cached.origins.hf import sha256_sync
from cached.origins.http import MAX_REDIRECTS, check_pinned_range, client_error, range_error, status_error
from cached.rangeio import Check, RangeIOError, Redirected, Sink, ThreadedRangeReader
from cached.types import ModelRef, OriginFile, validate_file_path

API = "/api/v1/models"
LISTING_LIMIT = 3000  # the hub's silent cap on one repo/files answer (modelscope_hub.constants)
MAX_JSON_BYTES = 64 << 20  # a listing of 3000 entries is a few MB; anything far larger is not one
_READ_CHUNK = 8 << 20
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TOKEN_HINT = "set MODELSCOPE_API_TOKEN or origins.modelscope.token_file to a token that can read it"


def modelscope_error(status: int, body: Any, what: str, *, token_sent: bool) -> OriginError:
    """A hub answer as a typed error; the hub's own ``Message`` (JSON body) is kept."""
    message = body.get("Message") if isinstance(body, dict) else None
    code = body.get("Code") if isinstance(body, dict) else None
    detail = f"{what}: HTTP {status}" + (f" ({str(message)[:200]})" if message else "")
    upstream = str(code) if code is not None else None
    if status in (401, 403):
        why = (
            "the token was refused for this model"
            if token_sent
            else f"the model is private or needs a login, and no token is configured; {TOKEN_HINT}"
        )
        return OriginDenied(f"{detail}: {why}", status=status, upstream_code=upstream)
    if status == 404:
        return OriginNotFound(
            f"{detail}: no such model, revision or file (or the model is private and the token does not grant it)",
            status=status,
            upstream_code=upstream,
        )
    err = status_error(status, what, f"({str(message)[:200]})" if message else "")
    err.upstream_code = upstream
    return err


class ModelScopeOrigin:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        cfg: ModelScopeOriginConfig,
        http_cfg: HttpOriginConfig,
        reader: ThreadedRangeReader,
        *,
        token: str | None = None,
    ) -> None:
        self._session = session
        self._reader = reader  # file bytes: worker threads, off the event loop
        self.endpoint = cfg.endpoint.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=http_cfg.connect_timeout_s, sock_read=http_cfg.read_timeout_s
        )

    # --- requests ------------------------------------------------------------------------------

    def _auth(self) -> dict[str, str]:
        # As the SDK: newer endpoints read the Bearer header, older ones the m_session_id cookie.
        if not self._token:
            return {}
        return {"Authorization": f"Bearer {self._token}", "Cookie": f"m_session_id={self._token}"}

    def _model_url(self, repo: str, tail: str, params: Mapping[str, str] | None = None) -> str:
        org, _, name = repo.rpartition("/")
        path = f"{API}/{quote(org, safe='')}/{quote(name, safe='')}" if org else f"{API}/{quote(name, safe='')}"
        return self.endpoint + path + tail + (f"?{urlencode(params)}" if params else "")

    async def api_json(self, url: str) -> Any:
        """GET ``url`` and return its ``Data``; an error status or ``Success: false`` raises."""
        try:
            async with self._session.get(URL(url, encoded=True), headers=self._auth(), timeout=self._timeout) as resp:
                raw = await resp.content.read(MAX_JSON_BYTES + 1)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                if resp.status != 200:
                    raise modelscope_error(resp.status, body, url, token_sent=bool(self._token))
        except OriginError:
            raise
        except (TimeoutError, aiohttp.ClientError) as e:
            raise client_error(e, url) from None
        if len(raw) > MAX_JSON_BYTES or not isinstance(body, dict):
            raise OriginError(f"{url}: the hub answered something that is not a JSON object", retryable=True)
        if body.get("Success") is False or body.get("Code") not in (None, 200, "200"):
            # The old API answers some errors with 200 and Code/Success in the body.
            code = body.get("Code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 400
            raise modelscope_error(status, body, url, token_sent=bool(self._token))
        return body.get("Data")

    async def revision_of(self, repo: str, revision: str) -> str:
        """The commit ``revision`` names now: a 40-hex revision as is; else the revisions entry's
        ``CommitId`` where the hub gives one, else the newest commit of ``/commits?Ref=``; a hub
        without that call (404) leaves the revision name as listed."""
        if _HEX40.match(revision):
            return revision
        data = await self.api_json(self._model_url(repo, "/revisions"))
        rmap = data.get("RevisionMap") if isinstance(data, dict) else None
        if not isinstance(rmap, dict):
            raise OriginError(f"{self.endpoint}: revisions of {repo}: no RevisionMap in the answer", retryable=False)
        entries = [e for kind in ("Tags", "Branches") for e in (rmap.get(kind) or []) if isinstance(e, dict)]
        entry = next((e for e in entries if e.get("Revision") == revision), None)
        if entry is None:
            known = sorted({str(e.get("Revision")) for e in entries})[:20]
            raise OriginNotFound(
                f"modelscope://{repo}: no revision {revision!r} (the hub lists {', '.join(known) or 'none'})"
            )
        commit = entry.get("CommitId")
        if isinstance(commit, str) and _HEX40.match(commit):
            return commit
        return await self.head_commit(repo, revision) or revision

    async def head_commit(self, repo: str, revision: str) -> str | None:
        """The newest commit of ``revision`` (``GET /commits?Ref=``), None if the hub has no such call."""
        url = self._model_url(repo, "/commits", {"Ref": revision, "PageNumber": "1", "PageSize": "1"})
        try:
            data = await self.api_json(url)
        except OriginNotFound:
            return None  # a mirror without the commits API: the files are still pinned one by one
        commits = data.get("Commit") if isinstance(data, dict) else None
        first = commits[0] if isinstance(commits, list) and commits and isinstance(commits[0], dict) else {}
        commit = first.get("Id")
        if not isinstance(commit, str) or not _HEX40.match(commit):
            raise OriginError(f"{url}: the newest commit has no 40-hex Id", retryable=False)
        return commit

    async def listing(self, repo: str, revision: str) -> list[dict[str, Any]]:
        url = self._model_url(repo, "/repo/files", {"Revision": revision, "Recursive": "True"})
        data = await self.api_json(url)
        files = data.get("Files") if isinstance(data, dict) else data
        if files is None:
            return []
        if not isinstance(files, list):
            raise OriginError(f"{url}: Data.Files is not a list", retryable=False)
        if len(files) >= LISTING_LIMIT:
            raise OriginError(
                f"modelscope://{repo}@{revision}: the hub lists at most {LISTING_LIMIT} entries and this listing "
                "reached that cap, so it may be incomplete; narrow the ref with ?include=",
                retryable=False,
            )
        return [e for e in files if isinstance(e, dict) and e.get("Type", "blob") == "blob"]

    # --- origin protocol -----------------------------------------------------------------------

    async def resolve(self, ref: ModelRef) -> Resolution:
        pinned = await self.revision_of(ref.repo, ref.revision)
        files: list[OriginFile] = []
        for e in await self.listing(ref.repo, pinned):
            path = e.get("Path")
            if not isinstance(path, str) or path in (".gitattributes", ".gitignore"):
                continue  # the SDK skips these too: git bookkeeping, not model files
            try:
                validate_file_path(path)
            except ValueError:
                continue  # a path we could not place safely on disk
            if not _selected(path, ref.include, ref.exclude):
                continue
            size, sha256, commit = e.get("Size"), e.get("Sha256"), e.get("Revision")
            checksums = {"sha256": sha256.lower()} if isinstance(sha256, str) and sha256 else {}
            if isinstance(commit, str) and _HEX40.match(commit):
                checksums["commit"] = commit
            files.append(await self.file_for(ref, pinned, path, size, checksums))
        if not files:
            raise OriginNotFound(
                f"{ref}: no files at revision {pinned}"
                + (" match the include/exclude patterns" if ref.include or ref.exclude else "")
            )
        return Resolution(files=tuple(files), revision=pinned)

    async def file_for(
        self, ref: ModelRef, revision: str | None, path: str, size: int, checksums: Mapping[str, str]
    ) -> OriginFile:
        """``{endpoint}/api/v1/models/{ref.repo}/repo?Revision=C&FilePath=P``, C the file's own
        commit (else the pinned revision): this daemon's endpoint and the ref's repo, whatever
        address a manifest or a peer may carry."""
        sha256, commit = checksums.get("sha256", ""), checksums.get("commit", "")
        try:
            validate_file_path(path)
        except ValueError as e:
            raise OriginError(f"{ref}: bad file path {path!r}: {e}", retryable=False) from None
        if not _selected(path, ref.include, ref.exclude):
            raise OriginError(f"{ref}: {path!r} is not a file of this ref", retryable=False)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OriginError(f"{ref}: bad size {size!r} for {path!r}", retryable=False)
        if sha256 and not _HEX64.match(sha256):
            raise OriginError(f"{ref}: {path!r} has a malformed Sha256 {sha256[:80]!r}", retryable=False)
        if commit and not _HEX40.match(commit):
            raise OriginError(f"{ref}: {path!r} has a malformed commit {commit[:80]!r}", retryable=False)
        if not isinstance(revision, str) or not revision:
            raise OriginError(f"{ref}: no revision for {path!r}", retryable=False)
        at = commit or revision
        if not sha256 and not _HEX40.match(at):
            # Neither a content hash nor a commit pins these bytes: a moving branch could mix versions.
            raise OriginError(f"{ref}: {path!r} has neither a Sha256 nor a commit in the listing", retryable=False)
        facts = {"sha256": sha256} if sha256 else {}
        if commit:
            facts["commit"] = commit
        # Content-addressed like hf:// LFS files: the same bytes under another ref reuse the blob.
        identity = f"sha256|{sha256}|{size}" if sha256 else f"modelscope|{ref.repo}|{at}|{path}|{size}"
        return OriginFile(
            path=path,
            size=size,
            identity=identity,
            checksums=facts,
            locator=self._model_url(ref.repo, "/repo", {"Revision": at, "FilePath": path}),
        )

    def supports_ranges(self, file: OriginFile) -> bool:
        return True

    def local_path(self, file: OriginFile) -> str | None:
        return None

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes | bytearray:
        buf = bytearray(length)
        view = memoryview(buf)

        def sink(data: memoryview, pos: int) -> None:
            view[pos - offset : pos - offset + len(data)] = data

        await self.read_range_into(file, offset, length, sink)
        return buf

    async def read_range_into(self, file: OriginFile, offset: int, length: int, sink: Sink) -> None:
        """Ask the hub; follow redirects (object storage), with the token only to the hub itself."""
        url = file.locator
        try:
            for _ in range(MAX_REDIRECTS):
                try:
                    same_host = URL(url).origin() == URL(file.locator).origin()
                except ValueError as e:
                    raise OriginError(f"{file.locator}: redirected to a bad URL: {e}", retryable=False) from None
                try:
                    await self._reader.read_into(
                        url,
                        offset,
                        length,
                        sink,
                        check=self._range_check(file),
                        headers=self._auth() if same_host else {},
                    )
                    return
                except Redirected as r:
                    url = urljoin(url, r.location)
            raise OriginError(f"{file.locator}: more than {MAX_REDIRECTS} redirects", retryable=False)
        except RangeIOError as e:
            raise range_error(e, file.locator) from None

    def _range_check(self, file: OriginFile) -> Check:
        def check(status: int, headers: Message) -> None:
            check_pinned_range(
                status,
                headers,
                file,
                lambda: modelscope_error(status, None, file.locator, token_sent=bool(self._token)),
            )

        return check

    def stream(self, file: OriginFile) -> AsyncIterator[bytes]:
        return stream_by_ranges(self, file, _READ_CHUNK)

    async def check_unchanged(self, file: OriginFile) -> None:
        return None  # the commit or the Sha256 pins the content; check_content proves the bytes

    async def check_content(self, file: OriginFile, data_path: Path) -> None:
        """The listing's Sha256 over the complete file, before it may become a blob."""
        want = file.checksums.get("sha256")
        if not want:
            return
        got = await asyncio.to_thread(sha256_sync, data_path)
        if got != want:
            raise IntegrityError(
                f"{file.path}: sha256 {got} does not match the Sha256 {want} the ModelScope listing gave; "
                "the file was discarded"
            )


def _selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(path, p) for p in exclude)
