"""``s3://`` origin: objects of an S3-compatible store (AWS S3, MinIO, Ceph RGW, R2, ...).

botocore does what a user expects an AWS client to do: the credential chain (environment
variables, ``AWS_PROFILE`` with the shared config/credentials files, web identity tokens as
Kubernetes service accounts use, session tokens; ``origins.s3.anonymous`` sends unsigned
requests), SigV4 signing, region redirects, and the control calls (ListObjectsV2, HeadObject),
which run on worker threads. The bulk byte path is ours: parallel ranged GETs through
``cached.rangeio`` into the partial blob, as for ``http://``, each carrying SigV4 headers that
sign only the host and the ``x-amz-*`` headers, so one signature serves every range of an
object for a minute.

Identity: each object's ETag, size and version id (when the bucket is versioned) are pinned at
resolve. Every ranged GET sends ``If-Match`` (and ``versionId``), so an object overwritten
mid-download fails as ``OriginChanged`` instead of mixing two versions; S3 serves each GET
from one version, so no closing HEAD is needed. A full-object SHA-256 the store keeps
(``ChecksumSHA256`` of type FULL_OBJECT) is checked before the blob exists.

It does not retry (the transfer layer's ``OriginRetry`` backs off on ``retryable`` errors such
as 503 SlowDown), verify BLAKE3 digests or write to the store.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import hashlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.exceptions
import botocore.session
from botocore import UNSIGNED

from cached.config import HttpOriginConfig, S3OriginConfig
from cached.errors import IntegrityError, OriginChanged, OriginDenied, OriginError, OriginNotFound
from cached.origins import Resolution, stream_by_ranges
from cached.origins.http import range_error, status_error
from cached.rangeio import Check, RangeIOError, Sink, ThreadedRangeReader
from cached.ranges import content_range
from cached.types import ModelRef, OriginFile, validate_file_path

log = logging.getLogger(__name__)

SIGN_TTL_S = 60.0  # S3 accepts a request dated up to 15 minutes ago; re-sign well before
MAX_LIST_PAGES = 10_000  # 1000 keys a page
HEAD_CONCURRENCY = 8  # HEADs of the objects under a prefix in flight at once
DEFAULT_REGION = "us-east-1"
_READ_CHUNK = 8 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# What an ETag or a version id may look like: printable ASCII, no control characters.
_TOKEN = re.compile(r"^[\x21-\x7e]{1,1024}$")
T = TypeVar("T")

# S3 error codes, to the error a user can act on.
_DENIED = {
    "AccessDenied": "access denied (the credentials lack s3:GetObject/s3:ListBucket, or the bucket policy refuses)",
    "AllAccessDisabled": "access to this bucket is disabled",
    "InvalidAccessKeyId": "the access key id is not known to the store (check AWS_ACCESS_KEY_ID or the profile)",
    "SignatureDoesNotMatch": "the signature does not match: the secret access key is wrong",
    "ExpiredToken": "the session token has expired: refresh the credentials (AWS_SESSION_TOKEN, profile, web identity)",
    "InvalidToken": "the session token is malformed or invalid",
    "TokenRefreshRequired": "the session token must be refreshed",
    "RequestTimeTooSkewed": "the clock of this node differs too much from the store's",
}
_NOT_FOUND = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such key",
    "NoSuchVersion": "no such version of the object",
}
_RETRYABLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}


class _WrongRegion(Exception):
    """A ranged GET signed for another region than the bucket's (a 301/400 naming the right one)."""

    def __init__(self, region: str) -> None:
        super().__init__(region)
        self.region = region


