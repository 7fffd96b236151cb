"""What an operator reads from a running daemon: JSON log fields, a capacity the disk cannot hold,
failed prefetches that leave ``ls`` after ``jobs.failed_ttl_s``.

Each daemon is a real ``python -m cached`` process (unix-socket API, mDNS off) or an in-process
daemon on loopback; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest

from cached.api.client import ApiClient, ApiError
from cached.logs import JsonFormatter, split_context
from tests.support.node import DaemonProcess, running_daemon
from tests.support.wait import wait_until

pytestmark = pytest.mark.system


def test_split_context_turns_key_value_pairs_into_fields() -> None:
    text, fields = split_context("prefetch failed ref=hf://a/b@main error=the hub said no (503) msg=x")
    assert text == "prefetch failed"
    assert fields == {"ref": "hf://a/b@main", "error": "the hub said no (503)", "msg_": "x"}
    assert split_context("model ready ref=x bytes=300 seconds=0.25") == (
        "model ready",
        {"ref": "x", "bytes": 300, "seconds": "0.25"},
    )
    assert split_context("no pairs here") == ("no pairs here", {})
    record = logging.LogRecord(
        "cached.jobs", logging.WARNING, __file__, 1, "evicted ref=%s freed_bytes=%d", ("r", 5), None
    )
    line = json.loads(JsonFormatter().format(record))
    assert (line["msg"], line["ref"], line["freed_bytes"], line["level"]) == ("evicted", "r", 5, "warning")


async def test_json_log_fields_and_a_capacity_larger_than_the_disk(tmp_path: Path) -> None:
    too_big = shutil.disk_usage(tmp_path).total * 4
    d = DaemonProcess(tmp_path, "--log-format", "json", "--max-cache-bytes", str(too_big))
    await asyncio.to_thread(d.start)
    try:
        async with ApiClient(d.api) as api:
            node = await api.request("GET", "/v1/node")
        assert "larger than the filesystem" in node["capacity_warning"]
    finally:
        await asyncio.to_thread(d.stop)
    lines = [json.loads(line) for line in d.log_path.read_text().splitlines() if line.startswith("{")]
    listening = next(line for line in lines if line["msg"] == "listening")
    assert listening["node"] == "proc-node" and listening["cache_dir"] == str(d.cache_dir)
    warning = next(line for line in lines if line["msg"] == "capacity larger than the filesystem")
    assert warning["level"] == "warning" and warning["max_bytes"] == too_big


async def test_a_failed_prefetch_leaves_ls_after_failed_ttl_but_all_still_shows_it(tmp_path: Path) -> None:
    # The hub endpoint is a closed loopback port: the prefetch fails at once.
    async with running_daemon(tmp_path / "cache", **{"jobs.failed_ttl_s": 0.5}) as d, ApiClient(d.api_address) as api:
        with pytest.raises(ApiError):  # a wait for a failed prefetch answers its error
            await api.request("POST", "/v1/prefetch", body={"ref": "hf://acme/nowhere", "wait": True})
        failed = await api.request("GET", "/v1/models")
        assert [m["state"] for m in failed] == ["failed"]

        async def gone() -> bool:
            return await api.request("GET", "/v1/models") == []

        await wait_until(gone, timeout_s=10, what="the failed prefetch to leave ls")
        every = await api.request("GET", "/v1/models", params={"all": "1"})
        assert [(m["ref"], m["state"]) for m in every] == [("hf://acme/nowhere@main", "failed")]
        status = await api.request("GET", "/v1/models/status", params={"ref": "hf://acme/nowhere"})
        assert status["state"] == "failed"  # asked by name, it still says what happened
