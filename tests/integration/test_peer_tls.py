"""The peer API behind TLS, and behind mutual TLS: peers with the CA's certificates talk; others don't."""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from cached.api.client import ApiClient
from cached.peers.auth import verify_body_answer
from tests.support.node import running_daemon
from tests.support.peerauth import key, signed
from tests.support.wait import wait_until

TOKEN = "tls-test-token-0123456789"
pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make test certificates"
)


def make_pki(d: Path) -> dict[str, Path]:
    """A private CA and one node certificate it signed (IP SAN 127.0.0.1)."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=cached-test-ca",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node")
    run(
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return {"ca": d / "ca.crt", "cert": d / "node.crt", "key": d / "node.key"}


async def test_two_nodes_gossip_over_mutual_tls_and_a_plain_client_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    tls = {
        "cluster.token_file": str(token),
        "peer.gossip_interval_s": 0.2,
        "peer.suspect_after_s": 2.0,
        "peer.dead_after_s": 4.0,
        "peer.tls_cert_file": str(pki["cert"]),
        "peer.tls_key_file": str(pki["key"]),
        "peer.tls_ca_file": str(pki["ca"]),
    }
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(running_daemon(tmp_path / "a", node_id="a", **tls))
        b = await stack.enter_async_context(
            running_daemon(tmp_path / "b", node_id="b", **{**tls, "peer.seeds": [a.peer_address]})
        )

        async def met() -> bool:
            async with ApiClient(a.api_address) as api:
                return [p["node_id"] for p in await api.request("GET", "/v1/peers") if p["state"] == "alive"] == ["b"]

        await wait_until(met, timeout_s=20, what="a and b meeting over mutual TLS")

        url = f"https://{a.peer_address}/p2p/v1/holdings?since=0"
        async with aiohttp.ClientSession() as s:
            # Plain HTTP to a TLS port gets nowhere.
            with pytest.raises(aiohttp.ClientError):
                plain = f"http://{a.peer_address}/p2p/v1/holdings?since=0"
                async with s.get(plain, headers=signed(TOKEN, "GET", plain)) as r:
                    await r.read()
            # TLS that trusts the CA but shows no client certificate: refused by mutual TLS.
            ctx = ssl.create_default_context(cafile=str(pki["ca"]))
            ctx.check_hostname = False
            with pytest.raises(aiohttp.ClientError):
                async with s.get(url, headers=signed(TOKEN, "GET", url), ssl=ctx) as r:
                    await r.read()
            # With the node certificate it works (a signed request still required on top), and
            # the answer is signed too.
            ctx.load_cert_chain(str(pki["cert"]), str(pki["key"]))
            headers = signed(TOKEN, "GET", url)
            async with s.get(url, headers=headers, ssl=ctx) as r:
                assert r.status == 200
                body = await r.read()
                assert verify_body_answer(key(TOKEN), headers["X-Cached-Nonce"], 200, r.headers, body) == "a"
            async with s.get(url, ssl=ctx) as r:
                assert r.status == 401
            async with s.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, ssl=ctx) as r:
                assert r.status == 401, "the bare token is not a credential, even inside TLS"
        assert b.gossip is not None and b.gossip.rounds > 0