class _Refused(Exception):
    """A ranged GET refused with 400/401/403: the body that names why is not read on the byte
    path, so a control call asks again to name it."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Signed:
    url: str
    headers: dict[str, str]
    region: str  # signed for
    expires: float  # monotonic


def s3_error(e: BaseException, where: str) -> OriginError:
    """A botocore failure as a typed OriginError naming the problem."""
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return OriginDenied(
            f"{where}: no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
            "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN), or origins.s3.anonymous = true "
            "for a public bucket",
            upstream_code="NoCredentials",
        )
    if isinstance(e, botocore.exceptions.ProfileNotFound):
        return OriginDenied(f"{where}: {e} (origins.s3.profile / AWS_PROFILE)", upstream_code="ProfileNotFound")
    if isinstance(e, botocore.exceptions.PartialCredentialsError):
        return OriginDenied(f"{where}: incomplete AWS credentials: {e}", upstream_code="PartialCredentials")
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        meta = e.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode") or 0) or None
        code = str(err.get("Code") or status or "")
        return code_error(code, status, where, str(err.get("Message") or ""), err.get("Region") or "")
    if isinstance(e, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return OriginError(f"{where}: cannot connect to the S3 endpoint: {e}", retryable=True)
    if isinstance(e, botocore.exceptions.ReadTimeoutError):
        return OriginError(f"{where}: timed out waiting for the S3 endpoint", retryable=True)
    if isinstance(e, botocore.exceptions.CredentialRetrievalError):
        return OriginDenied(f"{where}: could not get AWS credentials: {e}", upstream_code="CredentialRetrieval")
    if isinstance(e, botocore.exceptions.BotoCoreError):
        return OriginError(f"{where}: {type(e).__name__}: {e}", retryable=True)
    return OriginError(f"{where}: {type(e).__name__}: {e}", retryable=True)


def code_error(code: str, status: int | None, where: str, message: str = "", region: str = "") -> OriginError:
    if code.isdigit():
        detail = f"{where}: HTTP {code}"  # a HEAD answer carries no error code, only its status
    else:
        detail = f"{where}: HTTP {status} {code}" if status else f"{where}: {code}"
    if code in _DENIED or code in ("403", "401"):
        why = _DENIED.get(code, "access denied")
        return OriginDenied(f"{detail}: {why}", status=status, upstream_code=code)
    if code in _NOT_FOUND or code == "404":
        return OriginNotFound(f"{detail}: {_NOT_FOUND.get(code, 'not found')}", status=status, upstream_code=code)
    if code in _RETRYABLE or (status is not None and status >= 500):
        why = "the store asks to slow down; backing off" if code in ("SlowDown", "503") else "retrying"
        return OriginError(f"{detail}: {why}", status=status, retryable=True, upstream_code=code)
    if code in _REGION_CODES:
        hint = f" (the bucket is in {region})" if region else ""
        return OriginError(
            f"{detail}: wrong region{hint}; set origins.s3.region or AWS_REGION", status=status, upstream_code=code
        )
    return OriginError(f"{detail}{': ' + message if message else ''}", status=status, upstream_code=code or None)


def full_object_sha256(head: Mapping[str, Any]) -> str:
    """The hex SHA-256 of the whole object, if HEAD returned one ('' otherwise). A COMPOSITE
    checksum (a multipart upload's checksum of part checksums, ``...-N``) is no file digest."""
    value = head.get("ChecksumSHA256")
    if not isinstance(value, str) or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return ""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return ""
    return raw.hex() if len(raw) == 32 else ""


def sha256_sync(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class S3Origin:
    def __init__(
        self,
        cfg: S3OriginConfig,
        http_cfg: HttpOriginConfig,
        reader: ThreadedRangeReader,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = env or {}
        self._cfg = cfg
        self._http = http_cfg
        self._reader = reader  # object bytes: worker threads, off the event loop
        # The precedence users know from the AWS CLI: config, then the service-specific variable.
        self.endpoint = (
            cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3", "") or env.get("AWS_ENDPOINT_URL", "")
        ).rstrip("/")
        self.region = cfg.region or env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", "")
        # auto: path-style for a custom endpoint (MinIO, RGW, an IP), virtual-hosted for AWS.
        self.addressing_style = cfg.addressing_style
        if self.addressing_style == "auto":
            self.addressing_style = "path" if self.endpoint else "virtual"
        self._lock = threading.Lock()  # the session and clients are built on worker threads
        self._session: botocore.session.Session | None = None
        self._default_region = self.region or DEFAULT_REGION  # the profile's region, once read
        self._clients: dict[str, Any] = {}  # region -> botocore S3 client
        self._bucket_region: dict[str, str] = {}  # learned from a redirect or a HEAD
        self._signed: dict[tuple[str, str, str, str], _Signed] = {}

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    # --- botocore, on worker threads -----------------------------------------------------------

    def _session_sync(self) -> botocore.session.Session:
        with self._lock:
            if self._session is None:
                session = botocore.session.Session(profile=self._cfg.profile or None)
                if not self.region:
                    # The profile's own region (``region =`` in the shared config file).
                    try:
                        self._default_region = session.get_config_variable("region") or DEFAULT_REGION
                    except botocore.exceptions.ProfileNotFound:
                        pass  # named in the first call's error
                self._session = session
            return self._session

    async def _ready(self) -> None:
        """The botocore session exists (built on a worker thread: it reads the shared files)."""
        if self._session is None:
            await asyncio.to_thread(self._session_sync)

    def _client_sync(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
        if client is not None:
            return client
        config = botocore.config.Config(
            region_name=region,
            signature_version=UNSIGNED if self._cfg.anonymous else "s3v4",
            s3={"addressing_style": self.addressing_style},
            retries={"total_max_attempts": 1},  # OriginRetry backs off and retries
            connect_timeout=self._http.connect_timeout_s,
            read_timeout=self._http.read_timeout_s,
            max_pool_connections=HEAD_CONCURRENCY * 2,
        )
        client = self._session_sync().create_client("s3", endpoint_url=self.endpoint or None, config=config)
        with self._lock:
            kept = self._clients.setdefault(region, client)
        if kept is not client:
            client.close()  # another thread built one first
        return kept

    def _region_of(self, bucket: str) -> str:
        return self._bucket_region.get(bucket) or self._default_region

    async def _control(self, bucket: str, where: str, call: Callable[[Any], T]) -> T:
        """``call(client)`` on a worker thread; botocore failures become typed OriginErrors."""

        def run() -> T:
            region = self._region_of(bucket)
            try:
                return call(self._client_sync(region))
            except botocore.exceptions.ClientError as e:
                # botocore follows most region redirects itself; where it does not (a HEAD after
                # the bucket's region was cached, an S3-compatible store), ask again once, in the
                # region the answer names.
                there = _region_named(e)
                if not there or there == region:
                    raise
                log.info("bucket is in another region bucket=%s region=%s", bucket, there)
                self._bucket_region[bucket] = there
                return call(self._client_sync(there))

        try:
            return await asyncio.to_thread(run)
        except OriginError:
            raise
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise s3_error(e, where) from None

    async def _head(self, bucket: str, key: str, where: str) -> dict[str, Any]:
        try:
            head = await self._control(
                bucket, where, lambda c: c.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            )
        except OriginError as e:
            if e.retryable or e.upstream_code not in ("400", "401", "403", "404"):
                raise
            # A HEAD answer has no body, so no error code: a one-byte GET names the problem.
            await self._control(
                bucket, where, lambda c: c.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
            )
            raise
        region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
        if isinstance(region, str) and region:
            self._bucket_region.setdefault(bucket, region)
        return head

    def _list_sync(self, client: Any, bucket: str, prefix: str, where: str) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(MAX_LIST_PAGES):
            args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            page = client.list_objects_v2(**args)
            objects.extend(o for o in page.get("Contents", ()) if isinstance(o, dict))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return objects
        raise OriginError(f"{where}: more than {MAX_LIST_PAGES} pages of objects under the prefix")

    # --- origin protocol -----------------------------------------------------------------------

    async def resolve(self, ref: ModelRef) -> Resolution:
        await self._ready()
        if not ref.is_directory:
            head = await self._head(ref.bucket, ref.key, str(ref))
            return Resolution(files=(self._from_head(ref, ref.key, head),))
        where = str(ref)
        listed = await self._control(ref.bucket, where, lambda c: self._list_sync(c, ref.bucket, ref.key, where))
        keys: list[tuple[str, str]] = []  # (key, path under the prefix)
        for o in listed:
            key = o.get("Key")
            if not isinstance(key, str) or key.endswith("/"):
                continue  # a "directory marker" the console creates: no file
            path = key[len(ref.key) :]
            try:
                validate_file_path(path)
            except ValueError:
                log.warning("skipped an object whose key makes no safe file path ref=%s key=%r", ref, key)
                continue
            if _selected(path, ref.include, ref.exclude):
                keys.append((key, path))
        if not keys:
            raise OriginNotFound(
                f"{ref}: no objects under the prefix"
                + (" match the include/exclude patterns" if ref.include or ref.exclude else "")
            )
        # Each object's version id and checksum come from its HEAD (the listing has neither).
        slots = asyncio.Semaphore(HEAD_CONCURRENCY)

        async def one(key: str) -> dict[str, Any]:
            async with slots:
                return await self._head(ref.bucket, key, f"s3://{ref.bucket}/{key}")

        heads = await asyncio.gather(*(one(k) for k, _ in keys))
        return Resolution(files=tuple(self._from_head(ref, k, h) for (k, _), h in zip(keys, heads, strict=True)))

    def _from_head(self, ref: ModelRef, key: str, head: Mapping[str, Any]) -> OriginFile:
        where = f"s3://{ref.bucket}/{key}"
        size, etag = head.get("ContentLength"), head.get("ETag")
        if not isinstance(size, int) or size < 0 or not isinstance(etag, str) or not _TOKEN.match(etag):
            raise OriginError(f"{where}: the store's HEAD carries no usable size and ETag", retryable=False)
        checksums = {"etag": etag}
        version = head.get("VersionId")
        if isinstance(version, str) and version and version != "null" and _TOKEN.match(version):
            checksums["version_id"] = version
        sha = full_object_sha256(head)
        if sha:
            checksums["sha256"] = sha
        return self._file(ref.bucket, key, _path_of(ref, key), size, checksums)

    async def file_for(
        self, ref: ModelRef, revision: str | None, path: str, size: int, checksums: Mapping[str, str]
    ) -> OriginFile:
        """The object ``path`` names under ``ref``: bucket and key come from the ref alone; the
        ETag, version id and sha256 are the content facts, checked for shape."""
        if ref.is_directory:
            try:
                validate_file_path(path)
            except ValueError as e:
                raise OriginError(f"{ref}: bad file path {path!r}: {e}", retryable=False) from None
            if not _selected(path, ref.include, ref.exclude):
                raise OriginError(f"{ref}: {path!r} is not a file of this ref", retryable=False)
            key = ref.key + path
        else:
            if path != _path_of(ref, ref.key):
                raise OriginError(f"{ref}: {path!r} is not the object this ref names", retryable=False)
            key = ref.key
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OriginError(f"{ref}: bad size {size!r} for {path!r}", retryable=False)
        etag, version, sha = checksums.get("etag", ""), checksums.get("version_id", ""), checksums.get("sha256", "")
        if not _TOKEN.match(etag) or (version and not _TOKEN.match(version)) or (sha and not _HEX64.match(sha)):
            raise OriginError(f"{ref}: {path!r} has no valid ETag, version id or sha256", retryable=False)
        kept = {"etag": etag}
        if version:
            kept["version_id"] = version
        if sha:
            kept["sha256"] = sha
        return self._file(ref.bucket, key, path, size, kept)

    @staticmethod
    def _file(bucket: str, key: str, path: str, size: int, checksums: dict[str, str]) -> OriginFile:
        version = checksums.get("version_id", "")
        # Bucket, key and the pinned version: every node of a cluster names the object the same
        # way whatever endpoint it reaches the store through, so their downloads are one.
        return OriginFile(
            path=path,
            size=size,
            identity=f"s3|{bucket}|{key}|{version}|{checksums['etag']}|{size}",
            checksums=checksums,
            locator=f"s3://{bucket}/{quote(key, safe='/~')}" + (f"?versionId={quote(version)}" if version else ""),
        )

    def supports_ranges(self, file: OriginFile) -> bool:
        return True

    def local_path(self, file: OriginFile) -> str | None:
        return None

    async def read_range(self, file: OriginFile, offset: int, length: int) -> bytes | bytearray:
        return await self._get(
            file, lambda url, check, headers: self._reader.read(url, offset, length, check=check, headers=headers)
        )

    async def read_range_into(self, file: OriginFile, offset: int, length: int, sink: Sink) -> None:
        await self._get(
            file,
            lambda url, check, headers: self._reader.read_into(url, offset, length, sink, check=check, headers=headers),
        )

    async def _get(self, file: OriginFile, request: Callable[[str, Check, dict[str, str]], Awaitable[T]]) -> T:
        """One signed ranged GET pinned to the resolved version; a region redirect is followed
        once, a refusal is named by a control call."""
        bucket, key = _bucket_key(file)
        for _ in range(2):
            signed = await self._sign(bucket, key, file.checksums.get("version_id", ""))
            headers = {**signed.headers, "If-Match": file.checksums["etag"]}
            try:
                return await request(signed.url, self._checker(file, signed.region), headers)
            except _WrongRegion as w:
                log.info("bucket is in another region; re-signing bucket=%s region=%s", bucket, w.region)
                self._bucket_region[bucket] = w.region
            except _Refused as r:
                self._signed.clear()  # fresh credentials, fresh signature next time
                raise await self._named_refusal(file, bucket, key, r.status) from None
            except RangeIOError as e:
                raise range_error(e, file.locator) from None
        raise OriginError(f"{file.locator}: the store keeps redirecting to other regions", retryable=False)

    async def _named_refusal(self, file: OriginFile, bucket: str, key: str, status: int) -> OriginError:
        version = file.checksums.get("version_id")
        extra = {"VersionId": version} if version else {}
        try:
            await self._control(
                bucket,
                file.locator,
                lambda c: c.get_object(
                    Bucket=bucket, Key=key, Range="bytes=0-0", IfMatch=file.checksums["etag"], **extra
                )["Body"].close(),
            )
        except OriginError as e:
            if e.upstream_code == "PreconditionFailed":
                return OriginChanged(f"{file.locator}: the object was overwritten at the origin", status=412)
            return e
        # Refused a moment ago, granted now (a signature made just before the credentials rotated).
        return OriginError(
            f"{file.locator}: HTTP {status} from the store; signing again", status=status, retryable=True
        )

    async def _sign(self, bucket: str, key: str, version: str) -> _Signed:
        await self._ready()
        region = self._region_of(bucket)
        k = (bucket, key, version, region)
        signed = self._signed.get(k)
        if signed is not None and signed.expires > time.monotonic():
            return signed
        try:
            signed = await asyncio.to_thread(self._sign_sync, bucket, key, version, region)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise s3_error(e, f"s3://{bucket}/{key}") from None
        if len(self._signed) > 4096:
            self._signed.clear()
        self._signed[k] = signed
        return signed

    def _sign_sync(self, bucket: str, key: str, version: str, region: str) -> _Signed:
        """The object's URL and SigV4 headers over the host and x-amz-* headers only, so the
        Range and If-Match headers of each request may vary under one signature. Credentials are
        read here, on a worker thread: a web identity refresh is a network call."""
        url = self._object_url(self._client_sync(region), bucket, key, version)
        headers: dict[str, str] = {}
        if not self._cfg.anonymous:
            creds = self._session_sync().get_credentials()
            if creds is None:
                raise botocore.exceptions.NoCredentialsError()
            req = botocore.awsrequest.AWSRequest(method="GET", url=url)
            botocore.auth.S3SigV4Auth(creds.get_frozen_credentials(), "s3", region).add_auth(req)
            headers = {k: v for k, v in req.headers.items() if k.lower() != "host"}
        return _Signed(url=url, headers=headers, region=region, expires=time.monotonic() + SIGN_TTL_S)

    def _object_url(self, client: Any, bucket: str, key: str, version: str) -> str:
        base = urlsplit(self.endpoint or client.meta.endpoint_url)
        path = quote(key, safe="/~")
        if self.addressing_style == "virtual" and "." not in bucket:
            url = f"{base.scheme}://{bucket}.{base.netloc}/{path}"
        else:
            url = f"{base.scheme}://{base.netloc}{base.path.rstrip('/')}/{bucket}/{path}"
        return url + (f"?versionId={quote(version, safe='')}" if version else "")

    def _checker(self, file: OriginFile, signed_for: str) -> Check:
        def check(status: int, headers: Message) -> None:
            if status in (200, 206):
                etag, version = headers.get("ETag"), headers.get("x-amz-version-id")
                if etag is not None and etag != file.checksums["etag"]:
                    raise OriginChanged(f"{file.locator}: the object was overwritten at the origin (ETag changed)")
                pinned = file.checksums.get("version_id")
                if pinned and version is not None and version != pinned:
                    raise OriginChanged(f"{file.locator}: the store served another version ({version})")
                span = content_range(headers)
                if span is not None and span[2] is not None and span[2] != file.size:
                    raise OriginChanged(f"{file.locator}: the object changed size ({file.size} -> {span[2]})")
                return
            if status == 412:
                raise OriginChanged(
                    f"{file.locator}: the object was overwritten at the origin (If-Match failed)", status=412
                )
            if status == 404:
                raise OriginChanged(f"{file.locator}: the object is gone from the origin", status=404)
            region = headers.get("x-amz-bucket-region")
            if status in (301, 307, 400) and region and region != signed_for:
                raise _WrongRegion(region)
            if status in (400, 401, 403):
                raise _Refused(status)
            if status == 503:
                raise code_error("SlowDown", 503, file.locator)
            raise status_error(status, file.locator)

        return check

    def stream(self, file: OriginFile) -> AsyncIterator[bytes]:
        return stream_by_ranges(self, file, _READ_CHUNK)

    async def check_unchanged(self, file: OriginFile) -> None:
        return None  # every GET carried If-Match, and S3 serves each GET from one version

    async def check_content(self, file: OriginFile, data_path: Path) -> None:
        """The store's own full-object SHA-256, where it keeps one."""
        want = file.checksums.get("sha256")
        if not want:
            return
        got = await asyncio.to_thread(sha256_sync, data_path)
        if got != want:
            raise IntegrityError(
                f"{file.locator}: sha256 {got} does not match the store's checksum {want}; the file was discarded"
            )


def _region_named(e: botocore.exceptions.ClientError) -> str:
    """The bucket's region as a refusal names it (x-amz-bucket-region, or <Region> in the body)."""
    headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    region = headers.get("x-amz-bucket-region") or e.response.get("Error", {}).get("Region") or ""
    return region if isinstance(region, str) and re.fullmatch(r"[a-z0-9-]{1,64}", region) else ""


def _path_of(ref: ModelRef, key: str) -> str:
    """The file name of an object in the model: its key under the prefix, or a single object's
    last key segment."""
    return key[len(ref.key) :] if ref.is_directory else key.rsplit("/", 1)[-1]


def _bucket_key(file: OriginFile) -> tuple[str, str]:
    """Bucket and key of a file this origin made (its locator is built from the ref)."""
    rest = file.locator.removeprefix("s3://").split("?", 1)[0]
    bucket, _, key = rest.partition("/")
    return bucket, unquote(key)


def _selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(path, p) for p in exclude)
