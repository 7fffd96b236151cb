"""A real S3-compatible server on 127.0.0.1 for tests, the demo and the benchmark: moto's server
in a child process, plus a counting, throttling aiohttp proxy in front of it.

``MotoS3`` starts ``python -m moto.server`` on a free loopback port (its own process, so the
server's work does not compete with the test's event loop for the GIL). It can switch moto's
IAM auth mode on (``enforce_auth``): from then on a request must be signed by an access key moto
knows (``make_user`` creates one), and a wrong secret really gets 403 SignatureDoesNotMatch.
Without auth mode moto still enforces bucket policies and ACLs for unsigned requests, which is
what the anonymous tests need.

``S3Proxy`` forwards every request unchanged (the Host header too, which SigV4 signs) and
counts object bytes sent; ``rate_bps`` slows bodies down so a test can act mid-download.

Everything here talks to 127.0.0.1 only. The tests skip, naming the package, when moto or boto3
is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

REGION = "us-east-1"
# Setup calls run before auth mode is on; these keys are only ever sent to loopback moto.
SETUP_KEY, SETUP_SECRET = "AKIASETUPSETUPSETUP0", "setup-secret-not-checked"
SLOW_DOWN = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message></Error>"
)


def need_moto() -> None:
    """Skip (naming the package) where moto's server or boto3 is missing."""
    for mod, pkg in (("moto.server", "moto[server]"), ("boto3", "boto3"), ("flask", "moto[server]")):
        try:
            __import__(mod)
        except ImportError:
            pytest.skip(f"needs the Python package {pkg} (pip install -e '.[test]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(tmp: Path) -> dict[str, str]:
    """An environment where botocore finds no credentials but the ones a test sets, and never
    asks the instance metadata service (169.254.169.254) or reads ~/.aws."""
    return {
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_REGION": REGION,
    }


AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def isolate_aws(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """This test process's AWS environment: nothing from the user's, no metadata service."""
    for k in AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in aws_env(tmp).items():
        monkeypatch.setenv(k, v)


@dataclass(frozen=True)
class Keys:
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


class MotoS3:
    """moto's server in a child process on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "moto.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> MotoS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a free port may be taken between the probe and moto's bind
            self.port = free_port()
            log = open(self.log_path, "ab")
            env = {**os.environ, "MOTO_PORT": str(self.port)}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=log,
                env=env,
            )
            log.close()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                        return self
                except OSError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"moto did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self, keys: Keys | None = None, *, endpoint: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        k = keys or Keys(SETUP_KEY, SETUP_SECRET)
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.url,
            region_name=REGION,
            aws_access_key_id=k.access_key,
            aws_secret_access_key=k.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def iam(self) -> Any:
        import boto3

        return boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=SETUP_KEY,
            aws_secret_access_key=SETUP_SECRET,
        )

    def make_user(self, name: str = "reader") -> Keys:
        """An IAM user allowed everything in S3; its keys (call before ``enforce_auth``)."""
        iam = self.iam()
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Keys(key["AccessKeyId"], key["SecretAccessKey"])

    def enforce_auth(self) -> None:
        """From now on every request must carry a valid signature of a known key."""
        req = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def make_role(self, name: str = "web-reader") -> str:
        """An IAM role allowed S3 that a web identity (a Kubernetes service account) may assume;
        its ARN."""
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.cluster.invalid"},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                }
            ],
        }
        iam = self.iam()
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_role_policy(RoleName=name, PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        return arn

    def make_public(self, bucket: str) -> None:
        """A bucket policy letting anyone (unsigned requests too) read and list."""
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                # moto checks HEAD as s3:HeadObject (AWS as s3:GetObject): both are allowed.
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": ["s3:GetObject", "s3:HeadObject"],
                    "Resource": f"arn:aws:s3:::{bucket}/*",
                },
                {"Effect": "Allow", "Principal": "*", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"},
            ],
        }
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


@contextlib.contextmanager
def moto_s3(workdir: Path) -> Iterator[MotoS3]:
    need_moto()
    server = MotoS3(workdir).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class ProxyCounters:
    requests: int = 0
    gets: int = 0
    heads: int = 0
    bytes_sent: int = 0  # object bytes of GET bodies (listings not counted)
    authorized: int = 0  # requests that carried an Authorization header
    key_ids: set[str] = field(default_factory=set)  # access key ids that signed requests
    session_tokens: int = 0  # requests that carried X-Amz-Security-Token (temporary credentials)
    redirects: int = 0  # answered 301: signed for another region than the bucket's
    bodies: int = 0  # object GET bodies sent to the end
    paths: list[str] = field(default_factory=list)


class S3Proxy:
    """A counting, throttling HTTP proxy in front of the S3 server, on 127.0.0.1."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.counters = ProxyCounters()
        self.rate_bps: int | None = None  # throttle each GET body to about this
        self.slow_down_gets = 0  # answer this many object GETs 503 SlowDown, as a busy S3 does
        self.head_headers: dict[str, str] = {}  # replace these headers of HEAD answers
        # bucket -> its region: a request signed for another region is answered 301
        # PermanentRedirect with x-amz-bucket-region, as AWS answers it
        self.bucket_regions: dict[str, str] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> S3Proxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _wrong_region(self, request: web.Request) -> web.Response | None:
        bucket = request.path.lstrip("/").split("/", 1)[0]
        region = self.bucket_regions.get(bucket)
        scope = request.headers.get("Authorization", "").partition("Credential=")[2].split("/")
        if region is None or len(scope) < 3 or scope[2] == region:
            return None
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PermanentRedirect</Code>'
            f"<Message>The bucket is in this region: {region}.</Message><Region>{region}</Region></Error>"
        )
        headers = {"x-amz-bucket-region": region}
        if request.method == "HEAD":
            return web.Response(status=301, headers=headers)
        return web.Response(status=301, headers=headers, text=body, content_type="application/xml")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        c = self.counters
        c.requests += 1
        c.gets += request.method == "GET"
        c.heads += request.method == "HEAD"
        c.authorized += "Authorization" in request.headers
        c.session_tokens += "X-Amz-Security-Token" in request.headers
        key_id = request.headers.get("Authorization", "").partition("Credential=")[2].split("/")[0]
        if key_id:
            c.key_ids.add(key_id)
        c.paths.append(request.raw_path)
        body = await request.read()
        wrong = self._wrong_region(request)
        if wrong is not None:
            c.redirects += 1
            return wrong
        if request.method == "GET" and "Range" in request.headers and self.slow_down_gets > 0:
            self.slow_down_gets -= 1
            return web.Response(status=503, text=SLOW_DOWN, content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        async with self._session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),  # exactly as signed: no re-quoting
            headers=headers,
            data=body or None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        ) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            if request.method == "HEAD":
                out.update(self.head_headers)
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            if request.method == "HEAD":
                return resp
            # Path-style: /bucket/key is an object; /bucket?list-type=2 is a listing (not counted).
            counted = request.method == "GET" and up.status in (200, 206) and "/" in request.path.lstrip("/")
            step = 1 << 20 if not self.rate_bps else max(4096, min(1 << 20, self.rate_bps // 20))
            try:
                async for chunk in up.content.iter_chunked(step):
                    if self.rate_bps:
                        await asyncio.sleep(len(chunk) / self.rate_bps)
                    await resp.write(chunk)
                    if counted:
                        c.bytes_sent += len(chunk)
                await resp.write_eof()
                c.bodies += counted
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                pass  # the daemon went away mid-body (a cancelled endgame copy, a kill)
            return resp


@contextlib.asynccontextmanager
async def s3_proxy(upstream: str) -> AsyncIterator[S3Proxy]:
    async with S3Proxy(upstream) as proxy:
        yield proxy


def put_random(client: Any, bucket: str, key: str, size: int, seed: int, *, sha256: bool = False) -> bytes:
    """A deterministic object (one PUT; ``sha256``: with a full-object checksum); its bytes."""
    data = random_bytes(size, seed)
    extra = {"ChecksumAlgorithm": "SHA256"} if sha256 else {}
    client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
    return data


def put_random_elsewhere(server: MotoS3, keys: Keys, bucket: str, key: str, size: int, seed: int) -> str:
    """``put_random`` in a child process; the object's SHA-256. For objects of hundreds of MiB:
    botocore's checksum of a PUT body holds the GIL long enough to stall the test's event loop."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_put_and_hash, server.url, keys, bucket, key, size, seed).result()


def _put_and_hash(url: str, keys: Keys, bucket: str, key: str, size: int, seed: int) -> str:
    import hashlib

    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=keys.access_key,
        aws_secret_access_key=keys.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )
    client.create_bucket(Bucket=bucket)
    return hashlib.sha256(put_random(client, bucket, key, size, seed)).hexdigest()


def random_bytes(size: int, seed: int) -> bytes:
    import hashlib

    block = hashlib.shake_256(f"s3-seed-{seed}".encode()).digest(1 << 20)
    out = bytearray()
    i = 0
    while len(out) < size:
        out += i.to_bytes(4, "little") + block[4:]
        i += 1
    return bytes(out[:size])
