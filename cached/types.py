"""Value types shared by every layer: refs, blob ids, manifests, job states, store events.

Parsing of user-supplied strings into these types happens here, once; code below the edges
(cli, api, config) only ever sees parsed values. Canonical JSON and digests are defined here so
that two nodes always agree on a manifest's digest. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import posixpath
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import blake3
from yarl import URL

from cached.errors import IntegrityError, RefError

DEFAULT_PIECE_SIZE = 16 * 1024 * 1024
MIN_PIECE_SIZE = 64 * 1024
MAX_PIECE_SIZE = 256 * 1024 * 1024
# Node labels travel in every gossip message: a node refuses a member whose labels exceed these,
# so the config refuses them too (a node must never start with labels its peers would drop).
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 253

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}[A-Za-z0-9_])?)*\.?$"
)
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]*$")

# Names that become file names on disk. A component is at most NAME_MAX (255) bytes on every
# Linux filesystem, and the store writes each file through a temp name ".<name>.<8 hex>.tmp"
# (14 bytes more), so no component the store derives from a name may exceed 241 bytes; 240
# leaves one spare. A revision is ``hf/models--org--name/refs/<revision>``: a git ref name, which
# the hub stores as files too (so it never had a longer one); branches, tags and "refs/pr/N" are
# far shorter. The whole of a file path inside a model stays well under PATH_MAX (4096) once the
# cache directory, hf/models--org--name/snapshots/<40 hex>/ (about 270 bytes) are added to it.
MAX_NAME_BYTES = 240
MAX_REVISION_BYTES = 200
MAX_FILE_PATH_BYTES = 1024


def _digest_hex(value: str, what: str) -> str:
    hex_ = value.removeprefix("blake3:")
    if not _HEX64.match(hex_):
        raise ValueError(f"{what} must be blake3:<64 hex>, got {value!r}")
    return hex_


@dataclass(frozen=True, slots=True, order=True)
class BlobId:
    """BLAKE3 over (length, piece size, piece digests): names a blob, verifiable piece by piece."""

    hex: str

    def __post_init__(self) -> None:
        if not _HEX64.match(self.hex):
            raise ValueError(f"blob id must be 64 lower-case hex digits, got {self.hex!r}")

    @classmethod
    def parse(cls, value: str) -> BlobId:
        return cls(_digest_hex(value, "blob id"))

    @classmethod
    def compute(cls, size: int, piece_size: int, piece_digests: Iterable[bytes]) -> BlobId:
        h = blake3.blake3(b"cached-blob-v1\0")
        h.update(struct.pack("<QQ", size, piece_size))
        for d in piece_digests:
            h.update(d)
        return cls(h.hexdigest())

    def __str__(self) -> str:
        return f"blake3:{self.hex}"


def piece_count(size: int, piece_size: int) -> int:
    return (size + piece_size - 1) // piece_size


def piece_span(index: int, size: int, piece_size: int) -> tuple[int, int]:
    """(offset, length) of piece ``index``; the last piece is short."""
    offset = index * piece_size
    return offset, min(piece_size, size - offset)


def hash_piece(data: bytes | bytearray | memoryview) -> bytes:
    # blake3 releases the GIL for large inputs; callers run this in a worker thread.
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO if len(data) >= 4 << 20 else 1).digest()


class RefKind(enum.StrEnum):
    HF = "hf"
    HTTP = "http"
    FILE = "file"
    S3 = "s3"
    MODELSCOPE = "modelscope"
    OCI = "oci"
    OLLAMA = "ollama"


# S3 bucket names (the AWS rules, which MinIO and Ceph RGW also enforce for new buckets).
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# The OCI distribution spec's repository name and tag grammar.
_OCI_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_OCI_REPOSITORY = re.compile(rf"^{_OCI_COMPONENT}(?:/{_OCI_COMPONENT})*$")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_OCI_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
OLLAMA_DEFAULT_REGISTRY = "registry.ollama.ai"
OCI_DEFAULT_PATH = "/models"
# Kinds whose ref names a set of files, so that include/exclude patterns narrow it.
_DIRECTORY_KINDS = frozenset({RefKind.HF, RefKind.MODELSCOPE})


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What a user names. ``canonical`` is the one spelling used as a key everywhere."""

    kind: RefKind
    canonical: str
    # hf
    repo: str = ""
    revision: str = ""
    # http / file
    url: str = ""
    path: str = ""
    # hf, modelscope, s3 prefix: which files (fnmatch patterns); empty include means all
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # s3: bucket and key; a key ending in "/" (or empty) is a prefix, every object under it
    bucket: str = ""
    key: str = ""
    # oci / ollama: registry host[:port]; ``repo`` is the repository, ``revision`` the tag or
    # sha256 digest; oci ``path`` is the directory of a modelcar image whose files make the model
    registry: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        if not isinstance(text, str):
            raise RefError(repr(text), "a ref must be a string")
        raw = text.strip()
        if not raw:
            raise RefError(text, "empty ref")
        if len(raw) > 4096:
            raise RefError(raw[:64] + "...", "longer than 4096 characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
            raise RefError(raw, "contains control characters")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in raw):
            raise RefError(raw.encode("utf-8", "replace").decode(), "is not valid Unicode (lone surrogate)")
        scheme, sep, _ = raw.partition("://")
        if not sep:
            raise RefError(
                raw,
                "expected hf://org/name[@revision], http(s)://host/file, file:///path, s3://bucket/key, "
                "modelscope://org/name, oci://registry/repo[:tag] or ollama://name[:tag]",
            )
        scheme = scheme.lower()
        if scheme == "hf":
            return cls._parse_hf(raw)
        if scheme in ("http", "https"):
            return cls._parse_http(raw)
        if scheme == "file":
            return cls._parse_file(raw)
        if scheme == "s3":
            return cls._parse_s3(raw)
        if scheme == "modelscope":
            return cls._parse_modelscope(raw)
        if scheme == "oci":
            return cls._parse_oci(raw)
        if scheme == "ollama":
            return cls._parse_ollama(raw)
        raise RefError(
            raw,
            f"unknown scheme {scheme!r} (use hf://, http(s)://, file://, s3://, modelscope://, oci:// or ollama://)",
        )

    @classmethod
    def _parse_hf(cls, raw: str) -> ModelRef:
        return cls._parse_hub(raw, RefKind.HF, default_revision="main")

    @classmethod
    def _parse_modelscope(cls, raw: str) -> ModelRef:
        # ModelScope model ids follow the hub's own shape (org/name); its default branch is master.
        return cls._parse_hub(raw, RefKind.MODELSCOPE, default_revision="master")

    @classmethod
    def _parse_hub(cls, raw: str, kind: RefKind, *, default_revision: str) -> ModelRef:
        body, _, query = raw[len(kind.value) + len("://") :].partition("?")
        include, exclude = _parse_patterns(raw, query)
        repo, at, revision = body.partition("@")
        if at and not revision:
            raise RefError(raw, "empty revision after '@'")
        revision = revision or default_revision
        parts = repo.split("/")
        if len(parts) not in (1, 2) or not all(parts):
            raise RefError(raw, "repo must be 'org/name' or 'name'")
        for part in parts:
            # The hub's own rules (huggingface_hub.validate_repo_id); '--' would also make two
            # repos share one models--org--name folder in the HF cache layout.
            if not _HF_PART.match(part) or ".." in part or "--" in part or part.endswith((".", "-", ".git")):
                raise RefError(raw, f"invalid repo name part {part!r}")
        if len(revision.encode()) > MAX_REVISION_BYTES:
            raise RefError(
                raw,
                f"revision is {len(revision.encode())} bytes, longer than {MAX_REVISION_BYTES} (a git ref name; it becomes a file name)",
            )
        if (
            not _HF_REVISION.match(revision)
            or "//" in revision
            or revision.endswith("/")
            or any(seg in (".", "..") for seg in revision.split("/"))
        ):
            raise RefError(raw, f"invalid revision {revision!r}")
        return cls(
            kind=kind,
            canonical=_with_query(f"{kind.value}://{repo}@{revision}", include, exclude),
            repo=repo,
            revision=revision,
            include=include,
            exclude=exclude,
        )

    @classmethod
    def _parse_s3(cls, raw: str) -> ModelRef:
        body, _, query = raw[len("s3://") :].partition("?")
        bucket, slash, key_text = body.partition("/")
        if not _S3_BUCKET.match(bucket) or ".." in bucket:
            raise RefError(raw, f"invalid bucket name {bucket!r} (3-63 lower-case letters, digits, '.' and '-')")
        key = unquote(key_text)
        prefix = not key or key.endswith("/")
        if not slash or (not key and not prefix):
            raise RefError(raw, "expected s3://BUCKET/KEY or s3://BUCKET/PREFIX/ (a trailing '/' names a prefix)")
        include, exclude = _parse_patterns(raw, query)
        if (include or exclude) and not prefix:
            raise RefError(raw, "include/exclude apply to a prefix (s3://BUCKET/PREFIX/), not to one object")
        if "\0" in key or len(key.encode()) > MAX_FILE_PATH_BYTES:
            raise RefError(raw, f"object key must be at most {MAX_FILE_PATH_BYTES} bytes, without NUL")
        segments = key.rstrip("/").split("/") if key.rstrip("/") else []
        if any(s in ("", ".", "..") for s in segments):
            # Keys become file names in the model's directory: '.', '..' and '//' have no file.
            raise RefError(raw, "object key must not contain '.', '..' or empty segments")
        canonical = _with_query(f"s3://{bucket}/{quote(key, safe=_KEY_SAFE)}", include, exclude)
        return cls(kind=RefKind.S3, canonical=canonical, bucket=bucket, key=key, include=include, exclude=exclude)

    @classmethod
    def _parse_oci(cls, raw: str) -> ModelRef:
        body, _, query = raw[len("oci://") :].partition("?")
        registry, slash, name = body.partition("/")
        _check_registry(raw, registry)
        if not slash:
            raise RefError(raw, "expected oci://REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST]")
        repo, revision = _split_oci_reference(raw, name)
        path = OCI_DEFAULT_PATH
        for part in filter(None, query.split("&")):
            k, eq, v = part.partition("=")
            if k != "path" or not eq:
                raise RefError(raw, f"unknown ref option {part!r} (oci refs take path=/dir)")
            path = "/" + "/".join(s for s in unquote(v).split("/") if s)
            if any(s in (".", "..") for s in path.split("/")) or "\0" in path:
                raise RefError(raw, f"path must be an absolute directory without '.' or '..': {v!r}")
        sep = "@" if revision.startswith("sha256:") else ":"
        canonical = f"oci://{registry}/{repo}{sep}{revision}"
        if path != OCI_DEFAULT_PATH:
            canonical += "?path=" + quote(path, safe="/")
        return cls(kind=RefKind.OCI, canonical=canonical, registry=registry, repo=repo, revision=revision, path=path)

    @classmethod
    def _parse_ollama(cls, raw: str) -> ModelRef:
        body = raw[len("ollama://") :]
        if "?" in body:
            raise RefError(raw, "ollama refs take no options")
        first, slash, rest = body.partition("/")
        # Docker's rule: the first component names a registry when it looks like a host.
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, name = first, rest
        else:
            registry, name = OLLAMA_DEFAULT_REGISTRY, body
        _check_registry(raw, registry)
        repo, revision = _split_oci_reference(raw, name)
        if revision.startswith("sha256:"):
            raise RefError(raw, "ollama refs name a tag (NAME[:TAG]), not a digest")
        if "/" not in repo:
            repo = "library/" + repo
        return cls(
            kind=RefKind.OLLAMA,
            canonical=f"ollama://{registry}/{repo}:{revision}",
            registry=registry,
            repo=repo,
            revision=revision,
        )

    @property
    def is_directory(self) -> bool:
        """Whether include/exclude patterns can narrow this ref (it names a set of files)."""
        return self.kind in _DIRECTORY_KINDS or (self.kind is RefKind.S3 and (not self.key or self.key.endswith("/")))

    def with_patterns(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> ModelRef:
        """This ref narrowed by more include/exclude patterns (a prefetch request's)."""
        if not self.is_directory:
            raise RefError(
                self.canonical, "include/exclude patterns apply to hf://, modelscope:// and s3://BUCKET/PREFIX/ refs"
            )
        inc = tuple(sorted(set(self.include) | set(include)))
        exc = tuple(sorted(set(self.exclude) | set(exclude)))
        for p in inc + exc:
            _check_pattern(self.canonical, p)
        return ModelRef.parse(_with_query(self.base.canonical, inc, exc))

    @property
    def base(self) -> ModelRef:
        """The ref without include/exclude patterns (the whole repo or prefix at that revision)."""
        if not (self.include or self.exclude):
            return self
        return ModelRef.parse(self.canonical.partition("?")[0])

    @classmethod
    def _parse_http(cls, raw: str) -> ModelRef:
        try:
            url = URL(raw)
        except (ValueError, TypeError) as e:
            raise RefError(raw, f"bad URL: {e}") from None
        if not url.host:
            raise RefError(raw, "URL has no host")
        if not _HOST.match(url.host) and not _is_ip(url.host):
            raise RefError(raw, f"not a valid host name: {url.host!r}")
        name = url.name
        if not name or name in (".", ".."):
            raise RefError(raw, "URL must name a file (its last path segment is the file name)")
        if "/" in name or "\0" in name:
            raise RefError(raw, "file name in URL is not a plain name")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise RefError(raw, f"file name in URL is longer than {MAX_NAME_BYTES} bytes (it becomes a file name)")
        url = url.with_fragment(None)
        return cls(kind=RefKind.HTTP, canonical=str(url), url=str(url))

    @classmethod
    def _parse_file(cls, raw: str) -> ModelRef:
        rest = raw[len("file://") :]
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise RefError(raw, "file refs must be file:///absolute/path (no host)")
        if not slash:
            raise RefError(raw, "file refs must be file:///absolute/path")
        path = unquote("/" + path)
        if "\0" in path:
            raise RefError(raw, "path contains NUL")
        segments = [s for s in path.split("/") if s]
        if any(s in (".", "..") for s in segments):
            raise RefError(raw, "path must not contain '.' or '..' segments")
        if not segments:
            raise RefError(raw, "path must name a file or directory below /")
        if any(len(s.encode("utf-8", "surrogateescape")) > 255 for s in segments):
            raise RefError(raw, "a path segment is longer than 255 bytes (no such file can exist)")
        norm = "/" + "/".join(segments)
        return cls(kind=RefKind.FILE, canonical="file://" + quote(norm), path=norm)

    @property
    def escaped(self) -> str:
        """A single safe file-name component for this ref (injective)."""
        esc = quote(self.canonical, safe="")
        if len(esc) > 200:
            # "%~" never comes out of quote(), so no other ref can produce this name.
            esc = esc[:150] + "%~" + blake3.blake3(self.canonical.encode()).hexdigest()[:40]
        return esc

    def __str__(self) -> str:
        return self.canonical


def _check_pattern(raw: str, pattern: str) -> str:
    if not pattern or len(pattern) > 256 or any(c in pattern for c in ",&=?#"):
        raise RefError(raw, f"bad file pattern {pattern!r} (fnmatch syntax; no ',', '&', '=', '?', '#')")
    return pattern


def _parse_patterns(raw: str, query: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``include=*.json,*.safetensors&exclude=*.bin`` -> sorted include and exclude patterns."""
    found: dict[str, set[str]] = {"include": set(), "exclude": set()}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in found or not eq:
            raise RefError(raw, f"unknown ref option {part!r} (this ref takes include= and exclude=)")
        found[key].update(_check_pattern(raw, unquote(p)) for p in value.split(","))
    return tuple(sorted(found["include"])), tuple(sorted(found["exclude"]))


def _with_query(base: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> str:
    opts = [f"{k}={','.join(v)}" for k, v in (("include", include), ("exclude", exclude)) if v]
    return base + ("?" + "&".join(opts) if opts else "")


# What an S3 key keeps unescaped in a canonical ref: everything but '?', '#', '%' and spaces,
# so that the ref reads like the key and still parses back to it.
_KEY_SAFE = "/-._~!$'()*+,;=:@"


def _check_registry(raw: str, registry: str) -> None:
    host, colon, port = registry.rpartition(":") if registry.count(":") == 1 else (registry, "", "")
    if colon and not (port.isdigit() and 0 < int(port) < 65536):
        raise RefError(raw, f"invalid registry port in {registry!r}")
    if not host or not (_HOST.match(host) or _is_ip(host)):
        raise RefError(raw, f"invalid registry host {registry!r}")


def _split_oci_reference(raw: str, name: str) -> tuple[str, str]:
    """``repo[:tag|@sha256:digest]`` -> (repo, tag or digest); the tag defaults to latest."""
    repo, at, digest = name.partition("@")
    if at:
        if not _OCI_DIGEST.match(digest):
            raise RefError(raw, f"invalid digest {digest!r} (sha256:<64 lower-case hex>)")
        revision = digest
    else:
        repo, colon, tag = name.rpartition(":") if ":" in name else (name, "", "")
        if colon and not _OCI_TAG.match(tag):
            raise RefError(raw, f"invalid tag {tag!r}")
        revision = tag or "latest"
    if not _OCI_REPOSITORY.match(repo) or len(repo) > 255:
        raise RefError(raw, f"invalid repository name {repo!r} (lower-case components joined by '/')")
    return repo, revision


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def validate_file_path(path: str) -> str:
    """A manifest file path: relative, POSIX, no '.', '..' or empty segments, names that fit on disk."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"bad file path {path!r}")
    if path.startswith("/") or "\\" in path or "\0" in path:
        raise ValueError(f"bad file path {path!r}")
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        raise ValueError(f"bad file path {path!r}: not valid Unicode") from None
    if size > MAX_FILE_PATH_BYTES:
        raise ValueError(f"bad file path {path[:64]!r}...: {size} bytes, longer than {MAX_FILE_PATH_BYTES}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad file path {path!r}")
    if any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
        raise ValueError(f"bad file path {path[:64]!r}...: a name is longer than {MAX_NAME_BYTES} bytes")
    if posixpath.normpath(path) != path:
        raise ValueError(f"bad file path {path!r}")
    return path


@dataclass(frozen=True, slots=True, kw_only=True)
class OriginFile:
    """One file as the origin describes it, before its blob id is known.

    ``identity`` pins the exact content version (URL + ETag + size, path + mtime, HF commit + path +
    sha256); an in-progress download is keyed by it, so a changed origin file never resumes into a
    partial written from the old one.
    """

    path: str
    size: int
    identity: str
    checksums: Mapping[str, str] = field(default_factory=dict)  # e.g. {"sha256": hex, "etag": ...}
    locator: str = ""  # origin-specific address (URL, absolute path)

    @property
    def key(self) -> str:
        return blake3.blake3(self.identity.encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEntry:
    path: str
    size: int
    blob: BlobId
    origin: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "blob": str(self.blob), "origin": dict(self.origin)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FileEntry:
        size = d["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"bad size {size!r}")
        origin = d.get("origin") or {}
        if not isinstance(origin, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in origin.items()
        ):
            raise ValueError("origin must map strings to strings")
        return cls(path=validate_file_path(d["path"]), size=size, blob=BlobId.parse(d["blob"]), origin=origin)


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The resolved content of a ref. Its digest is BLAKE3 over its canonical JSON."""

    ref: str
    piece_size: int
    files: tuple[FileEntry, ...]
    revision: str | None = None
    # The digest, once computed: a status answer asked for it twice per request, each time
    # serialising and hashing the whole manifest (40 us of a 230 us request).
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("duplicate file paths in manifest")
        if not MIN_PIECE_SIZE <= self.piece_size <= MAX_PIECE_SIZE:
            raise ValueError(f"piece size {self.piece_size} out of range")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "ref": self.ref,
            "revision": self.revision,
            "piece_size": self.piece_size,
            "files": [f.to_json() for f in sorted(self.files, key=lambda f: f.path)],
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def digest(self) -> str:
        if self._digest is None:
            object.__setattr__(self, "_digest", blake3.blake3(self.canonical_bytes()).hexdigest())
        return self._digest  # type: ignore[return-value]

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_digest: str | None = None) -> Manifest:
        if expect_digest is not None and blake3.blake3(data).hexdigest() != expect_digest:
            raise IntegrityError(f"manifest does not match digest blake3:{expect_digest}")
        try:
            d = json.loads(data)
            if d.get("version") != 1:
                raise ValueError(f"unknown manifest version {d.get('version')!r}")
            if d.get("revision") is not None and not isinstance(d["revision"], str):
                raise ValueError("revision must be a string")
            return cls(
                ref=str(d["ref"]),
                revision=d.get("revision"),
                piece_size=int(d["piece_size"]),
                files=tuple(FileEntry.from_json(f) for f in d["files"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            raise IntegrityError(f"malformed manifest: {type(e).__name__}: {e}") from None


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- store events ----------------------------------------------------------------------------
# What the store announces after each change peers may care about, in the order it happened. The
# store calls its listener on the event loop; ``cached.peers.holdings`` turns events into its wire
# format (the store knows nothing of that format).


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobAdded:
    blob_hex: str
    size: int
    identity_key: str = ""  # the origin file it was made from ("" when unknown)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobRemoved:
    blob_hex: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialStarted:
    """A partial blob is open for writing (also on resume, before its kept pieces are listed)."""

    key: str
    size: int
    piece_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PieceVerified:
    key: str
    index: int
    digest: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PartialDropped:
    """The partial is gone: finalized into a blob (announced just before) or discarded."""

    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestAdded:
    digest: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestRemoved:
    digest: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RefChanged:
    """A ref now names ``digest``; None when the ref was removed. A manifest is always announced
    (``ManifestAdded``) before the first ref that names it."""

    ref: str  # canonical
    digest: str | None


StoreEvent = (
    BlobAdded
    | BlobRemoved
    | PartialStarted
    | PieceVerified
    | PartialDropped
    | ManifestAdded
    | ManifestRemoved
    | RefChanged
)


class JobState(enum.StrEnum):
    ABSENT = "absent"
    QUEUED = "queued"
    FETCHING = "fetching"
    READY = "ready"
    FAILED = "failed"


class Priority(enum.IntEnum):
    """Lower value runs first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str) -> Priority:
        try:
            return cls[value.upper()]
        except (KeyError, AttributeError):
            raise ValueError(f"priority must be high, normal or low, not {value!r}") from None


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """'500G', '1.5T', '1024' -> bytes (binary units, as operators size disks)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (examples: 500G, 1.5T, 1048576)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def format_size(n: float, digits: int = 1) -> str:
    """Bytes -> '1.5 GiB' (binary units, ``digits`` decimals above bytes): the inverse of parse_size
    for people. The CLI uses one decimal; the cluster benchmark's report uses two."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} TiB"
