"""The peer API's OpenAPI document is valid, matches the router, and schemathesis finds no 5xx.

``cached.api.peer_openapi.peer_document()`` is checked against the OpenAPI 3.0 meta-schema and
compared with ``PeerApi.app()``'s router: every route documented, nothing documented missing.

Then, per operation, schemathesis generates requests from it -- positive (valid per schema) and
negative (violating it) -- and sends them to a real daemon's peer port on loopback, twice:

- signed: a ``requests`` auth hook signs each request as it is sent (method, path and query as
  on the wire, body digest, fresh nonce), so the handlers are reached. Checks:
  ``not_a_server_error``, ``response_schema_conformance``, ``content_type_conformance``,
  ``response_headers_conformance`` (every accepted answer carries the answer headers), and the
  answer MAC itself verifies under the cluster key. The daemon must not have refused one.
- unsigned: the generated signature headers (garbage) are sent as they are; every answer must be
  401, never a 5xx and never signed.

Bounded (``MAX_EXAMPLES`` per operation and mode), derandomized, no shrinking: every failure is
collected with a curl line to reproduce it. No error or traceback may be logged.

The node holds one http model (blob, piece table, manifest, ref) and one partial blob with two of
its four pieces verified; some generated ids, ranges and refs are replaced by those, so the 200
and 206 paths are exercised too, not only the 404s.

Network safety: the daemon learns members from generated gossip and then gossips with them, and
a catalog entry could make it fetch. So every member address in a generated gossip body is
rewritten to a closed loopback port and every catalog ref to the loopback origin's model (or
None); the hf endpoint is the closed loopback port of the test config; mDNS is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from multidict import CIMultiDict
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

from cached.api.peer import PeerApi
from cached.api.peer_openapi import SECURITY_SCHEMES, peer_document
from cached.daemon import Daemon
from cached.peers.auth import HEADER_ANSWER, HEADER_NONCE, sign_request, verify_body_answer, verify_range_answer
from cached.types import hash_piece
from tests.support.cluster import prefetch
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.peerauth import key

MAX_EXAMPLES = 25
TOKEN = "peer-openapi-cluster-token-0123456789"
KEY = key(TOKEN)
NODE_ID = "peer-openapi-node"
CLOSED = "127.0.0.1:9"  # discard port: refused at once
PIECE = 64 * 1024
PARTIAL_KEY = "5" * 64
PARTIAL_PIECES = (0, 2)  # of 4: the others are never verified here
DOCUMENT = peer_document()
OPERATIONS = sorted(f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item)
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, response_headers_conformance]
RUNS = [(label, signed) for label in OPERATIONS for signed in ("signed", "unsigned")]


@dataclass
class Node:
    d: Daemon
    base: str
    model_ref: str
    blob: str
    blob_size: int
    manifest: str

    def tag(self, value: Any) -> int:
        return zlib.crc32(repr(value).encode("utf-8", "surrogatepass"))

    def real_data(self, case: Any) -> None:
        """Point one case in three at what this node holds (see the module docstring)."""
        tag = self.tag((case.path_parameters, case.query, case.headers.get("Range") if case.headers else None))
        if tag % 3:
            return
        params = case.path_parameters or {}
        if "id" in params:
            params["id"] = ("blake3:" if tag & 8 else "") + self.blob
        if "key" in params:
            params["key"] = PARTIAL_KEY
        if "digest" in params:
            params["digest"] = ("blake3:" if tag & 8 else "") + self.manifest
        if isinstance(case.query, dict) and "ref" in case.query:
            case.query["ref"] = self.model_ref
        if case.headers and "Range" in case.headers:
            # Mostly within one piece (the partial serves pieces 0 and 2 only), sometimes to the end.
            start = (tag >> 4) % 4 * PIECE + (tag >> 6) % 1000
            case.headers["Range"] = (
                f"bytes={start}-" if tag & 16 == 0 and tag & 32 == 0 else f"bytes={start}-{start + (tag >> 10) % 5000}"
            )

    def keep_on_loopback(self, case: Any) -> None:
        """Rewrite what generated gossip could make the daemon contact (see the module docstring)."""
        body = case.body
        if not isinstance(body, dict):
            return
        ours = self.tag(body) % 2 == 0
        if ours:
            body["cluster"] = "default"  # so that half the messages are merged, not 403
        for member in body.get("members") if isinstance(body.get("members"), list) else ():
            if isinstance(member, dict) and "address" in member:
                member["address"] = CLOSED
            if ours and isinstance(member, dict) and "cluster" in member:
                member["cluster"] = "default"
        for entry in body.get("catalog") if isinstance(body.get("catalog"), list) else ():
            if isinstance(entry, dict) and "ref" in entry:
                entry["ref"] = self.model_ref if isinstance(entry["ref"], str) else None


@contextlib.asynccontextmanager
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    (tmp_path / "token").write_text(TOKEN)
    src = write_random_file(tmp_path / "origin" / "model.bin", 3 * PIECE + 17, seed=91)
    partial_data = write_random_file(tmp_path / "partial.bin", 4 * PIECE - 5, seed=92).read_bytes()
    async with Origin(tmp_path / "origin") as origin:
        flags = {
            "node_id": NODE_ID,
            "cluster.token_file": str(tmp_path / "token"),
            "store.piece_size_bytes": "64K",
            "peer.seeds": [CLOSED],
            # The model's origin is on loopback: let a gossiped catalog name it, so entries merge.
            "cluster.internal_origins": [f"127.0.0.1:{origin.port}"],
        }
        async with running_daemon(tmp_path / "cache", **flags) as d:
            model = await prefetch(d, origin.file_url("model.bin"))
            manifest = d.store.manifest(model["manifest"].removeprefix("blake3:"))
            assert manifest is not None and manifest.files[0].size == src.stat().st_size
            # A blob still downloading, as a fetch holds it open: pieces 0 and 2 verified.
            async with d.store.partial(
                key=PARTIAL_KEY, size=len(partial_data), piece_size=PIECE, identity_key=PARTIAL_KEY
            ) as partial:
                for i in PARTIAL_PIECES:
                    chunk = partial_data[i * PIECE : (i + 1) * PIECE]
                    await asyncio.to_thread(partial.write_piece_sync, i, chunk, hash_piece(chunk))
                yield Node(
                    d=d,
                    base=f"http://{d.peer_address}",
                    model_ref=model["ref"],
                    blob=manifest.files[0].blob.hex,
                    blob_size=manifest.files[0].size,
                    manifest=manifest.digest,
                )


class Sign(requests.auth.AuthBase):
    """Sign a prepared request exactly as it goes on the wire (what a peer's client does)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body.encode() if isinstance(r.body, str) else (r.body or b"")
        r.headers.update(sign_request(KEY, "schemathesis", r.method or "GET", r.path_url, body))
        return r


def counter(d: Daemon, name: str) -> float:
    return sum(s.value for m in d.metrics.registry.collect() for s in m.samples if s.name == name)


# --- the document --------------------------------------------------------------------------------


async def test_the_document_lists_every_peer_route_and_nothing_else(tmp_path: Path) -> None:
    assert DOCUMENT["openapi"].startswith("3.")
    # Off the loop: the first from_dict in a process takes about a second (lazy imports).
    results = await asyncio.to_thread(lambda: list(schemathesis.openapi.from_dict(DOCUMENT).get_all_operations()))
    broken = [str(r.err()) for r in results if type(r).__name__ != "Ok"]
    assert not broken, broken
    assert sorted(r.ok().label for r in results) == OPERATIONS
    async with node(tmp_path) as n:
        assert n.d.gossip is not None
        api = PeerApi(
            store=n.d.store,
            gossip=n.d.gossip,
            metrics=n.d.metrics,
            key=KEY,
            node_id=NODE_ID,
            max_uploads=1,
            serve_rate_bps=0,
            status=n.d.status,
        )
        routes = {
            f"{r.method} {r.resource.canonical}"
            for r in api.app().router.routes()
            if r.resource is not None and r.method != "HEAD"
        }
    assert routes - set(OPERATIONS) == set(), "peer routes without documentation"
    assert set(OPERATIONS) - routes == set(), "documented operations the router does not have"


def test_the_document_is_valid_against_the_openapi_3_meta_schema() -> None:
    schemathesis.openapi.from_dict(peer_document()).validate()  # raises naming the offending node


def test_every_operation_requires_the_five_signature_headers() -> None:
    headers = {
        s["name"]
        for s in DOCUMENT["components"]["securitySchemes"].values()
        if s["type"] == "apiKey" and s["in"] == "header"
    }
    assert headers == {"X-Cached-Node", "X-Cached-Time", "X-Cached-Nonce", "X-Cached-Body-SHA256", "X-Cached-Auth"}
    assert DOCUMENT["security"] == [{name: [] for name in SECURITY_SCHEMES}]
    assert all("security" not in op for item in DOCUMENT["paths"].values() for op in item.values()), (
        "no operation is exempt"
    )
    assert all("401" in op["responses"] for item in DOCUMENT["paths"].values() for op in item.values())


# --- what schemathesis found ---------------------------------------------------------------------


@pytest.mark.parametrize("span", ["bytes=999999-", "bytes=20-10", "bytes=9999999999999999999-"])
async def test_an_unsatisfiable_range_is_a_signed_json_error_with_content_range(tmp_path: Path, span: str) -> None:
    """A span outside the blob was a 416 with an empty body and no Content-Type (ST104), unlike
    every other refusal: now the usual error body, the size still in Content-Range."""
    async with node(tmp_path) as n:
        url = f"{n.base}/p2p/v1/blobs/{n.blob}"
        response = await asyncio.to_thread(requests.get, url, headers={"Range": span}, auth=Sign(), timeout=30)
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{n.blob_size}"
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    assert response.json()["error"] == "range_not_satisfiable"
    assert (
        verify_body_answer(KEY, response.request.headers[HEADER_NONCE], 416, response.headers, response.content)
        == NODE_ID
    )


# --- schemathesis against a real daemon ----------------------------------------------------------


def _wrong_answer(signing: bool, response: Any) -> str | None:
    """What is wrong with the answer beyond the schema: a signed request must be let in and
    answered with a MAC that verifies; an unsigned one must be 401, unsigned."""
    status = response.status_code
    if not signing:
        if status == 401 and HEADER_ANSWER.lower() not in response.headers:
            return None
        return f"unsigned request answered {status}: {response.text[:300]}"
    headers = CIMultiDict((name, value) for name, values in response.headers.items() for value in values)
    nonce = response.request.headers.get(HEADER_NONCE, "")
    if status == 206:
        node = verify_range_answer(KEY, nonce, status, headers)
    else:
        node = verify_body_answer(KEY, nonce, status, headers, response.content)
    if node == NODE_ID and status not in (401, 503):
        return None
    return f"signed request answered {status} (answer MAC from {node}): {response.text[:300]}"


@pytest.mark.parametrize(("label", "mode"), RUNS)
async def test_schemathesis_finds_no_server_error(
    tmp_path: Path, label: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    method, path = label.split(" ", 1)
    signing = mode == "signed"
    async with node(tmp_path) as n:
        schema = await asyncio.to_thread(schemathesis.openapi.from_dict, DOCUMENT)
        operation = schema[path][method]
        failures: dict[str, str] = {}
        statuses: dict[int, int] = {}

        def fail(key: str, message: str, case: Any) -> None:
            how = "with the signature headers from tests.support.peerauth.signed()" if signing else "as sent"
            failures.setdefault(key, f"{message}\n    reproduce ({how}): {case.as_curl_command(base_url=n.base)}")

        def run(generation: GenerationMode) -> None:
            session = requests.Session()

            @settings(
                max_examples=MAX_EXAMPLES,
                derandomize=True,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            )
            @given(operation.as_strategy(generation_mode=generation))
            def one(case: Any) -> None:
                n.keep_on_loopback(case)
                if signing:
                    n.real_data(case)
                response = case.call(base_url=n.base, session=session, timeout=30, auth=Sign() if signing else None)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                wrong = _wrong_answer(signing, response)
                if wrong:
                    fail(f"{generation.value} {response.status_code}", f"{generation.value}: {wrong}", case)
                try:
                    case.validate_response(response, checks=CHECKS)
                except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - collected, reported together below
                    # (two or more failed checks raise a FailureGroup, which is not an Exception)
                    first = str(e).strip().splitlines()[0]
                    fail(f"{generation.value}: {first}", f"{generation.value}: {str(e)[:1500]}", case)

            try:
                one()
            except Unsatisfiable:
                # Negative mode with nothing schemathesis can violate (no body, query or header).
                assert generation is GenerationMode.NEGATIVE, label
            finally:
                session.close()

        for generation in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            await asyncio.to_thread(run, generation)
        assert not failures, f"{len(failures)} distinct failure(s) on {label} ({mode}):\n\n" + "\n\n".join(
            sorted(failures.values())[:5]
        )
        assert sum(statuses.values()) >= MAX_EXAMPLES
        refused = counter(n.d, "cached_peer_auth_failures_total")
        if signing:
            assert refused == 0, "every signed request was let in"
            assert statuses.keys() - {400, 401, 503}, f"no generated request reached the data: {statuses}"
        else:
            assert refused == sum(statuses.values()), "every unsigned request was refused and counted"
        assert n.d.gossip is not None
        assert all(m.info.address == CLOSED for m in n.d.gossip.membership.members()), (
            "members only ever on the closed loopback port"
        )
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage()[:300] for r in bad]
