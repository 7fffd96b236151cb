"""Origins: where a ref's bytes come from first. One module per kind (file, http, hf,
s3, modelscope, oci for oci:// and ollama://).

An origin resolves a ref into a ``Resolution`` (files with sizes and exact content identities) and
reads byte ranges of those files. ``file_for`` rebuilds one file's address (locator) and identity
from the ref and the file's content facts; it is the only way, besides ``resolve``, that an
``OriginFile`` is made, so an address stored in a manifest or sent by a peer is never requested. It does not write to the store, verify digests or retry: the
transfer layer does that. Errors are ``OriginError`` subclasses with ``retryable`` set honestly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cached.errors import RefError
from cached.rangeio import Sink
from cached.types import ModelRef, OriginFile, RefKind


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolution:
    files: tuple[OriginFile, ...]
    revision: str | None = None


class Origin(Protocol):
    async def resolve(self, ref: ModelRef) -> Resolution: ...

    async def file_for(
        self, ref: ModelRef, revision: str | None, path: str, size: int, checksums: Mapping[str, str]
    ) -> OriginFile:
        """The file ``path`` of ``ref`` at ``revision``, addressed from the ref alone: the
        locator and identity are derived here, ``checksums`` (content facts such as sha256 or an
        ETag) are validated and kept. Raises OriginError/ValueError for a file the ref cannot
        name (a path outside the ref, a malformed revision or checksum)."""
        ...

    def supports_ranges(self, file: OriginFile) -> bool: ...

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes | bytearray: ...

    async def read_range_into(self, file: OriginFile, offset: int, length: int, sink: Sink) -> None:
        """The range handed to ``sink`` (bytes, absolute offset) on a worker thread, in batches
        as they arrive (network origins, through ``cached.rangeio``) or in one (a local read).
        The blob fetcher uses it for piece bodies: each batch is hashed and written while the
        next is on the wire. An exception raised by ``sink`` ends the read and propagates."""
        ...

    def stream(self, file: OriginFile) -> AsyncIterator[bytes]: ...

    def local_path(self, file: OriginFile) -> str | None:
        """A path on this machine holding the file (file origin), so the store may reflink it."""
        ...

    async def check_unchanged(self, file: OriginFile) -> None:
        """Raise OriginChanged if the file changed since it was resolved."""
        ...

    async def check_content(self, file: OriginFile, data_path: Path) -> None:
        """Check the complete bytes against the origin's own checksum, if it has one."""
        ...


async def stream_by_ranges(origin: Origin, file: OriginFile, chunk: int = 8 << 20) -> AsyncIterator[bytes]:
    """``file`` whole, as consecutive ``read_range`` calls: the ``stream`` of every origin whose
    reads are ranged (only http's may be one plain GET, for servers without Range)."""
    offset = 0
    while offset < file.size:
        data = await origin.read_range(file, offset, min(chunk, file.size - offset))
        offset += len(data)
        yield bytes(data)


class Origins:
    """The origins of one daemon, chosen by ref kind."""

    def __init__(self, by_kind: Mapping[RefKind, Origin]) -> None:
        self._by_kind = dict(by_kind)

    def for_ref(self, ref: ModelRef) -> Origin:
        origin = self._by_kind.get(ref.kind)
        if origin is None:
            raise RefError(ref.canonical, f"{ref.kind}:// refs are not supported by this daemon yet")
        return origin
