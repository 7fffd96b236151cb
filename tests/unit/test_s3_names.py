"""The s3 origin's decisions that need no server: where the store is (endpoint and region
precedence, addressing), how an object is named from the ref alone (``file_for`` never takes
an address from a manifest), which checksums count as a full-object SHA-256, and which store
errors are final."""

from __future__ import annotations

import base64
import hashlib

import pytest

from cached.config import HttpOriginConfig, S3OriginConfig
from cached.errors import OriginDenied, OriginError, OriginNotFound
from cached.origins.s3 import S3Origin, code_error, full_object_sha256
from cached.rangeio import ThreadedRangeReader
from cached.types import ModelRef

ETAG = '"0123456789abcdef0123456789abcdef"'


@pytest.fixture
def reader() -> ThreadedRangeReader:
    r = ThreadedRangeReader(connect_timeout_s=1, read_timeout_s=1, user_agent="t", threads=1)
    yield r
    r.close()


def origin(reader: ThreadedRangeReader, env: dict[str, str] | None = None, **cfg: object) -> S3Origin:
    return S3Origin(S3OriginConfig(**cfg), HttpOriginConfig(), reader, env=env or {})  # type: ignore[arg-type]


def test_endpoint_and_region_precedence(reader: ThreadedRangeReader) -> None:
    env = {
        "AWS_ENDPOINT_URL_S3": "http://s3-only:9000",
        "AWS_ENDPOINT_URL": "http://every-service:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "us-west-2",
    }
    assert origin(reader, env, endpoint_url="http://configured:9000/").endpoint == "http://configured:9000"
    assert origin(reader, env).endpoint == "http://s3-only:9000"
    assert origin(reader, {"AWS_ENDPOINT_URL": "http://every-service:9000"}).endpoint == "http://every-service:9000"
    assert origin(reader, {}).endpoint == ""  # AWS itself
    assert origin(reader, env, region="ap-south-1").region == "ap-south-1"
    assert origin(reader, env).region == "eu-west-1"
    assert origin(reader, {"AWS_DEFAULT_REGION": "us-west-2"}).region == "us-west-2"


def test_auto_addressing_is_path_style_for_a_custom_endpoint_and_virtual_on_aws(reader: ThreadedRangeReader) -> None:
    assert origin(reader, endpoint_url="http://minio:9000").addressing_style == "path"
    assert origin(reader).addressing_style == "virtual"
    assert origin(reader, endpoint_url="http://minio:9000", addressing_style="virtual").addressing_style == "virtual"


async def test_file_for_names_the_object_from_the_ref_alone(reader: ThreadedRangeReader) -> None:
    o = origin(reader, endpoint_url="http://minio:9000")
    prefix = ModelRef.parse("s3://models/llama/?exclude=*.md")
    f = await o.file_for(prefix, None, "tok/tokenizer.json", 10, {"etag": ETAG, "version_id": "v1", "locator": "x"})
    assert f.locator == "s3://models/llama/tok/tokenizer.json?versionId=v1"
    assert f.identity == f"s3|models|llama/tok/tokenizer.json|v1|{ETAG}|10"
    assert dict(f.checksums) == {"etag": ETAG, "version_id": "v1"}  # a stored address is not kept
    one = ModelRef.parse("s3://models/llama/model.gguf")
    assert (await o.file_for(one, None, "model.gguf", 5, {"etag": ETAG})).locator == "s3://models/llama/model.gguf"
    for ref, path, checksums in (
        (prefix, "../other/secret", {"etag": ETAG}),  # outside the prefix
        (prefix, "README.md", {"etag": ETAG}),  # excluded by the ref
        (one, "other.gguf", {"etag": ETAG}),  # not the object the ref names
        (prefix, "a.bin", {}),  # no ETag: nothing pins the version
        (prefix, "a.bin", {"etag": "bad\nvalue"}),
        (prefix, "a.bin", {"etag": ETAG, "sha256": "not-hex"}),
    ):
        with pytest.raises(OriginError):
            await o.file_for(ref, None, path, 1, checksums)


def test_only_a_full_object_sha256_is_a_file_digest() -> None:
    digest = hashlib.sha256(b"weights").digest()
    b64 = base64.b64encode(digest).decode()
    assert full_object_sha256({"ChecksumSHA256": b64}) == digest.hex()
    assert full_object_sha256({"ChecksumSHA256": b64, "ChecksumType": "FULL_OBJECT"}) == digest.hex()
    assert full_object_sha256({"ChecksumSHA256": b64, "ChecksumType": "COMPOSITE"}) == ""
    assert full_object_sha256({"ChecksumSHA256": b64 + "-3"}) == ""  # a multipart checksum of checksums
    assert full_object_sha256({"ChecksumSHA256": "not base64!"}) == ""
    assert full_object_sha256({}) == ""


@pytest.mark.parametrize(
    ("code", "status", "kind", "retryable", "words"),
    [
        ("AccessDenied", 403, OriginDenied, False, "access denied"),
        ("SignatureDoesNotMatch", 403, OriginDenied, False, "secret access key is wrong"),
        ("InvalidAccessKeyId", 403, OriginDenied, False, "access key id is not known"),
        ("ExpiredToken", 400, OriginDenied, False, "session token has expired"),
        ("NoSuchBucket", 404, OriginNotFound, False, "no such bucket"),
        ("NoSuchKey", 404, OriginNotFound, False, "no such key"),
        ("SlowDown", 503, OriginError, True, "slow down"),
        ("InternalError", 500, OriginError, True, "retrying"),
        ("PermanentRedirect", 301, OriginError, False, "wrong region"),
    ],
)
def test_store_errors_name_the_problem(
    code: str, status: int, kind: type[OriginError], retryable: bool, words: str
) -> None:
    e = code_error(code, status, "s3://b/k")
    assert type(e) is kind and e.retryable is retryable and e.upstream_code == code
    assert words in e.message and code in e.message
