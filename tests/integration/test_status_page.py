"""``GET /ui``: the live status page, in a real headless Chromium, over a real three-node cluster.

The browser test drives Debian's ``chromium`` with Playwright (``executable_path`` is the system
binary: Playwright never downloads a browser here) against three in-process daemons on loopback
and a slow loopback origin. It watches one model go from the origin to node ``a`` (progress bar,
state) and then from ``a`` to node ``b`` (the cluster grid), all without reloading the page, and
checks that a ref carrying ``<script>`` is shown as text and never runs. It saves a screenshot and
prints its path.

The other tests need no browser: the page's headers (a strict Content-Security-Policy), that it
needs no admin credential, and that the local API's Host check guards it like every route.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cached.api.client import ApiClient
from cached.daemon import Daemon
from cached.types import ModelRef
from tests.support.cluster import all_see_all, cluster, node_flags, token_file  # noqa: F401 - a fixture
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

MIB = 1 << 20
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# An hf ref the parser accepts whose canonical spelling keeps '<script>' as it is (the include
# pattern is not percent-encoded); fetching it fails (the test daemons' hub is a closed loopback
# port), so it stays on the page as a failed model with an error that repeats it.
HOSTILE = ModelRef.parse("hf://org/name?include=<script>window.__pwned++</script>").canonical
# A node id may hold markup too (no spaces is all config asks); it reaches a's page by gossip.
HOSTILE_NODE = "c<script>window.__pwned++</script>"
WAIT_MS = 60_000


# --- without a browser -----------------------------------------------------------------------------


async def test_page_and_assets_carry_a_strict_policy_and_need_no_admin(tmp_path: Path) -> None:
    async with running_daemon(tmp_path / "c") as d, aiohttp.ClientSession() as s:
        # No Authorization header: the page is for anyone who may read the local API.
        for path, kind in (("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
            async with s.get(d.api_address + path) as resp:
                body = await resp.text()
                assert resp.status == 200, (path, body)
                assert resp.content_type == kind
                csp = resp.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert resp.headers["X-Frame-Options"] == "DENY"
        async with s.get(d.api_address + "/ui") as resp:
            html = await resp.text()
        # One script, from this listener, and nothing from another host.
        assert html.count("<script") == 1 and 'src="ui/app.js"' in html
        assert "http://" not in html and "https://" not in html and "<style" not in html
        async with s.get(d.api_address + "/ui/..%2fcli.py") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"
        async with s.get(d.api_address + "/v1/cluster") as resp:
            grid = await resp.json()
        assert grid["members"] == [{"node_id": "test-node", "address": None, "state": "alive", "self": True}]
        assert grid["models"] == [] and grid["truncated"] is False


async def test_page_is_guarded_by_the_host_check(tmp_path: Path) -> None:
    """DNS rebinding: a page served under a foreign name must not read the API, /ui included."""
    async with running_daemon(tmp_path / "c") as d, aiohttp.ClientSession() as s:
        for path in ("/ui", "/ui/app.js", "/v1/cluster"):
            async with s.get(d.api_address + path, headers={"Host": "rebind.example:7470"}) as resp:
                assert resp.status == 421, path
                assert (await resp.json())["error"] == "host_not_allowed"


# --- in Chromium -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("needs chromium (Debian package 'chromium'; bash scripts/test-deps installs it)")
    pw = pytest.importorskip("playwright.async_api", reason="needs playwright (PyPI; the 'test' extra)")
    async with pw.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            args=CHROMIUM_ARGS,
            headless=True,
        )
        try:
            yield browser
        finally:
            await browser.close()


ROW = """([sel, ref]) => [...document.querySelectorAll(sel)].find((tr) => tr.dataset.ref === ref)"""
ROW_STATE = (
    f"""([sel, ref, state]) => {{ const tr = ({ROW})([sel, ref]); return !!tr && tr.dataset.state === state; }}"""
)
FETCHING_WITH_PROGRESS = f"""(ref) => {{
  const tr = ({ROW})(["#transfer-rows tr", ref]);
  if (!tr || tr.dataset.state !== "fetching") return false;
  const p = tr.querySelector("progress"), rate = tr.querySelector(".rate").textContent;
  const eta = tr.querySelector(".eta").textContent;
  return p.value > 0 && p.value < p.max && rate && eta ? [p.value, p.max, rate, eta] : false;
}}"""
GRID_CELL = f"""([ref, node]) => {{
  const tr = ({ROW})(["#grid-rows tr", ref]);
  const td = tr && [...tr.querySelectorAll("td.cell")].find((c) => c.dataset.node === node);
  return td ? td.dataset.state : null;
}}"""
GRID_CELL_IS = f"""([ref, node, state]) => ({GRID_CELL})([ref, node]) === state"""
# Every state a grid cell showed, recorded as it changes (the page rebuilds the grid on each poll).
WATCH_GRID = """() => {
  window.__seen = new Set();
  const record = () => document.querySelectorAll("#grid-rows td.cell").forEach(
    (td) => window.__seen.add(td.dataset.node + "|" + td.dataset.state));
  new MutationObserver(record).observe(document.getElementById("grid-rows"), {childList: true, subtree: true});
}"""


async def _cell(page: Any, ref: str, node: str) -> str | None:
    return await page.evaluate(GRID_CELL, [ref, node])


async def _wait(page: Any, expr: str, arg: Any) -> Any:
    handle = await page.wait_for_function(expr, arg=arg, timeout=WAIT_MS, polling=100)
    return await handle.json_value()


@pytest.mark.timeout(240)
async def test_status_page_follows_a_model_across_three_nodes_in_chromium(
    tmp_path: Path,
    token_file: Path,  # noqa: F811
) -> None:
    size = 8 * MIB
    write_random_file(tmp_path / "o" / "model.bin", size)
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(Origin(tmp_path / "o"))
        # Slow enough that progress is visible (8 connections at 128 KiB/s: several seconds), and
        # a's uploads slow enough that b's copy is seen in flight from a's grid.
        origin.faults.rate_bps = 128 * 1024
        flags = {"piece": "256K", "peer.serve_rate_bps": "512K"}
        nodes = await cluster(stack, tmp_path, token_file, "ab", **flags)
        a, b = nodes["a"], nodes["b"]
        nodes[HOSTILE_NODE] = await stack.enter_async_context(
            running_daemon(tmp_path / "c", node_id=HOSTILE_NODE, **node_flags(token_file, a, **flags))
        )
        await wait_until(lambda: all_see_all(nodes), timeout_s=15, what="three nodes alive in every view")
        browser = await stack.enter_async_context(chromium())
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on(
            "console",
            lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
        )
        navigations: list[str] = []
        page.on("framenavigated", lambda f: navigations.append(f.url))

        await page.goto(a.api_address + "/ui")
        await page.evaluate("() => { window.__loaded = 'once'; }")
        await page.evaluate(WATCH_GRID)
        # Every member, with its state, in the member list and as a column of the grid.
        await _wait(
            page,
            """(names) => names.every((n) => [...document.querySelectorAll("#members li")].some(
                 (li) => li.dataset.node === n && li.dataset.state === "alive"))""",
            ["a", "b", HOSTILE_NODE],
        )
        assert await page.text_content("#node-id") == "a"
        await _wait(page, """() => document.querySelector("#live").classList.contains("on")""", None)

        # 1. origin -> a: progress, then ready, from the event stream and the polls.
        ref = origin.file_url("model.bin")
        await _prefetch(a, ref)
        seen = await _wait(page, FETCHING_WITH_PROGRESS, ref)
        assert 0 < seen[0] < seen[1] == size
        assert seen[2].endswith("/s") and seen[3][0].isdigit(), seen  # a rate and an ETA
        shot_fetching = tmp_path / "ui-fetching.png"
        await page.screenshot(path=str(shot_fetching), full_page=True)
        await _wait(page, ROW_STATE, ["#model-rows tr", ref, "ready"])
        await _wait(page, GRID_CELL_IS, [ref, "a", "ready"])
        events = await page.evaluate(
            """(ref) => [...document.querySelectorAll("#event-list li")].filter((li) => li.dataset.ref === ref)
                 .map((li) => li.dataset.event)""",
            ref,
        )
        assert {"queued", "fetching", "progress", "ready"} <= set(events), events

        # 2. a -> b: the grid on a's page shows b's copy in flight, then ready; c holds nothing.
        await _prefetch(b, ref)
        await _wait(page, GRID_CELL_IS, [ref, "b", "ready"])
        assert await _cell(page, ref, HOSTILE_NODE) == "none"
        cells = set(await page.evaluate("() => [...window.__seen]"))
        assert "b|fetching" in cells, f"b's copy was never seen in flight in a's grid: {sorted(cells)}"

        # 3. A ref that carries markup is text: shown as written, never parsed, never run.
        async with ApiClient(a.api_address) as api:
            await api.request("POST", "/v1/prefetch", body={"ref": HOSTILE})
        await _wait(page, ROW_STATE, ["#model-rows tr", HOSTILE, "failed"])
        shown = await page.evaluate(
            f"""(ref) => [({ROW})(["#model-rows tr", ref]).querySelector("td.ref .name").textContent,
                  [...document.querySelectorAll("#event-list li .ref")].some((s) => s.textContent === ref)]""",
            HOSTILE,
        )
        assert shown == [HOSTILE, True]
        columns = await page.evaluate(
            "() => [...document.querySelectorAll('#grid-head th')].map((th) => th.textContent)"
        )
        assert columns == ["model", "a", "b", HOSTILE_NODE]
        assert await page.evaluate("() => typeof window.__pwned") == "undefined"
        assert await page.evaluate("() => document.querySelectorAll('script').length") == 1
        assert "&lt;script&gt;window.__pwned++&lt;/script&gt;" in await page.evaluate("() => document.body.innerHTML")

        # All of it live: the page was loaded once and never navigated again.
        assert await page.evaluate("() => window.__loaded") == "once"
        assert len(navigations) == 1, navigations
        shot = tmp_path / "ui.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"status page screenshots: {shot} {shot_fetching}")
        assert problems == [], problems


async def _prefetch(d: Daemon, ref: str) -> dict[str, Any]:
    async with ApiClient(d.api_address) as api:
        return await api.request("POST", "/v1/prefetch", body={"ref": ref})
