"""Names too long for the disk, against a real daemon process and real restarts.

The finding: a local user prefetched ``hf://org/name@<245 characters>``; the daemon wrote
``hf/models--org--name/refs/<revision>`` through a temp name over 255 bytes, and from then on every
start failed with "File name too long" while rebuilding the hf view (systemd restarting it in a
loop). Now the ref is refused with a 400 before any I/O, and a store where an older version left
such an entry starts, skipping it with a warning and a count.

The hub double runs in the test's event loop; daemon start, stop and cachectl run in threads.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import quote

import blake3
import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.hfclients import TINY, tiny_model_files
from tests.support.hub import Hub
from tests.support.node import DaemonProcess

pytestmark = pytest.mark.system

LONG_REVISION = "r" * 245


def node(tmp_path: Path, hub: Hub) -> DaemonProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return DaemonProcess(tmp_path, "--hf-endpoint", hub.url, "--piece-size", "64K")


async def start(d: DaemonProcess) -> DaemonProcess:
    return await asyncio.to_thread(d.start)


async def restart(d: DaemonProcess) -> DaemonProcess:
    await asyncio.to_thread(d.stop)
    return await start(d)


async def prefetch(d: DaemonProcess, ref: str) -> dict:
    async with ApiClient(d.api, timeout_s=120) as api:
        return await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})


async def metric(d: DaemonProcess, line_start: str) -> float | None:
    reader, writer = await asyncio.open_unix_connection(str(d.socket))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return None


async def test_a_revision_too_long_for_a_file_name_is_refused_and_the_daemon_restarts(tmp_path: Path) -> None:
    async with Hub() as hub:
        hub.add_repo(TINY, tiny_model_files())
        hub.add_ref(TINY, LONG_REVISION, "main")  # the hub double serves any revision
        d = await start(node(tmp_path / "n", hub))
        try:
            hub.reset()
            with pytest.raises(ApiError) as e:
                await prefetch(d, f"hf://{TINY}@{LONG_REVISION}")
            assert (e.value.status, e.value.code) == (400, "bad_ref")
            assert "200" in e.value.message and "revision" in e.value.message
            assert hub.counters.requests == 0  # refused before any I/O
            r = await asyncio.to_thread(d.cachectl, "prefetch", f"hf://{TINY}@{LONG_REVISION}", check=False)
            assert r.returncode != 0 and "revision" in r.stderr
            # The finding: the next start is the one that used to fail, for ever.
            await restart(d)
            assert (await prefetch(d, f"hf://{TINY}@main"))["state"] == "ready"
        finally:
            await asyncio.to_thread(d.stop)


def escaped_as_an_older_version_did(canonical: str) -> str:
    esc = quote(canonical, safe="")
    return esc if len(esc) <= 200 else esc[:150] + "%~" + blake3.blake3(canonical.encode()).hexdigest()[:40]


def plant_long_revision(cache: Path, good_ref: str, long_ref: str) -> str:
    """What an older version left after prefetching ``long_ref``: its manifest and ref file (the
    same files as ``good_ref``, under the long name). Returns the ref file's name."""
    record = (cache / "refs" / escaped_as_an_older_version_did(good_ref)).read_text().split("\n")
    manifest = json.loads((cache / "manifests" / f"{record[1].removeprefix('blake3:')}.json").read_bytes())
    manifest["ref"] = long_ref
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    digest = blake3.blake3(data).hexdigest()
    (cache / "manifests" / f"{digest}.json").write_bytes(data)
    name = escaped_as_an_older_version_did(long_ref)
    (cache / "refs" / name).write_text(f"{long_ref}\nblake3:{digest}\n{{}}\n")
    return name


async def test_a_store_an_older_version_left_with_a_too_long_revision_starts_with_a_warning(tmp_path: Path) -> None:
    good, long_ref = f"hf://{TINY}@main", f"hf://{TINY}@{LONG_REVISION}"
    async with Hub() as hub:
        hub.add_repo(TINY, tiny_model_files())
        d = await start(node(tmp_path / "n", hub))
        try:
            assert (await prefetch(d, good))["state"] == "ready"
            await asyncio.to_thread(d.stop)
            planted = plant_long_revision(d.cache_dir, good, long_ref)

            await start(d)  # used to exit 1: "building the hf view of acme/tiny-model: File name too long"
            log = d.log_path.read_text()
            warnings = [line for line in log.splitlines() if planted in line]
            assert len(warnings) == 1 and "WARNING" in warnings[0] and "revision" in warnings[0], warnings
            assert "Traceback" not in log
            assert await metric(d, 'cached_store_bad_entries_total{kind="ref"}') == 1.0
            async with ApiClient(d.api) as api:
                status = await api.request("GET", "/v1/models/status", params={"ref": good})
            assert status["state"] == "ready"
            assert (
                d.cache_dir / "hf" / f"models--{TINY.replace('/', '--')}" / "refs" / "main"
            ).read_text() == hub.head(TINY)

            await restart(d)  # the entry is gone: a clean start, nothing more to skip
            assert await metric(d, 'cached_store_bad_entries_total{kind="ref"}') in (None, 0.0)
        finally:
            await asyncio.to_thread(d.stop)
