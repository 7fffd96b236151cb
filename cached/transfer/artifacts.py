"""An OCI artifact's own blobs, fetched as a model through the swarm, for the ``oci://`` origin.

A modelcar's files live inside archive layers that must be whole before they can be unpacked.
Rather than each node downloading them from the registry, the origin asks for the artifact model
``oci://REGISTRY/NAME@DIGEST?path=/.oci`` (the layers as ``blobs/sha256/<hex>``, the same model
the ``/v2`` mirror serves): ``ModelFetcher.fetch`` brings it in like any other model -- peers
first, origin pieces single-flighted across the cluster, each blob checked against its sha256
before it exists -- and the origin unpacks from the store. This module owns that bridge and the
room unpacking may use; it does not unpack (``origins.oci``) or decide what a layer holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from cached.store import Store
from cached.transfer.model import ModelFetcher, Progress
from cached.types import ModelRef


class SwarmArtifacts:
    """``origins.oci.ArtifactBlobs`` over this node's fetch path and store."""

    def __init__(self, fetcher: ModelFetcher, store: Store) -> None:
        self._fetcher = fetcher
        self._store = store

    @contextlib.asynccontextmanager
    async def blobs(self, ref: ModelRef) -> AsyncIterator[Mapping[str, Path]]:
        # Busy while the caller reads: eviction must not take the layers mid-unpack.
        with self._store.busy(ref):
            record = await self._fetcher.fetch(ref, Progress())
            yield {f.path: self._store.blob_path(f.blob.hex) for f in record.manifest.files}

    async def unpack_room(self, spool: Path) -> int:
        """What the store could still promise (free, or freed by eviction), and no more than
        the filesystem holds once every reservation is paid."""
        store = self._store
        room = store.capacity_bytes - store.used_bytes - store.reserved_bytes + store.reclaimable()
        st = await asyncio.to_thread(os.statvfs, spool)  # exists: the layer's work dir is made first
        disk = st.f_bavail * st.f_frsize - store.reserved_bytes
        return max(0, min(room, disk))
