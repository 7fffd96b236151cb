"""Where each thing lives under ``cache_dir``: one place names every directory and file of the store.

``blobs/<2 hex>/<hex>`` (0440) with its ``.pieces`` sidecar, ``partial/<key>`` with its ``.pieces``
log, ``manifests/<digest>.json``, ``refs/<escaped ref>``, ``models/<escaped ref>/`` (the launcher
view), ``hf/`` (the hub-cache view), ``pulls/`` (what /hf pulled: branch commits, listings),
``claims/`` and ``tmp/`` (per-attempt files, swept at start).
Pure: paths only, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cached.types import ModelRef


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial"

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def refs_dir(self) -> Path:
        return self.root / "refs"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def hf_dir(self) -> Path:
        return self.root / "hf"

    @property
    def pulls_dir(self) -> Path:
        return self.root / "pulls"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    def blob_path(self, blob_hex: str) -> Path:
        return self.blobs_dir / blob_hex[:2] / blob_hex

    def sidecar_path(self, blob_hex: str) -> Path:
        return self.blobs_dir / blob_hex[:2] / f"{blob_hex}.pieces"

    def partial_path(self, key: str) -> Path:
        return self.partial_dir / key

    def partial_log_path(self, key: str) -> Path:
        return self.partial_dir / f"{key}.pieces"

    def manifest_path(self, digest: str) -> Path:
        return self.manifests_dir / f"{digest}.json"

    def ref_path(self, ref: ModelRef) -> Path:
        return self.refs_dir / ref.escaped

    def view_path(self, ref: ModelRef) -> Path:
        return self.models_dir / ref.escaped
