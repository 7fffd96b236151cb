"""Malformed input and failing origins get clear JSON errors; the daemon stays up and useful.

Every bad request must answer 4xx with ``{"error": code, "message": text}`` (never a 500), before
any I/O; afterwards a normal prefetch still works. Origin failures end in a ``failed`` model whose
error says what went wrong and where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.node import ADMIN_TOKEN, running_daemon
from tests.support.origin import Origin, write_random_file

FLAGS = {"store.piece_size_bytes": "64K"}


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    body: bytes | None = None
    status: int = 400
    code: str | None = None
    query: dict[str, str] | None = None

    def __str__(self) -> str:
        shown = self.body if self.body is None or len(self.body) < 80 else self.body[:60] + b"..."
        return f"{self.method} {self.path} {self.query or ''} {shown!r}"


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


BAD_REFS = [
    "hf://",
    "hf://org/",
    "hf://a/b/c",
    "hf://org/name@",
    "hf://org/../x",
    "ftp://x",
    "file:///../etc",
    "file:///srv/models/../../etc",
    "file://host/x",
    "file://",
    "file:///",
    "http://",
    "http:///model.gguf",
    "https://host/",
    "http://[::1/m.bin",
    "no-scheme-at-all",
    "",
    "   ",
    "file:///tmp/a\nb",
    "x" * 5000,
]


async def send(session: aiohttp.ClientSession, base: str, case: Case) -> tuple[int, str, Any]:
    headers = {"Content-Type": "application/json"} if case.body is not None else {}
    headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"  # admin routes reach their own checks
    async with session.request(
        case.method, base + case.path, data=case.body, params=case.query, headers=headers
    ) as resp:
        text = await resp.text(errors="replace")
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = text
        return resp.status, resp.content_type, body


async def check_cases(addr: str, cases: list[Case]) -> list[str]:
    """Send every case; return one line per case that did not get the expected JSON error."""
    problems = []
    async with aiohttp.ClientSession() as session:
        for case in cases:
            status, ctype, body = await send(session, addr, case)
            wrong = []
            if status != case.status:
                wrong.append(f"status {status}, expected {case.status}")
            if ctype != "application/json" or not isinstance(body, dict):
                wrong.append(f"not a JSON object ({ctype})")
            else:
                if not isinstance(body.get("error"), str) or not body["error"]:
                    wrong.append("no 'error' code")
                elif case.code is not None and body["error"] != case.code:
                    wrong.append(f"code {body['error']!r}, expected {case.code!r}")
                if not isinstance(body.get("message"), str) or not body["message"].strip():
                    wrong.append("no 'message'")
            if wrong:
                problems.append(f"{case}: {'; '.join(wrong)}; body={str(body)[:200]}")
    return problems


async def assert_still_serving(addr: str, origin: Origin, tmp_path: Path) -> None:
    write_random_file(tmp_path / "origin" / "after.bin", 200 * 1024 + 1, seed=50)
    async with ApiClient(addr) as api:
        assert await api.request("GET", "/healthz") == {"status": "ok"}
        model = await api.request("POST", "/v1/prefetch", body={"ref": origin.file_url("after.bin"), "wait": True})
        assert model["state"] == "ready"
        assert (Path(model["path"]) / "after.bin").read_bytes() == (tmp_path / "origin" / "after.bin").read_bytes()


async def test_bad_refs_are_400_on_every_route_and_touch_nothing(tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    cache = tmp_path / "cache"
    async with Origin(tmp_path / "origin") as origin, running_daemon(cache, **FLAGS) as d:
        cases = []
        for ref in BAD_REFS:
            cases.append(Case("POST", "/v1/prefetch", js({"ref": ref, "wait": True}), 400, "bad_ref"))
            cases.append(Case("GET", "/v1/models/status", query={"ref": ref}, status=400, code="bad_ref"))
        for route in ("/v1/evict", "/v1/pin", "/v1/unpin", "/v1/verify"):
            cases.append(Case("POST", route, js({"ref": "ftp://x"}), 400, "bad_ref"))
        cases.append(
            Case("POST", "/v1/leases", js({"ref": "file:///../etc", "holder": "h", "ttl_s": 60}), 400, "bad_ref")
        )
        cases.append(Case("GET", "/v1/locate", query={"ref": "hf://"}, status=400, code="bad_ref"))
        problems = await check_cases(d.api_address, cases)
        assert not problems, "\n".join(problems)

        # Refused before any I/O: no job, no model, no pin, no origin request.
        async with ApiClient(d.api_address) as api:
            assert await api.request("GET", "/v1/models") == []
        assert origin.counters.requests == 0
        assert list((cache / "models").iterdir()) == [] and list((cache / "claims" / "pins").iterdir()) == []
        await assert_still_serving(d.api_address, origin, tmp_path)


async def test_malformed_bodies_are_clear_400s(tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    async with Origin(tmp_path / "origin") as origin, running_daemon(tmp_path / "cache", **FLAGS) as d:
        good = f"file://{tmp_path}/origin"
        cases = [
            Case("POST", "/v1/prefetch", b"", 400, "bad_request"),
            Case("POST", "/v1/prefetch", b"not json at all", 400, "bad_request"),
            Case("POST", "/v1/prefetch", b'{"ref": ', 400, "bad_request"),
            Case("POST", "/v1/prefetch", js([good]), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js([{"ref": good}]), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js("just a string"), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js(None), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js(42), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"wait": True}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": None}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": 5}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": [good]}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": {"url": good}}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "wait": "yes"}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "wait": 1}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "wait": None}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "priority": "urgent"}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "priority": 0}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "priority": True}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "timeout_s": "soon"}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", js({"ref": good, "timeout_s": -1}), 400, "bad_request"),
            Case("POST", "/v1/prefetch", b'{"ref": "' + good.encode() + b'", "timeout_s": NaN}', 400, "bad_request"),
            Case(
                "POST", "/v1/prefetch", b'{"ref": "' + good.encode() + b'", "timeout_s": Infinity}', 400, "bad_request"
            ),
            # Invalid UTF-8, in the value and in the structure.
            Case("POST", "/v1/prefetch", b'{"ref": "file:///tmp/\xff\xfe"}', 400, "bad_request"),
            Case("POST", "/v1/prefetch", b"\xff\xfe\x00{", 400, "bad_request"),
            # A lone UTF-16 surrogate is valid JSON but no valid path or URL.
            Case("POST", "/v1/prefetch", b'{"ref": "file:///tmp/a\\ud800b"}', 400),
            Case("POST", "/v1/prefetch", b'{"ref": "http://127.0.0.1:9/a\\ud800b.bin"}', 400),
            # Deeply nested JSON is still just a malformed body.
            Case("POST", "/v1/prefetch", b"[" * 100_000 + b"]" * 100_000, 400, "bad_request"),
            Case("POST", "/v1/prefetch", b'{"ref": ' * 50_000 + b"1" + b"}" * 50_000, 400, "bad_request"),
            Case("POST", "/v1/evict", js({"ref": good, "force": "yes"}), 400, "bad_request"),
            Case("POST", "/v1/evict", b"[]", 400, "bad_request"),
            Case("POST", "/v1/pin", js({}), 400, "bad_request"),
            Case("POST", "/v1/verify", b"{oops", 400, "bad_request"),
            Case("POST", "/v1/verify", js([1]), 400, "bad_request"),
            Case("POST", "/v1/leases", js({"ref": good, "ttl_s": 60}), 400, "bad_request"),
            Case("POST", "/v1/leases", js({"ref": good, "holder": "", "ttl_s": 60}), 400, "bad_request"),
            Case("POST", "/v1/leases", js({"ref": good, "holder": 7, "ttl_s": 60}), 400, "bad_request"),
            Case("POST", "/v1/leases", js({"ref": good, "holder": "h" * 1000, "ttl_s": 60}), 400, "bad_request"),
            Case("POST", "/v1/leases", js({"ref": good, "holder": "h", "ttl_s": "1h"}), 400, "bad_request"),
            Case("GET", "/v1/models/status", status=400, code="bad_request"),
            Case("GET", "/v1/locate", status=400, code="bad_request"),
        ]
        problems = await check_cases(d.api_address, cases)
        assert not problems, "\n".join(problems)
        await assert_still_serving(d.api_address, origin, tmp_path)


async def test_unknown_routes_methods_and_oversized_bodies(tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    async with Origin(tmp_path / "origin") as origin, running_daemon(tmp_path / "cache", **FLAGS) as d:
        huge = js({"ref": f"file://{tmp_path}/origin", "pad": "x" * (1 << 20)})
        cases = [
            Case("GET", "/v1/nope", status=404, code="not_found"),
            Case("POST", "/v9/prefetch", js({"ref": "hf://a/b"}), 404, "not_found"),
            Case("GET", "/", status=404, code="not_found"),
            Case("GET", "/v1/prefetch", status=405, code="method_not_allowed"),
            Case("DELETE", "/v1/models", status=405, code="method_not_allowed"),
            Case("DELETE", "/v1/leases/0123456789abcdef", status=404, code="not_found"),
            Case("DELETE", "/v1/leases/..%2F..%2Fetc", status=404, code="not_found"),
            Case("POST", "/v1/evict", js({"ref": f"file://{tmp_path}/never-prefetched"}), 404, "not_found"),
            Case("POST", "/v1/prefetch", huge, 413, "body_too_large"),
            Case("POST", "/v1/leases", huge, 413, "body_too_large"),
        ]
        problems = await check_cases(d.api_address, cases)
        assert not problems, "\n".join(problems)
        await assert_still_serving(d.api_address, origin, tmp_path)


async def test_origin_404_fails_the_model_with_an_error_naming_the_url(tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        ref = origin.file_url("missing.gguf")
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert e.value.status == 404 and e.value.code == "origin_not_found"
        assert ref in e.value.message and "404" in e.value.message

        status = await api.request("GET", "/v1/models/status", params={"ref": ref})
        assert status["state"] == "failed"
        assert ref in status["error"]
        assert status["path"] is None
        assert origin.counters.gets + origin.counters.heads <= 2, "a 404 is not retried"

        # The missing file appears: a new prefetch of the same ref succeeds.
        write_random_file(tmp_path / "origin" / "missing.gguf", 100 * 1024, seed=60)
        model = await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        assert model["state"] == "ready" and model["error"] is None
        await assert_still_serving(d.api_address, origin, tmp_path)


async def test_connection_refused_fails_after_retries_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    closed = await Origin(tmp_path / "origin").start()
    dead_url = closed.file_url("model.gguf")
    await closed.stop()  # nothing listens on that port any more
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **FLAGS) as d,
        ApiClient(d.api_address) as api,
    ):
        with pytest.raises(ApiError) as e:
            await api.request("POST", "/v1/prefetch", body={"ref": dead_url, "wait": True})
        assert e.value.status == 502 and e.value.code == "origin_error"
        status = await api.request("GET", "/v1/models/status", params={"ref": dead_url})
        assert status["state"] == "failed"
        assert dead_url in status["error"] and "connect" in status["error"].lower(), status["error"]
        await assert_still_serving(d.api_address, origin, tmp_path)
