"""``oci://`` and ``ollama://`` origins: model files out of OCI artifacts in a registry.

A ref's tag is resolved to a manifest digest and pinned (the revision, like an hf commit); an index
chooses the entry for this platform (linux/amd64 on x86-64) or its only entry. What the files are:

- a ModelPack artifact (CNCF model-spec): one file per raw layer, named by its
  ``org.cncf.model.filepath`` (or older ``org.cnai.model.filepath``) annotation;
- an Ollama manifest: ``model.gguf`` (``application/vnd.ollama.image.model``) and the other layers
  under their media-type names (``template``, ``params``, ``license``, ``system``, ...);
- archive layers (``.tar``, ``+gzip``, ``+zstd``; a KServe "modelcar" image's layers): the regular
  files inside, for a modelcar only those under its ``/models`` directory (``?path=/dir``);
- ``?path=/.oci`` (``MIRROR_PATH``): the artifact's own blobs as ``blobs/sha256/<hex>`` -- the
  manifest (or index) itself, the config and every layer, unextracted. The ``/v2`` mirror stores
  artifacts this way.

A raw layer is a file whose identity is its sha256 (``sha256|<hex>|<size>``, the hf LFS scheme, so
the same bytes from any origin are one blob); ``check_content`` proves the bytes against the layer
digest before the blob exists, and its pieces may come from peers. An archive layer cannot be read
file by file: it must be whole first. With ``use_artifacts`` (the daemon) it comes as a blob of the
artifact model ``oci://R/N@<image digest>?path=/.oci`` through the normal fetch path -- peers
first, so a cluster reads it from the registry about once, and checked against its digest before
the blob exists; without it, it is downloaded into the spool and checked the same way. Its files
are then extracted into a spool under ``cache_dir/tmp`` with their sha256 computed, and each file
enters the store like any other (pieces hashed, ``check_content`` against that sha256). The
derived files are only as trusted as the layer they came from, which was verified first.
Extraction is bounded (``unpack_limit``: the store's room, ``origins.oci.max_unpack_ratio`` x the
layer, ``origins.oci.max_unpacked_bytes``, ``MAX_MEMBERS`` files): a compression bomb fails naming
the layer and leaves nothing in the spool. Compression: none, gzip, zstd (several frames allowed).
The spool is a work area: swept at start and after ``SPOOL_TTL_S``. This module does not speak
HTTP itself (``origins.registry``), does not write to the store and does not fetch models
(``transfer.artifacts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import platform
import shutil
import tarfile
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import zstandard
from yarl import URL

from cached.config import OciOriginConfig
from cached.errors import IntegrityError, OriginError, OriginNotFound
from cached.origins import Resolution, stream_by_ranges
from cached.origins.registry import INDEX_TYPES, FetchedManifest, RegistryClient, is_digest
from cached.rangeio import Sink
from cached.types import ModelRef, OriginFile, RefKind, format_size, validate_file_path

log = logging.getLogger(__name__)

MIRROR_PATH = "/.oci"
FILEPATH_ANNOTATIONS = ("org.cncf.model.filepath", "org.cnai.model.filepath")
OLLAMA_PREFIX = "application/vnd.ollama.image."
OLLAMA_NAMES = {"model": "model.gguf", "projector": "projector.gguf", "adapter": "adapter.gguf"}
MAX_LAYERS = 10_000
MAX_MEMBERS = 100_000  # regular files one archive layer may unpack (each is an inode in the spool)
UNPACK_SLACK = 1 << 20  # what even a tiny layer may unpack to, whatever the ratio says
SPOOL_TTL_S = 3600.0
_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str
    size: int
    media_type: str
    annotations: Mapping[str, str]

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @property
    def compression(self) -> str | None:
        """None for a raw blob; "" (plain tar), "gzip" or "zstd" for an archive."""
        m = self.media_type
        if "zstd" in m:
            return "zstd"
        if "gzip" in m:
            return "gzip"
        if m.endswith(".tar") or ".tar" in m or "rootfs.diff.tar" in m:
            return ""
        return None


@dataclass(frozen=True, slots=True)
class Member:
    """One regular file extracted from an archive layer into the spool."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class UnpackLimit:
    """The most bytes one archive layer may unpack to, and which rule set it (for the error)."""

    nbytes: int
    why: str


