"""``GET /v1/openapi.json`` is valid OpenAPI 3, describes the routes, and schemathesis finds no 5xx.

The document a real daemon serves is loaded by schemathesis, checked against the OpenAPI 3.0
meta-schema, and compared with the router: every JSON route is documented (the event stream,
``/metrics``, the document itself and the ``/hf`` hub protocol and the ``/v2`` registry mirror are not JSON request/response APIs
and are listed as such), and nothing documented is missing from the router.

Then, per documented operation, schemathesis generates requests from the document -- positive
(valid per schema) and negative (violating it) -- and sends them to an in-process daemon. Checks:
``not_a_server_error`` (the contract: nothing a client sends produces a 5xx), plus
``response_schema_conformance`` and ``content_type_conformance`` (answers match the document).
Bounded (``MAX_EXAMPLES`` per operation and mode), derandomized, no shrinking: every failure is
collected with a curl line to reproduce it. Admin operations (those with a ``security``
requirement) run twice: without a credential, where every answer must be 401/403 and never a
5xx, and with the admin token, which reaches the handlers.

Network safety: generated refs that could make the daemon fetch are rewritten to the loopback
origin, the loopback hub double or a path that does not exist (``safe_ref``); some are replaced by
a model that is ready, so the happy paths are exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from cached.api import openapi
from cached.api.client import ApiClient
from cached.daemon import Daemon
from tests.integration.test_hostile_input import HF_REPO, safe_ref
from tests.support.hfclients import tiny_model_files
from tests.support.hub import Hub
from tests.support.node import ADMIN_TOKEN, running_daemon
from tests.support.origin import Origin, write_random_file

MAX_EXAMPLES = 25
TOKEN = "openapi-test-cluster-token-0123456789"
OPERATIONS = sorted(f"{method.upper()} {path}" for path, item in openapi.document()["paths"].items() for method in item)
# Routes that are not JSON request/response operations, with the reason they are not in the document.
NOT_DOCUMENTED = {
    "GET /v1/events": "an NDJSON event stream",
    "GET /v1/openapi.json": "the document itself",
    "GET /metrics": "Prometheus text exposition",
    "GET /ui": "the status page (HTML)",
    "GET /ui/{name}": "the status page's script, styles and icon",
}
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
ADMIN_OPERATIONS = sorted(
    f"{method.upper()} {path}"
    for path, item in openapi.document()["paths"].items()
    for method, op in item.items()
    if op.get("security") == [{"adminToken": []}]
)
RUNS = [(label, "none") for label in OPERATIONS] + [(label, "admin") for label in ADMIN_OPERATIONS]


@dataclass
class Node:
    d: Daemon
    base: str
    origin: Origin
    ready_refs: list[str]

    def pick_ref(self, ref: str) -> str:
        """A safe ref for what schemathesis generated; one in four is a model that is ready here."""
        tag = zlib.crc32(ref.encode("utf-8", "surrogatepass"))
        if tag % 4 == 0:
            return self.ready_refs[tag % len(self.ready_refs)]
        return safe_ref(ref, self.origin.port)


@contextlib.asynccontextmanager
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    (tmp_path / "token").write_text(TOKEN)
    write_random_file(tmp_path / "origin" / "model.bin", 200 * 1024 + 3, seed=81)
    async with Origin(tmp_path / "origin") as origin, Hub() as hub:
        hub.add_repo(HF_REPO, tiny_model_files(weights_size=50_000, seed=8))
        flags = {
            "node_id": "openapi-node",
            "cluster.token_file": str(tmp_path / "token"),
            "origins.hf.endpoint": hub.url,
            "store.piece_size_bytes": "64K",
        }
        async with running_daemon(tmp_path / "cache", **flags) as d, ApiClient(d.api_address) as api:
            refs = []
            for ref in (origin.file_url("model.bin"), f"hf://{HF_REPO}"):
                model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
                assert model["state"] == "ready", model
                refs.append(model["ref"])
            yield Node(d=d, base=d.api_address, origin=origin, ready_refs=refs)


async def served_document(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(base + "/v1/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        return await resp.json()


# --- the document --------------------------------------------------------------------------------


async def test_the_served_document_loads_and_lists_every_json_route(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        doc = await served_document(n.base)
        assert doc == openapi.document()
        assert doc["openapi"].startswith("3.")
        schema = await asyncio.to_thread(schemathesis.openapi.from_url, n.base + "/v1/openapi.json")
        results = list(schema.get_all_operations())
        broken = [str(r.err()) for r in results if not hasattr(r, "ok") or type(r).__name__ != "Ok"]
        assert not broken, broken
        assert sorted(r.ok().label for r in results) == OPERATIONS

        routes = {
            f"{r.method} {r.resource.canonical}"
            for r in n.d.api.app().router.routes()
            if r.resource is not None and r.method != "HEAD" and not r.resource.canonical.startswith(("/hf", "/v2"))
        }
        assert routes - set(OPERATIONS) == set(NOT_DOCUMENTED), "routes without documentation"
        assert set(OPERATIONS) - routes == set(), "documented operations the router does not have"


async def test_the_served_document_is_valid_against_the_openapi_3_meta_schema(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        schema = await asyncio.to_thread(schemathesis.openapi.from_url, n.base + "/v1/openapi.json")
        schema.validate()  # raises jsonschema_rs.ValidationError naming the offending node


# --- schemathesis against a real daemon ----------------------------------------------------------


def _rewrite_refs(n: Node, case: Any) -> None:
    """Keep the daemon's fetches on loopback (see the module docstring)."""
    for part in (case.body, case.query):
        if isinstance(part, dict) and isinstance(part.get("ref"), str):
            part["ref"] = n.pick_ref(part["ref"])
    if (
        isinstance(case.body, dict)
        and isinstance(case.body.get("Pod"), dict)
        and case.operation.path.startswith("/v1/k8s/")
    ):
        # Give the extender a pod that names a model, as kube-scheduler would.
        seed = repr(case.body).encode("utf-8", "surrogatepass")
        case.body["Pod"] = {
            "metadata": {"annotations": {"cached.io/model": n.pick_ref(seed.decode("utf-8", "surrogatepass"))}}
        }


