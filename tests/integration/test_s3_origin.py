"""``s3://`` refs fetched by real daemons from a real S3-compatible server on loopback (moto's
server in a child process, with IAM auth enforced, behind a counting proxy where a test needs
to count or slow the bytes).

Proves: one object and a prefix (directory markers skipped, include/exclude applied) arrive
byte for byte; credentials come from the environment and from a profile of the shared files;
unsigned requests read a public bucket and are refused by a private one; a wrong secret is a
clear 403 with nothing left behind; the store's full-object SHA-256 is checked before the blob
exists; 503 SlowDown is backed off and retried; an object overwritten mid-download never yields
a mixed file; four daemons wanting one 256 MiB object read it from the store about once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient, ApiError
from cached.daemon import Daemon
from cached.types import ModelRef
from tests.support.cluster import (  # noqa: F401 - token_file is a fixture
    MIB,
    cluster,
    knows_ref_from,
    metric,
    prefetch,
    token_file,
)
from tests.support.node import running_daemon
from tests.support.s3 import Keys, MotoS3, isolate_aws, moto_s3, put_random, put_random_elsewhere, s3_proxy
from tests.support.wait import wait_until

PIECE = "256K"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoS3, Keys]]:
    """One moto server for the module, IAM auth on, and the keys of a user allowed S3."""
    with moto_s3(tmp_path_factory.mktemp("moto-auth")) as server:
        keys = server.make_user()
        server.enforce_auth()
        yield server, keys


@pytest.fixture(scope="module")
def open_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A moto server without IAM auth: it still checks bucket policies for unsigned requests."""
    with moto_s3(tmp_path_factory.mktemp("moto-open")) as server:
        yield server


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_aws(monkeypatch, tmp_path)


def use_keys(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> None:
    for k, v in keys.env().items():
        monkeypatch.setenv(k, v)


def flags(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"origins.s3.endpoint_url": endpoint, "store.piece_size_bytes": PIECE, "origins.http.retries": 3, **extra}


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def failed_prefetch(d: Daemon, ref: str) -> ApiError:
    async with ApiClient(d.api_address) as api:
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
    return e.value


async def status(d: Daemon, ref: str) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        return await api.request("GET", "/v1/models/status", params={"ref": ref})


def assert_nothing_left(d: Daemon, ref: str) -> None:
    """A failed fetch published nothing and left no partial download behind."""
    assert d.store.model(ModelRef.parse(ref)) is None
    assert not (d.store.models_dir / ModelRef.parse(ref).escaped).exists(), "a view was built for a failed fetch"
    assert not [p for p in d.store.partial_dir.iterdir() if not p.name.startswith(".")], "a partial was left"


def assert_nothing_published(d: Daemon, ref: str) -> None:
    assert d.store.model(ModelRef.parse(ref)) is None
    assert not (d.store.models_dir / ModelRef.parse(ref).escaped).exists(), "a view was built for a failed fetch"
    assert not [p for p in d.store.blobs_dir.rglob("*") if p.is_file()], "a blob was published for a failed fetch"


# --- fetched byte for byte ----------------------------------------------------------------------


async def test_one_object_and_a_prefix_arrive_byte_for_byte_with_keys_from_the_environment(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="env-models")
    weights = await asyncio.to_thread(put_random, s3, "env-models", "llama/model.safetensors", 3 * MIB + 17, 1)
    small = await asyncio.to_thread(put_random, s3, "env-models", "llama/config.json", 999, 2)
    nested = await asyncio.to_thread(put_random, s3, "env-models", "llama/tok/tokenizer.json", 5000, 3)
    await asyncio.to_thread(put_random, s3, "env-models", "llama/notes.md", 10, 4)
    s3.put_object(Bucket="env-models", Key="llama/tok/", Body=b"")  # a console "folder": no file
    s3.put_object(Bucket="env-models", Key="other/x.bin", Body=b"not under the prefix")
    use_keys(monkeypatch, keys)

    async with running_daemon(tmp_path / "n", **flags(server.url)) as d:
        one = await prefetch(d, "s3://env-models/llama/model.safetensors")
        assert one["ref"] == "s3://env-models/llama/model.safetensors"
        assert await asyncio.to_thread(digest_tree, Path(one["path"])) == {"model.safetensors": sha(weights)}
        assert one["sources"] == {"origin": len(weights), "peer": 0}

        model = await prefetch(d, "s3://env-models/llama/?exclude=*.md")
        assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {
            "model.safetensors": sha(weights),
            "config.json": sha(small),
            "tok/tokenizer.json": sha(nested),
        }
        # The object already fetched is the same blob: nothing was downloaded twice.
        assert model["sources"]["origin"] == len(small) + len(nested), model["sources"]

        only = await prefetch(d, "s3://env-models/llama/?include=*.json")
        assert set(await asyncio.to_thread(digest_tree, Path(only["path"]))) == {"config.json", "tok/tokenizer.json"}


async def test_keys_from_a_profile_of_the_shared_files(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="profile-models")
    data = await asyncio.to_thread(put_random, s3, "profile-models", "m.bin", MIB + 5, 11)
    config, creds = tmp_path / "aws-config", tmp_path / "aws-credentials"
    config.write_text("[profile team]\nregion = us-east-1\n")
    creds.write_text(
        f"[default]\naws_access_key_id = AKIANOTTHISONE000000\naws_secret_access_key = wrong\n\n"
        f"[team]\naws_access_key_id = {keys.access_key}\naws_secret_access_key = {keys.secret_key}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "team")

    async with running_daemon(tmp_path / "n", **flags(server.url)) as d:
        model = await prefetch(d, "s3://profile-models/m.bin")
        assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"m.bin": sha(data)}

    # The same files, the profile named in the config instead of AWS_PROFILE.
    monkeypatch.delenv("AWS_PROFILE")
    async with running_daemon(tmp_path / "n2", **flags(server.url, **{"origins.s3.profile": "team"})) as d:
        model = await prefetch(d, "s3://profile-models/m.bin")
        assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"m.bin": sha(data)}


