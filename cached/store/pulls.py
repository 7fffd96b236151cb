"""What the ``/hf`` endpoint pulled, remembered across restarts: ``pulls/<models--org--name>.json``.

Files fetched through the endpoint accumulate into one model per repo and commit
(``hf://org/m@<commit>``). Two facts about that model are not in its manifest and live here:

- ``branches``: the commit each branch, tag or ``refs/pr/N`` last resolved to at the hub, and when.
  The ``hf/`` view writes ``refs/<revision>`` from it, and while the hub is unreachable the
  endpoint answers revision calls with it (the last resolved commit, marked offline).
- ``listings``: every path the hub lists at a commit (empty: not known, the hub's tree call
  failed). A pulled model holding fewer files, or whose listing is not known, is partial: it is
  not answered as the whole repo, and a prefetch of it fetches the rest.

A commit's entry is dropped once a whole-repo fetch of it has committed (the model is complete and
ordinary from then on). Nothing here decides what to fetch; the index stays the source of truth for
what is held (an entry whose commit the index no longer holds is ignored, and pruned when the repo
is next written). A damaged file is skipped with a warning, as the index skips a bad entry.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cached.store import durable

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MAX_BRANCHES = 256  # per repo: a client cycling through refs/pr/N must not grow the file forever
MAX_LISTINGS = 64  # commits per repo whose listing is kept


@dataclass(slots=True)
class RepoPulls:
    branches: dict[str, tuple[str, float]] = field(default_factory=dict)  # revision -> (commit, when)
    listings: dict[str, tuple[str, ...]] = field(default_factory=dict)  # commit -> every path

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "branches": {r: {"commit": c, "at": t} for r, (c, t) in sorted(self.branches.items())},
            "listings": {c: list(paths) for c, paths in sorted(self.listings.items())},
        }

    @classmethod
    def from_json(cls, d: Any) -> RepoPulls:
        if not isinstance(d, dict) or d.get("version") != 1:
            raise ValueError("not a version 1 pulls record")
        out = cls()
        for rev, e in dict(d.get("branches") or {}).items():
            commit, at = e["commit"], float(e["at"])
            if isinstance(rev, str) and isinstance(commit, str) and _COMMIT.match(commit):
                out.branches[rev] = (commit, at)
        for commit, paths in dict(d.get("listings") or {}).items():
            if _COMMIT.match(commit) and isinstance(paths, list) and all(isinstance(p, str) for p in paths):
                out.listings[commit] = tuple(paths)
        return out


def folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


class Pulls:
    """Loaded at open (``load_sync``); read and changed on the event loop; each write replaces
    the repo's file atomically (``save_sync`` on a worker thread)."""

    def __init__(self, pulls_dir: Path) -> None:
        self._dir = pulls_dir
        self._repos: dict[str, RepoPulls] = {}

    def load_sync(self) -> None:
        durable.make_dirs(self._dir)
        for path in self._dir.glob("models--*.json"):
            try:
                data = json.loads(path.read_bytes())
                repo = str(data["repo"])
                if folder(repo) + ".json" != path.name:
                    raise ValueError("repo does not match the file name")
                self._repos[repo] = RepoPulls.from_json(data)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("skipping damaged pulls record file=%s reason=%s", path, e)

    def prune_sync(self, held_repos: set[str]) -> None:
        """At open: forget repos the store holds nothing of (their files are gone, or they were
        only ever asked about), so the records stay as many as the repos held."""
        for repo in [r for r in self._repos if r not in held_repos]:
            del self._repos[repo]
            (self._dir / (folder(repo) + ".json")).unlink(missing_ok=True)

    def save_sync(self, repo: str) -> None:
        rec = self._repos.get(repo)
        path = self._dir / (folder(repo) + ".json")
        if rec is None or not (rec.branches or rec.listings):
            path.unlink(missing_ok=True)
            return
        durable.make_dirs(self._dir)
        durable.atomic_write(path, json.dumps({"repo": repo, **rec.to_json()}, sort_keys=True).encode())

    # --- queries -------------------------------------------------------------------------------

    def branch(self, repo: str, revision: str) -> str | None:
        rec = self._repos.get(repo)
        entry = rec.branches.get(revision) if rec else None
        return entry[0] if entry else None

    def branches(self, repo: str) -> dict[str, tuple[str, float]]:
        rec = self._repos.get(repo)
        return dict(rec.branches) if rec else {}

    def listing(self, repo: str, commit: str) -> tuple[str, ...] | None:
        rec = self._repos.get(repo)
        return rec.listings.get(commit) if rec else None

    def is_pulled(self, repo: str, commit: str) -> bool:
        rec = self._repos.get(repo)
        return rec is not None and commit in rec.listings

    def missing(self, repo: str, commit: str, held: set[str]) -> tuple[str, ...] | None:
        """Paths of a pulled commit not held: () when complete or not a pull, None when the
        listing is not known (then it counts as partial)."""
        listing = self.listing(repo, commit)
        if listing is None:
            return ()
        if not listing:
            return None
        return tuple(p for p in listing if p not in held)

    # --- changes (the caller saves) ------------------------------------------------------------

    def note_branch(self, repo: str, revision: str, commit: str, when: float) -> bool:
        """True if this changed what is recorded (the caller then saves and re-syncs the view)."""
        rec = self._repos.setdefault(repo, RepoPulls())
        old = rec.branches.get(revision)
        if old is not None and old[0] == commit and when - old[1] < 3600:
            return False  # the time is only refreshed hourly: one write per request would be waste
        rec.branches[revision] = (commit, when)
        while len(rec.branches) > MAX_BRANCHES:
            del rec.branches[min(rec.branches, key=lambda r: rec.branches[r][1])]
        return True

    def note_listing(self, repo: str, commit: str, paths: tuple[str, ...]) -> bool:
        rec = self._repos.setdefault(repo, RepoPulls())
        if rec.listings.get(commit) == paths:
            return False
        rec.listings[commit] = paths
        while len(rec.listings) > MAX_LISTINGS:
            del rec.listings[next(iter(rec.listings))]
        return True

    def forget_listing(self, repo: str, commit: str) -> bool:
        rec = self._repos.get(repo)
        return rec is not None and rec.listings.pop(commit, None) is not None