class ArtifactBlobs(Protocol):
    """How the origin gets an artifact's own blobs into this node: as the model
    ``oci://REGISTRY/NAME@DIGEST?path=/.oci`` through the normal fetch path (peers first, every
    piece verified, each whole blob checked against its sha256), so a cluster reads a modelcar's
    layers from the registry about once. The composition root provides it (``transfer``)."""

    def blobs(self, ref: ModelRef) -> contextlib.AbstractAsyncContextManager[Mapping[str, Path]]:
        """``blobs/sha256/<hex>`` -> a verified file in the store, held (not evicted) while open."""
        ...

    async def unpack_room(self, spool: Path) -> int:
        """Bytes unpacking into ``spool`` may write: the store's free space, what is reserved kept."""
        ...


def mirror_ref(registry: str, repo: str, digest: str) -> ModelRef:
    """The model that holds an artifact's own blobs (what the ``/v2`` mirror serves from)."""
    return ModelRef.parse(f"oci://{registry}/{repo}@{digest}?path={MIRROR_PATH}")


def blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def unpack_limit(layer: Layer, cfg: OciOriginConfig, room: int) -> UnpackLimit:
    """The tightest of: the store's room, ``max_unpack_ratio`` x the layer, ``max_unpacked_bytes``."""
    limits = [UnpackLimit(max(0, room), f"the store's free space ({format_size(max(0, room))})")]
    if cfg.max_unpack_ratio > 0:
        limits.append(
            UnpackLimit(
                int(layer.size * cfg.max_unpack_ratio) + UNPACK_SLACK,
                f"{cfg.max_unpack_ratio:g}x the layer's {format_size(layer.size)} (origins.oci.max_unpack_ratio)",
            )
        )
    if cfg.max_unpacked_bytes > 0:
        limits.append(
            UnpackLimit(
                cfg.max_unpacked_bytes, f"{format_size(cfg.max_unpacked_bytes)} (origins.oci.max_unpacked_bytes)"
            )
        )
    return min(limits, key=lambda lim: lim.nbytes)


def host_platform() -> tuple[str, str]:
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
    return "linux", arch


def _layers(doc: dict[str, Any], where: str) -> list[Layer]:
    raw = doc.get("layers")
    if not isinstance(raw, list) or len(raw) > MAX_LAYERS:
        raise OriginError(f"{where}: the manifest has no valid layers list", retryable=False)
    return [_descriptor(d, where) for d in raw]


def _descriptor(d: Any, where: str) -> Layer:
    if not isinstance(d, dict):
        raise OriginError(f"{where}: a descriptor is not an object", retryable=False)
    digest, size, media = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not is_digest(digest):
        raise OriginError(
            f"{where}: unsupported or malformed digest {str(digest)[:80]!r} (sha256 only)", retryable=False
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise OriginError(f"{where}: bad size {size!r} for {digest}", retryable=False)
    ann = d.get("annotations") if isinstance(d.get("annotations"), dict) else {}
    return Layer(
        digest=digest,
        size=size,
        media_type=media if isinstance(media, str) else "",
        annotations={str(k): str(v) for k, v in ann.items()},
    )


def choose_entry(index: dict[str, Any], where: str, want: tuple[str, str] | None = None) -> Layer:
    """The index entry for ``want`` (os, arch; default this host), else the only entry, else the
    only artifact entry (one without a platform)."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries or len(entries) > MAX_LAYERS:
        raise OriginError(f"{where}: the index lists no manifests", retryable=False)
    descs = [
        (_descriptor(e, where), e.get("platform") if isinstance(e.get("platform"), dict) else None) for e in entries
    ]
    os_, arch = want or host_platform()
    for desc, plat in descs:
        if plat and plat.get("os") == os_ and plat.get("architecture") == arch:
            return desc
    if len(descs) == 1:
        return descs[0][0]
    bare = [desc for desc, plat in descs if not plat or plat.get("os") in (None, "unknown")]
    if len(bare) == 1:
        return bare[0]
    raise OriginNotFound(f"{where}: the index has no entry for {os_}/{arch} and no single artifact entry")


def ollama_names(layers: list[Layer]) -> list[tuple[str, Layer]]:
    out: list[tuple[str, Layer]] = []
    seen: dict[str, int] = {}
    for layer in layers:
        if not layer.media_type.startswith(OLLAMA_PREFIX):
            continue
        kind = layer.media_type.removeprefix(OLLAMA_PREFIX)
        name = OLLAMA_NAMES.get(kind, kind)
        try:
            validate_file_path(name)
        except ValueError:
            continue
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append((name if n == 0 else f"{name}-{n + 1}", layer))
    return out


def _member_name(raw: str) -> str | None:
    """A tar member's name as a relative path, or None when it could not be placed safely."""
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _decompressed(f: IO[bytes], compression: str) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        # A layer may be several concatenated frames (pigz-style parallel writers make them).
        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)  # type: ignore[no-any-return]
    return f


