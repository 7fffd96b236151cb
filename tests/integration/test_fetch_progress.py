"""Progress between verified pieces: ``bytes_in_flight`` grows as bytes arrive.

``bytes_done`` counts verified bytes only (so it never goes back and never includes bytes a
failed piece would discard); with 16 MiB pieces it moves in 16 MiB steps. ``bytes_in_flight``
(on a fetching model object and in ``progress`` events) is what arrived since, so a launcher's
progress bar moves while a piece is still arriving. A real daemon and a throttled HTTP origin.
"""

from __future__ import annotations

from pathlib import Path

from cached.api.client import ApiClient
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

SIZE = 6 << 20  # one 16 MiB piece: nothing is verified before the last byte


async def test_bytes_in_flight_grows_before_the_piece_verifies(tmp_path: Path) -> None:
    write_random_file(tmp_path / "www" / "one.bin", SIZE, seed=5)
    async with Origin(tmp_path / "www") as origin:
        origin.faults.rate_bps = 3 << 20
        ref = origin.file_url("one.bin")
        async with running_daemon(tmp_path / "cache") as d, ApiClient(d.api_address) as api:
            await api.request("POST", "/v1/prefetch", body={"ref": ref})
            samples: list[dict] = []

            async def arriving() -> bool:
                m = await api.request("GET", "/v1/models/status", params={"ref": ref})
                samples.append(m)
                return m["state"] == "fetching" and m["bytes_in_flight"] >= 1 << 20

            await wait_until(arriving, timeout_s=30, what="bytes to show as in flight")
            assert samples[-1]["bytes_done"] == 0  # nothing verified yet: not counted as done

            async def ready() -> bool:
                m = await api.request("GET", "/v1/models/status", params={"ref": ref})
                samples.append(m)
                return m["state"] == "ready"

            await wait_until(ready, timeout_s=60, what="the fetch to finish")
            done = [m["bytes_done"] for m in samples]
            assert done == sorted(done) and done[-1] == SIZE  # monotonic, whole at the end
            seen = [m.get("bytes_in_flight", 0) + m["bytes_done"] for m in samples if m["state"] == "fetching"]
            assert max(seen) <= SIZE
            assert "bytes_in_flight" not in samples[-1]