def test_the_admin_split_is_in_the_document() -> None:
    assert ADMIN_OPERATIONS == [
        "POST /v1/gc",
        "POST /v1/pin",
        "POST /v1/replicate",
        "POST /v1/unpin",
        "POST /v1/verify",
    ]
    assert openapi.document()["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"


@pytest.mark.parametrize(("label", "auth"), RUNS)
async def test_schemathesis_finds_no_server_error(tmp_path: Path, label: str, auth: str) -> None:
    method, path = label.split(" ", 1)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if auth == "admin" else {}
    refused_only = auth == "none" and label in ADMIN_OPERATIONS
    async with node(tmp_path) as n:
        # Off the loop: the first from_dict in a process takes about a second (lazy imports).
        schema = await asyncio.to_thread(schemathesis.openapi.from_dict, await served_document(n.base))
        operation = schema[path][method]
        failures: dict[str, str] = {}
        sent = {"positive": 0, "negative": 0}

        def run(mode: GenerationMode) -> None:
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
            @given(operation.as_strategy(generation_mode=mode))
            def one(case: Any) -> None:
                _rewrite_refs(n, case)
                response = case.call(base_url=n.base, session=session, timeout=30, headers=headers)
                sent[mode.value] += 1
                if refused_only and response.status_code not in (401, 403):
                    failures.setdefault(
                        f"{mode.value}: {response.status_code}",
                        f"{mode.value}: admin route answered {response.status_code} without a credential: {response.text[:300]}",
                    )
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as e:  # noqa: BLE001 - collected, reported together below
                    first = str(e).strip().splitlines()[0]
                    failures.setdefault(f"{mode.value}: {first}", f"{mode.value}: {str(e)[:1500]}")

            try:
                one()
            except Unsatisfiable:
                # Negative mode with no body and no query (at most a free-form string in the path):
                # there is nothing schemathesis can violate.
                assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.query, label
            finally:
                session.close()

        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            await asyncio.to_thread(run, mode)
        assert not failures, f"{len(failures)} distinct failure(s) on {label}:\n\n" + "\n\n".join(
            sorted(failures.values())[:5]
        )
        assert sent["positive"] >= 1
        async with ApiClient(n.base) as api:
            assert await api.request("GET", "/healthz") == {"status": "ok"}