async def test_a_web_identity_token_is_exchanged_for_temporary_credentials(
    tmp_path: Path, open_store: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Kubernetes service-account path (IRSA): AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE.
    botocore asks STS (moto's, through AWS_ENDPOINT_URL_STS) for temporary credentials and the
    daemon signs with them. On the server without auth mode: moto answers STS's unsigned
    AssumeRoleWithWebIdentity with a 500 in auth mode."""
    s3 = await asyncio.to_thread(open_store.client)
    await asyncio.to_thread(s3.create_bucket, Bucket="irsa-models")
    data = await asyncio.to_thread(put_random, s3, "irsa-models", "m.bin", MIB, 23)
    token = tmp_path / "sa-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Y2FjaGVkIn0.c2lnbmF0dXJl")
    monkeypatch.setenv("AWS_ROLE_ARN", open_store.make_role())
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", open_store.url)
    # Fail closed: a call that would leave loopback goes to a dead proxy instead.
    for var in ("HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with s3_proxy(open_store.url) as proxy:
        async with running_daemon(tmp_path / "n", **flags(proxy.url)) as d:
            model = await prefetch(d, "s3://irsa-models/m.bin")
            assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"m.bin": sha(data)}
    assert proxy.counters.requests == proxy.counters.authorized == proxy.counters.session_tokens > 0
    assert proxy.counters.key_ids and all(k.startswith("ASIA") for k in proxy.counters.key_ids), (
        "signed with STS's temporary keys"
    )


async def test_anonymous_reads_a_public_bucket_unsigned_and_a_private_one_refuses(
    tmp_path: Path, open_store: MotoS3
) -> None:
    s3 = await asyncio.to_thread(open_store.client)
    await asyncio.to_thread(s3.create_bucket, Bucket="public-models")
    await asyncio.to_thread(s3.create_bucket, Bucket="private-models")
    data = await asyncio.to_thread(put_random, s3, "public-models", "tiny/model.bin", MIB, 21)
    await asyncio.to_thread(put_random, s3, "private-models", "tiny/model.bin", MIB, 22)
    open_store.make_public("public-models")

    async with s3_proxy(open_store.url) as proxy:
        async with running_daemon(tmp_path / "n", **flags(proxy.url, **{"origins.s3.anonymous": True})) as d:
            model = await prefetch(d, "s3://public-models/tiny/model.bin")
            assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"model.bin": sha(data)}
            assert proxy.counters.requests > 0 and proxy.counters.authorized == 0, "every request went unsigned"

            err = await failed_prefetch(d, "s3://private-models/tiny/model.bin")
            assert (err.status, err.code) == (403, "origin_denied"), err
            assert "access denied" in err.message.lower(), err.message
            assert_nothing_left(d, "s3://private-models/tiny/model.bin")


# --- refusals and faults ------------------------------------------------------------------------


async def test_a_wrong_secret_is_a_clear_403_and_leaves_nothing(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="secret-models")
    await asyncio.to_thread(put_random, s3, "secret-models", "m.bin", MIB, 31)
    use_keys(monkeypatch, Keys(keys.access_key, "not-the-secret"))
    async with running_daemon(tmp_path / "n", **flags(server.url)) as d:
        ref = "s3://secret-models/m.bin"
        err = await failed_prefetch(d, ref)
        assert (err.status, err.code) == (403, "origin_denied"), err
        assert "SignatureDoesNotMatch" in err.message and "secret access key is wrong" in err.message, err.message
        st = await status(d, ref)
        assert st["state"] == "failed" and "secret access key is wrong" in st["error"], st
        assert await metric(d, "cached_origin_errors_total", kind="4xx") >= 1
        assert_nothing_left(d, ref)
        assert_nothing_published(d, ref)


async def test_no_credentials_at_all_says_where_they_are_looked_for(tmp_path: Path, store: tuple[MotoS3, Keys]) -> None:
    server, _ = store
    async with running_daemon(tmp_path / "n", **flags(server.url)) as d:
        err = await failed_prefetch(d, "s3://any-bucket/m.bin")
        assert (err.status, err.code) == (403, "origin_denied"), err
        assert "no AWS credentials found" in err.message and "AWS_PROFILE" in err.message, err.message


async def test_missing_bucket_and_key_are_named(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)
    await asyncio.to_thread(s3.create_bucket, Bucket="named-models")
    use_keys(monkeypatch, keys)
    async with running_daemon(tmp_path / "n", **flags(server.url)) as d:
        err = await failed_prefetch(d, "s3://no-such-bucket-here/m.bin")
        assert (err.status, err.code) == (404, "origin_not_found") and "no such bucket" in err.message, err
        err = await failed_prefetch(d, "s3://named-models/missing.bin")
        assert (err.status, err.code) == (404, "origin_not_found") and "no such key" in err.message, err
        err = await failed_prefetch(d, "s3://named-models/empty-prefix/")
        assert err.status == 404 and "no objects under the prefix" in err.message, err


async def test_a_wrong_full_object_sha256_is_caught_before_the_blob_exists(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="sum-models")
    good = await asyncio.to_thread(put_random, s3, "sum-models", "good.bin", MIB + 1, 41, sha256=True)
    await asyncio.to_thread(put_random, s3, "sum-models", "bad.bin", MIB + 1, 42, sha256=True)
    use_keys(monkeypatch, keys)
    async with s3_proxy(server.url) as proxy:
        async with running_daemon(tmp_path / "n", **flags(proxy.url)) as d:
            model = await prefetch(d, "s3://sum-models/good.bin")  # the store's checksum matches
            assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"good.bin": sha(good)}

            # The store's checksum of bad.bin, as this node hears it, names other bytes.
            proxy.head_headers = {"x-amz-checksum-sha256": "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg="}
            err = await failed_prefetch(d, "s3://sum-models/bad.bin")
            assert err.status == 502 and "does not match the store's checksum" in err.message, err
            assert d.store.model(ModelRef.parse("s3://sum-models/bad.bin")) is None
            blobs = [p for p in d.store.blobs_dir.rglob("*") if p.is_file() and not p.name.endswith(".pieces")]
            assert len(blobs) == 1, "only good.bin's blob exists"


async def test_slow_down_503_is_backed_off_and_retried(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="busy-models")
    data = await asyncio.to_thread(put_random, s3, "busy-models", "m.bin", 2 * MIB, 51)
    use_keys(monkeypatch, keys)
    async with s3_proxy(server.url) as proxy:
        async with running_daemon(tmp_path / "n", **flags(proxy.url)) as d:
            proxy.slow_down_gets = 3
            model = await prefetch(d, "s3://busy-models/m.bin")
            assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"m.bin": sha(data)}
            assert proxy.slow_down_gets == 0, "every injected 503 was answered"
            assert await metric(d, "cached_origin_errors_total", kind="5xx") >= 3


async def test_a_bucket_in_another_region_is_followed_there(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="far-models")
    data = await asyncio.to_thread(put_random, s3, "far-models", "llm/m.bin", 2 * MIB, 55)
    use_keys(monkeypatch, keys)  # AWS_REGION is us-east-1; the bucket answers from eu-west-1
    async with s3_proxy(server.url) as proxy:
        proxy.bucket_regions["far-models"] = "eu-west-1"
        async with running_daemon(tmp_path / "n", **flags(proxy.url)) as d:
            model = await prefetch(d, "s3://far-models/llm/")
            assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"m.bin": sha(data)}
            assert proxy.counters.redirects >= 1, "the store redirected at least once"
            redirects = proxy.counters.redirects
            # Learned once: the bucket's later requests are signed for its region from the start.
            await prefetch(d, "s3://far-models/llm/m.bin")
            assert proxy.counters.redirects == redirects


async def test_an_object_overwritten_mid_download_never_yields_a_mixed_file(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="moving-models")
    size = 8 * MIB
    old = await asyncio.to_thread(put_random, s3, "moving-models", "m.bin", size, 61)
    use_keys(monkeypatch, keys)
    ref = "s3://moving-models/m.bin"
    async with s3_proxy(server.url) as proxy:
        proxy.rate_bps = 2 * MIB  # per GET: the whole object takes a few seconds
        async with running_daemon(tmp_path / "n", **flags(proxy.url)) as d:
            async with ApiClient(d.api_address) as api:
                await api.request("POST", "/v1/prefetch", body={"ref": ref})
            await wait_until(lambda: proxy.counters.bytes_sent >= size // 4, timeout_s=60, what="a quarter fetched")
            new = await asyncio.to_thread(put_random, s3, "moving-models", "m.bin", size, 62)
            proxy.rate_bps = None

            st = await wait_until(
                lambda: _finished(d, ref), timeout_s=60, what="the fetch to end, one way or the other"
            )
            if st["state"] == "ready":
                got = await asyncio.to_thread(digest_tree, Path(st["path"]))
                assert got["m.bin"] in (sha(old), sha(new)), "the file is a mix of two versions"
                return
            assert st["error_code"] == "origin_changed" and "overwritten" in st["error"], st
            assert_nothing_published(d, ref)
            # Asked again, it resolves the new version and fetches it whole: the old version's
            # pieces are kept apart, under the old ETag's identity, and never reused.
            sent = proxy.counters.bytes_sent
            model = await prefetch(d, ref)
            assert proxy.counters.bytes_sent - sent == size
            assert await asyncio.to_thread(digest_tree, Path(model["path"])) == {"m.bin": sha(new)}


async def _finished(d: Daemon, ref: str) -> dict[str, Any] | None:
    st = await status(d, ref)
    return st if st["state"] in ("ready", "failed") else None


# --- a cluster ----------------------------------------------------------------------------------


async def test_an_object_one_node_fetched_reaches_another_from_the_peer(
    tmp_path: Path, token_file: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = await asyncio.to_thread(server.client, keys)  # building a boto3 client parses its service model
    await asyncio.to_thread(s3.create_bucket, Bucket="shared-models")
    size = 6 * MIB + 3
    data = await asyncio.to_thread(put_random, s3, "shared-models", "m/model.safetensors", size, 65)
    use_keys(monkeypatch, keys)
    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(s3_proxy(server.url))
        nodes = await cluster(stack, tmp_path, token_file, "ab", **{"origins.s3.endpoint_url": proxy.url})
        a, b = nodes["a"], nodes["b"]
        ref = "s3://shared-models/m/"
        model_a = await prefetch(a, ref)
        assert model_a["sources"] == {"peer": 0, "origin": size}
        await wait_until(lambda: knows_ref_from(b, ref, {"a"}), timeout_s=10, what="b learns a holds the model")
        sent = proxy.counters.bytes_sent

        model_b = await prefetch(b, ref)
        assert model_b["sources"] == {"peer": size, "origin": 0}, model_b["sources"]
        assert proxy.counters.bytes_sent == sent, "b read nothing from the store: it resolved, then asked a"
        got = await asyncio.to_thread(digest_tree, Path(model_b["path"]))
        assert got == {"model.safetensors": sha(data)}


async def test_four_daemons_wanting_one_256_mib_object_read_the_store_about_once(
    tmp_path: Path, token_file: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    size = 256 * MIB
    want = await asyncio.to_thread(put_random_elsewhere, server, keys, "big-models", "big.safetensors", size, 71)
    use_keys(monkeypatch, keys)
    async with contextlib.AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(s3_proxy(server.url))
        steady = {"peer.suspect_after_s": 3.0, "peer.dead_after_s": 6.0}
        nodes = await cluster(
            stack,
            tmp_path,
            token_file,
            "abcd",
            piece="4M",
            **{"origins.s3.endpoint_url": proxy.url, **steady},
        )
        ref = "s3://big-models/big.safetensors"
        models = await asyncio.gather(*(prefetch(d, ref) for d in nodes.values()))

        ratio = proxy.counters.bytes_sent / size
        assert ratio <= 1.05, f"the store sent {ratio:.3f}x the object for four nodes"
        for name, m in zip(nodes, models):
            assert m["bytes_total"] == m["bytes_done"] == size, name
            got = await asyncio.to_thread(digest_tree, Path(m["path"]))
            assert got == {"big.safetensors": want}, f"{name} holds other bytes"
        assert sum(m["sources"]["origin"] for m in models) == proxy.counters.bytes_sent
