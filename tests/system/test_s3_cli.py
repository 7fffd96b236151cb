"""``cachectl prefetch s3://...`` end to end: a ``python -m cached`` subprocess started with
``--s3-endpoint`` and AWS keys in its environment, moto's server (IAM auth on) behind a counting
proxy that runs in the test's event loop.

Proves: the prefetch prints the model's path and the bytes there are the object's; a wrong
secret exits 1 with the store's reason and leaves nothing behind; a SIGKILL mid-download
resumes from the verified pieces (the proxy counts less than the object on the second run).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node import DaemonProcess
from tests.support.s3 import Keys, MotoS3, isolate_aws, moto_s3, put_random, s3_proxy
from tests.support.wait import wait_until
from tests.system.test_crash_resume import assert_nothing_partial_published, cachectl

pytestmark = pytest.mark.system

MiB = 1 << 20


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MotoS3, Keys]]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as server:
        keys = server.make_user()
        server.enforce_auth()
        yield server, keys


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # DaemonProcess hands os.environ to the daemon: this is the daemon's AWS environment.
    isolate_aws(monkeypatch, tmp_path)


def node(workdir: Path, endpoint: str) -> DaemonProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return DaemonProcess(workdir, "--s3-endpoint", endpoint, "--piece-size", "1M")


def sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_cachectl_prefetch_of_an_s3_object_prints_its_path(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = server.client(keys)
    s3.create_bucket(Bucket="cli-models")
    data = await asyncio.to_thread(put_random, s3, "cli-models", "tiny/model.gguf", 3 * MiB + 3, 81)
    for k, v in keys.env().items():
        monkeypatch.setenv(k, v)
    d = node(tmp_path / "n", server.url)
    try:
        await asyncio.to_thread(d.start)
        r = await cachectl(d, "prefetch", "--wait", "s3://cli-models/tiny/model.gguf")
        assert r.returncode == 0, r.stderr
        path = Path(r.stdout.strip())
        assert await asyncio.to_thread(sha_file, path / "model.gguf") == hashlib.sha256(data).hexdigest()
    finally:
        await asyncio.to_thread(d.stop)


async def test_cachectl_with_a_wrong_secret_exits_1_naming_the_problem(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = server.client(keys)
    s3.create_bucket(Bucket="cli-secret")
    await asyncio.to_thread(put_random, s3, "cli-secret", "m.bin", MiB, 82)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    d = node(tmp_path / "n", server.url)
    ref = "s3://cli-secret/m.bin"
    try:
        await asyncio.to_thread(d.start)
        r = await cachectl(d, "prefetch", "--wait", ref)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "SignatureDoesNotMatch" in r.stderr and "secret access key is wrong" in r.stderr, r.stderr
        st = json.loads((await cachectl(d, "status", ref, "--json")).stdout)
        assert st["state"] == "failed" and "403" in st["error"], st
        blobs, views = await asyncio.to_thread(assert_nothing_partial_published, d.cache_dir, set())
        assert not blobs and not views
        partial = d.cache_dir / "partial"
        assert not [p for p in partial.iterdir() if not p.name.startswith(".")], "a partial was left"
    finally:
        await asyncio.to_thread(d.stop)


async def test_sigkill_mid_download_resumes_from_the_verified_pieces(
    tmp_path: Path, store: tuple[MotoS3, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, keys = store
    s3 = server.client(keys)
    s3.create_bucket(Bucket="cli-resume")
    size = 24 * MiB
    data = await asyncio.to_thread(put_random, s3, "cli-resume", "big.safetensors", size, 83)
    want = hashlib.sha256(data).hexdigest()
    del data
    for k, v in keys.env().items():
        monkeypatch.setenv(k, v)
    ref = "s3://cli-resume/big.safetensors"
    async with s3_proxy(server.url) as proxy:
        proxy.rate_bps = MiB // 2  # per GET; about 8 in flight: several seconds for the object
        d = node(tmp_path / "n", proxy.url)
        try:
            await asyncio.to_thread(d.start)
            r = await cachectl(d, "prefetch", ref)
            assert r.returncode == 0, r.stderr

            # Counted at the proxy, in this process: no cachectl round trip between the look and
            # the kill, which must come well before the end. A whole piece (one GET) is verified and
            # recorded as its last bytes arrive.
            await wait_until(lambda: proxy.counters.bodies >= 8, timeout_s=60, what="a third of the pieces sent")
            assert await asyncio.to_thread(d.kill, signal.SIGKILL) == -signal.SIGKILL
            first = proxy.counters.bytes_sent
            blobs, views = await asyncio.to_thread(assert_nothing_partial_published, d.cache_dir, {size})
            assert not blobs and not views, "nothing is published by a killed download"

            proxy.rate_bps = None
            proxy.counters.bytes_sent = 0
            await asyncio.to_thread(d.start)
            r = await cachectl(d, "prefetch", "--wait", ref)
            assert r.returncode == 0, r.stderr
            second = proxy.counters.bytes_sent
            assert 0 < second < size, f"the second run read {second} of {size} bytes (first run: {first})"
            path = Path(r.stdout.strip()) / "big.safetensors"
            assert await asyncio.to_thread(sha_file, path) == want
        finally:
            await asyncio.to_thread(d.stop)