def extract_sync(
    layer_file: Path, compression: str, dest: Path, limit: UnpackLimit | None = None, what: str = ""
) -> list[Member]:
    """Every regular file of the archive under ``dest`` with its sha256; links, devices and names
    that would leave ``dest`` are skipped. A later member of the same name wins, as in a layer.
    Writing more than ``limit`` (or more than ``MAX_MEMBERS`` files) stops with an OriginError
    naming the layer (``what``) -- checked against each member's declared size before a byte of it
    is written, and against the bytes actually written; the caller removes what was written."""
    members: dict[str, Member] = {}
    what = what or layer_file.name
    written = 0
    files = 0

    def refuse(detail: str) -> OriginError:
        return OriginError(
            f"layer {what}: {detail}; refused as a possible compression bomb, nothing of it kept", retryable=False
        )

    with open(layer_file, "rb") as raw, _decompressed(raw, compression) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    name = _member_name(info.name)
                    if name is None:
                        log.warning("archive member skipped (unsafe name) name=%r", info.name[:200])
                        continue
                    if info.isdir():
                        continue
                    base = name.rsplit("/", 1)[-1]
                    if base.startswith(".wh."):
                        members[name] = Member(name=name, size=-1, sha256="")  # a whiteout, applied in order
                        continue
                    if not info.isreg():
                        continue
                    src = tar.extractfile(info)
                    if src is None:
                        continue
                    target = dest / name
                    if target.parent.exists() and not target.parent.is_dir():
                        continue
                    files += 1
                    if files > MAX_MEMBERS:
                        raise refuse(f"more than {MAX_MEMBERS} files")
                    if limit is not None and written + info.size > limit.nbytes:
                        raise refuse(
                            f"unpacks to more than {format_size(limit.nbytes)} ({limit.why});"
                            f" {name!r} alone is {format_size(info.size)}"
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    with open(target, "wb") as out:
                        while chunk := src.read(_READ_CHUNK):
                            written += len(chunk)
                            if limit is not None and written > limit.nbytes:
                                raise refuse(f"unpacks to more than {format_size(limit.nbytes)} ({limit.why})")
                            h.update(chunk)
                            out.write(chunk)
                    members[name] = Member(name=name, size=info.size, sha256=h.hexdigest())
        except (tarfile.TarError, OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            raise OriginError(f"layer {what}: not a readable tar archive: {e}", retryable=False) from None
    return list(members.values())


def apply_layer(files: dict[str, tuple[Layer, Member]], layer: Layer, members: list[Member]) -> None:
    """Overlay one layer's members on the files of the layers before it (whiteouts remove)."""
    for m in members:
        base = m.name.rsplit("/", 1)[-1]
        parent = m.name.rsplit("/", 1)[0] + "/" if "/" in m.name else ""
        if base == ".wh..wh..opq":
            for k in [k for k in files if k.startswith(parent)]:
                del files[k]
        elif base.startswith(".wh."):
            gone = parent + base.removeprefix(".wh.")
            for k in [k for k in files if k == gone or k.startswith(gone + "/")]:
                del files[k]
        else:
            files[m.name] = (layer, m)


class OciOrigin:
    """The origin of ``oci://`` and ``ollama://`` refs (one registry client, one spool)."""

    def __init__(self, client: RegistryClient, spool: Path, cfg: OciOriginConfig | None = None) -> None:
        self._client = client
        self._spool = spool
        self._cfg = cfg or OciOriginConfig()
        self._artifacts: ArtifactBlobs | None = None
        self._layer_locks: dict[str, asyncio.Lock] = {}
        shutil.rmtree(spool, ignore_errors=True)  # a previous run's work area

    def use_artifacts(self, artifacts: ArtifactBlobs) -> None:
        """Archive layers come through ``artifacts`` (the swarm) from now on, not straight from
        the registry (the composition root calls this once the fetch path exists)."""
        self._artifacts = artifacts

    # --- resolve -------------------------------------------------------------------------------

    async def manifests(self, ref: ModelRef, revision: str) -> tuple[FetchedManifest, FetchedManifest]:
        """(the manifest ``revision`` names, the image manifest it leads to: itself or the chosen
        index entry)."""
        top = await self._client.manifest(ref.registry, ref.repo, revision)
        if top.media_type not in INDEX_TYPES:
            return top, top
        entry = choose_entry(top.json(), f"{ref}")
        return top, await self._client.manifest(ref.registry, ref.repo, entry.digest)

    async def resolve(self, ref: ModelRef) -> Resolution:
        if ref.kind is RefKind.OCI and ref.path == MIRROR_PATH:
            top = await self._client.manifest(ref.registry, ref.repo, ref.revision)
            return Resolution(files=tuple(self.blob_files(ref, top)), revision=top.digest)
        top, image = await self.manifests(ref, ref.revision)
        files = await self._model_files(ref, image)
        if not files:
            where = f" under {ref.path}" if ref.kind is RefKind.OCI else ""
            raise OriginNotFound(f"{ref}: the artifact {top.digest} holds no model files{where}")
        return Resolution(files=tuple(files), revision=top.digest)

    def blob_files(self, ref: ModelRef, top: FetchedManifest) -> list[OriginFile]:
        """The artifact's own blobs: the manifest (or index), and for a manifest its config and
        layers, as ``blobs/sha256/<hex>``."""
        hexes = {top.digest: len(top.data)}
        if top.media_type not in INDEX_TYPES:
            doc = top.json()
            config = doc.get("config")
            if config is not None:
                c = _descriptor(config, str(ref))
                hexes.setdefault(c.digest, c.size)
            for layer in _layers(doc, str(ref)):
                hexes.setdefault(layer.digest, layer.size)
        files = [self._raw_file(ref, f"blobs/sha256/{d.removeprefix('sha256:')}", d, n) for d, n in hexes.items()]
        # The manifest is read from /manifests/<digest>: registries need not serve it as a blob.
        files[0] = dataclasses.replace(files[0], checksums={**files[0].checksums, "manifest": "1"})
        return files

    async def _model_files(self, ref: ModelRef, image: FetchedManifest) -> list[OriginFile]:
        layers = _layers(image.json(), str(ref))
        if ref.kind is RefKind.OLLAMA:
            return [self._raw_file(ref, name, layer.digest, layer.size) for name, layer in ollama_names(layers)]
        named: dict[str, OriginFile] = {}
        merged: dict[str, tuple[Layer, Member]] = {}
        for layer in layers:
            filepath = next((layer.annotations[k] for k in FILEPATH_ANNOTATIONS if k in layer.annotations), None)
            if layer.compression is None:
                if filepath is None:
                    continue  # neither named nor an archive: nothing a model directory can hold
                try:
                    validate_file_path(filepath)
                except ValueError:
                    raise OriginError(f"{ref}: layer {layer.digest} names a bad path {filepath!r}") from None
                named[filepath] = self._raw_file(ref, filepath, layer.digest, layer.size)
                continue
            members = await self._extracted(ref.registry, ref.repo, layer, image.digest)
            apply_layer(merged, layer, members)
        prefix = ref.path.strip("/")  # a modelcar's directory; a ModelPack archive's names are the model's
        for name, (layer, m) in merged.items():
            if m.size < 0:
                continue
            if _filepath(layer) is None and prefix:
                if not name.startswith(prefix + "/"):
                    continue
                rel = name[len(prefix) + 1 :]
            else:
                rel = name
            try:
                validate_file_path(rel)
            except ValueError:
                continue
            named[rel] = self._member_file(ref, rel, layer, m, image.digest)
        return list(named.values())

    # --- files ---------------------------------------------------------------------------------

    def _raw_file(self, ref: ModelRef, path: str, digest: str, size: int) -> OriginFile:
        hex_ = digest.removeprefix("sha256:")
        return OriginFile(
            path=path,
            size=size,
            identity=f"sha256|{hex_}|{size}",
            checksums={"sha256": hex_},
            locator=self._client.blob_url(ref.registry, ref.repo, digest),
        )

    def _member_file(self, ref: ModelRef, path: str, layer: Layer, m: Member, image: str | None) -> OriginFile:
        checksums = {
            "sha256": m.sha256,
            "layer": layer.digest,
            "layer_size": str(layer.size),
            "layer_type": layer.media_type,
            "member": m.name,
        }
        if image:
            checksums["image"] = image  # the manifest that lists the layer: its blobs come as one model
        return OriginFile(
            path=path,
            size=m.size,
            identity=f"sha256|{m.sha256}|{m.size}",
            checksums=checksums,
            locator=self._client.blob_url(ref.registry, ref.repo, layer.digest),
        )

    async def file_for(
        self, ref: ModelRef, revision: str | None, path: str, size: int, checksums: Mapping[str, str]
    ) -> OriginFile:
        """The file from the ref's registry and repository and the content facts alone."""
        try:
            validate_file_path(path)
        except ValueError as e:
            raise OriginError(f"{ref}: bad file path {path!r}: {e}", retryable=False) from None
        if not isinstance(revision, str) or not is_digest(revision):
            raise OriginError(f"{ref}: {revision!r} is not a manifest digest", retryable=False)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OriginError(f"{ref}: bad size {size!r} for {path!r}", retryable=False)
        sha = str(checksums.get("sha256", ""))
        if not is_digest("sha256:" + sha):
            raise OriginError(f"{ref}: {path!r} has no valid sha256", retryable=False)
        if "layer" not in checksums:
            raw = self._raw_file(ref, path, "sha256:" + sha, size)
            if checksums.get("manifest") == "1":
                raw = dataclasses.replace(raw, checksums={**raw.checksums, "manifest": "1"})
            return raw
        layer_digest, member = str(checksums["layer"]), str(checksums.get("member", ""))
        layer_size = str(checksums.get("layer_size", ""))
        if not is_digest(layer_digest) or not layer_size.isdigit() or _member_name(member) != member:
            raise OriginError(f"{ref}: {path!r} names a bad layer or member", retryable=False)
        layer = Layer(
            digest=layer_digest, size=int(layer_size), media_type=str(checksums.get("layer_type", "")), annotations={}
        )
        image = str(checksums.get("image", "")) or None
        if image is not None and not is_digest(image):
            raise OriginError(f"{ref}: {path!r} names a bad image manifest digest", retryable=False)
        return self._member_file(ref, path, layer, Member(name=member, size=size, sha256=sha), image)

    # --- the spool of archive layers -----------------------------------------------------------

    def _layer_dir(self, digest: str) -> Path:
        return self._spool / digest.removeprefix("sha256:")

    async def _extracted(self, registry: str, repo: str, layer: Layer, image: str | None) -> list[Member]:
        """The layer's files in the spool (fetched, verified, extracted once)."""
        lock = self._layer_locks.setdefault(layer.digest, asyncio.Lock())
        async with lock:
            self._sweep(keep=layer.digest)
            where = self._layer_dir(layer.digest)
            index = where / "index.json"
            if index.exists():
                os.utime(where)
                doc = json.loads(index.read_text())
                return [Member(**m) for m in doc]
            shutil.rmtree(where, ignore_errors=True)
            (where / "files").mkdir(parents=True)
            try:
                async with self._layer_file(registry, repo, layer, image, where) as blob:
                    room = await self._unpack_room()
                    limit = unpack_limit(layer, self._cfg, room)
                    members = await asyncio.to_thread(
                        extract_sync, blob, layer.compression or "", where / "files", limit, layer.digest
                    )
            except BaseException:
                shutil.rmtree(where, ignore_errors=True)
                raise
            index.write_text(json.dumps([{"name": m.name, "size": m.size, "sha256": m.sha256} for m in members]))
            return members

    @contextlib.asynccontextmanager
    async def _layer_file(
        self, registry: str, repo: str, layer: Layer, image: str | None, where: Path
    ) -> AsyncIterator[Path]:
        """The layer's bytes in a file, verified against its digest before anyone opens it: the
        store's blob of the artifact model (through the swarm), or without that a download."""
        if self._artifacts is not None and image is not None:
            async with self._artifacts.blobs(mirror_ref(registry, repo, image)) as blobs:
                path = blobs.get(blob_path(layer.digest))
                if path is None:
                    raise OriginNotFound(f"oci://{registry}/{repo}@{image}: the manifest lists no {layer.digest}")
                yield path
            return
        blob = where / "layer"
        try:
            await self._client.download(registry, repo, layer.digest, layer.size, blob)
            yield blob
        finally:
            blob.unlink(missing_ok=True)

    async def _unpack_room(self) -> int:
        if self._artifacts is not None:
            return await self._artifacts.unpack_room(self._spool)
        st = await asyncio.to_thread(os.statvfs, self._spool)
        return st.f_bavail * st.f_frsize

    def _sweep(self, keep: str) -> None:
        """Spool entries unused for ``SPOOL_TTL_S`` go: their files are in the store by now."""
        if not self._spool.is_dir():
            return
        cutoff = time.time() - SPOOL_TTL_S
        for d in self._spool.iterdir():
            with contextlib.suppress(OSError):
                if d.name != keep.removeprefix("sha256:") and d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)

    async def _member_path(self, file: OriginFile) -> Path:
        layer = Layer(
            digest=file.checksums["layer"],
            size=int(file.checksums.get("layer_size", "0")),
            media_type=file.checksums.get("layer_type", ""),
            annotations={},
        )
        registry, repo = _registry_repo(file.locator)
        members = await self._extracted(registry, repo, layer, file.checksums.get("image") or None)
        m = next((m for m in members if m.name == file.checksums["member"]), None)
        if m is None or m.sha256 != file.checksums["sha256"]:
            raise OriginNotFound(f"{file.locator}: layer has no member {file.checksums['member']!r} with that content")
        return self._layer_dir(layer.digest) / "files" / m.name

    # --- reading -------------------------------------------------------------------------------

    def supports_ranges(self, file: OriginFile) -> bool:
        return True

    def local_path(self, file: OriginFile) -> str | None:
        if "layer" not in file.checksums:
            return None
        path = self._layer_dir(file.checksums["layer"]) / "files" / file.checksums.get("member", "")
        return str(path) if path.is_file() else None

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes | bytearray:
        buf = bytearray(length)

        def sink(data: memoryview, at: int) -> None:
            buf[at - offset : at - offset + len(data)] = data

        await self.read_range_into(file, offset, length, sink)
        return buf

    async def read_range_into(self, file: OriginFile, offset: int, length: int, sink: Sink) -> None:
        if "layer" in file.checksums:
            path = await self._member_path(file)
            await asyncio.to_thread(_read_local, path, offset, length, sink)
            return
        registry, repo = _registry_repo(file.locator)
        digest = "sha256:" + file.checksums["sha256"]
        if file.checksums.get("manifest") == "1":
            m = await self._client.manifest(registry, repo, digest)  # checked against the digest
            if offset + length > len(m.data):
                raise OriginError(f"{file.locator}: manifest shorter than {offset + length} bytes", retryable=False)
            sink(memoryview(m.data)[offset : offset + length], offset)
            return
        await self._client.read_into(registry, repo, digest, file.size, offset, length, sink)

    def stream(self, file: OriginFile) -> AsyncIterator[bytes]:
        return stream_by_ranges(self, file, _READ_CHUNK)

    async def check_unchanged(self, file: OriginFile) -> None:
        return None  # a digest names the bytes; check_content proves them

    async def check_content(self, file: OriginFile, data_path: Path) -> None:
        """The complete bytes against the layer digest (or the member's sha256 taken when it was
        extracted from a verified layer)."""
        got = await asyncio.to_thread(_sha256_file, data_path)
        if got != file.checksums.get("sha256"):
            raise IntegrityError(
                f"{file.path}: sha256 {got} does not match the registry's digest {file.checksums.get('sha256')};"
                " the file was discarded"
            )


def _filepath(layer: Layer) -> str | None:
    return next((layer.annotations[k] for k in FILEPATH_ANNOTATIONS if k in layer.annotations), None)


def _registry_repo(blob_url: str) -> tuple[str, str]:
    u = URL(blob_url)
    path = u.raw_path.removeprefix("/v2/")
    repo = path.rsplit("/blobs/", 1)[0]
    return u.raw_authority, repo


def _read_local(path: Path, offset: int, length: int, sink: Sink) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        while pos < offset + length:
            data = f.read(min(_READ_CHUNK, offset + length - pos))
            if not data:
                raise OriginError(f"{path}: spool file ended early", retryable=True)
            sink(memoryview(data), pos)
            pos += len(data)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()
