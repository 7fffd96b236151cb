"""``GET /v1/events``: the NDJSON stream that progress bars and launchers follow."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cached.api.client import ApiClient
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file


async def test_events_stream_queued_fetching_progress_ready_for_one_ref(tmp_path: Path) -> None:
    size = 4 * 1024 * 1024
    write_random_file(tmp_path / "o" / "m.bin", size)
    async with (
        Origin(tmp_path / "o") as origin,
        running_daemon(tmp_path / "c", **{"store.piece_size_bytes": "64K"}) as d,
    ):
        origin.faults.rate_bps = 256 * 1024  # 8 connections: ~2 s, long enough for progress events
        ref = origin.file_url("m.bin")
        other = origin.file_url("other.bin")
        async with ApiClient(d.api_address) as api:
            events: list[dict] = []

            async def follow() -> None:
                async for ev in api.events(ref):
                    events.append(ev)
                    if ev["state"] in ("ready", "failed"):
                        return

            follower = asyncio.create_task(follow())
            await asyncio.sleep(0)  # let the subscription start before the job
            while not events:
                await asyncio.sleep(0.01)
            await api.request("POST", "/v1/prefetch", body={"ref": other})  # a 404: must not show up
            await api.request("POST", "/v1/prefetch", body={"ref": ref})
            await asyncio.wait_for(follower, 30)

    kinds = [e["event"] for e in events]
    assert kinds[0] == "snapshot" and events[0]["state"] == "absent"
    assert "queued" in kinds and "fetching" in kinds and kinds[-1] == "ready"
    assert all(e["ref"] == ref for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, "a one-second fetch must report progress"
    done = [e["bytes_done"] for e in progress]
    assert done == sorted(done) and all(0 <= b <= size for b in done)
    assert events[-1]["bytes_done"] == events[-1]["bytes_total"] == size


async def test_events_report_a_failure_with_its_error(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    async with Origin(tmp_path / "o") as origin, running_daemon(tmp_path / "c") as d:
        ref = origin.file_url("missing.bin")
        async with ApiClient(d.api_address) as api:

            async def first_final() -> dict:
                async for ev in api.events(ref):
                    if ev["state"] == "failed":
                        return ev
                raise AssertionError("stream ended")

            waiter = asyncio.create_task(first_final())
            await asyncio.sleep(0.05)
            await api.request("POST", "/v1/prefetch", body={"ref": ref})
            ev = await asyncio.wait_for(waiter, 30)
    assert ev["event"] == "failed" and "404" in ev["error"] and ref in ev["error"]
