"""``POST /v1/leases/{id}/renew``, the heartbeat ``cachectl run`` sends while its command runs.

A live lease moves its expiry to ``ttl_s`` from now, on disk too (a restarted daemon reads the
renewed expiry); a released or unknown lease answers 404; a bad TTL answers 400. Real daemon,
real HTTP; a file:// model in the test's directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cached.api.client import ApiClient, ApiError
from tests.support.node import running_daemon
from tests.support.origin import write_random_file


async def test_renew_extends_a_live_lease_and_404s_once_it_is_gone(tmp_path: Path) -> None:
    write_random_file(tmp_path / "m" / "w.bin", 10_000)
    ref = f"file://{tmp_path / 'm'}"
    async with running_daemon(tmp_path / "cache") as d, ApiClient(d.api_address) as api:
        await api.request("POST", "/v1/prefetch", body={"ref": ref, "wait": True})
        lease = await api.request("POST", "/v1/leases", body={"ref": ref, "holder": "renew-test", "ttl_s": 5})

        renewed = await api.request("POST", f"/v1/leases/{lease['lease_id']}/renew", body={"ttl_s": 600})
        assert renewed["lease_id"] == lease["lease_id"] and renewed["holder"] == "renew-test"
        assert renewed["expires_at"] > lease["expires_at"] + 500
        on_disk = json.loads((tmp_path / "cache" / "claims" / "leases" / f"{lease['lease_id']}.json").read_text())
        assert on_disk["expires_at"] == renewed["expires_at"], "a restarted daemon must see the renewed expiry"
        model = await api.request("GET", "/v1/models/status", params={"ref": ref})
        assert [x["expires_at"] for x in model["leases"]] == [renewed["expires_at"]]

        for bad in ({"ttl_s": 0}, {"ttl_s": "long"}, {"ttl_s": 10**9}):
            with pytest.raises(ApiError) as e:
                await api.request("POST", f"/v1/leases/{lease['lease_id']}/renew", body=bad)
            assert e.value.status == 400, bad

        await api.request("DELETE", f"/v1/leases/{lease['lease_id']}")
        for lease_id in (lease["lease_id"], "0123456789abcdef"):
            with pytest.raises(ApiError) as e:
                await api.request("POST", f"/v1/leases/{lease_id}/renew", body={"ttl_s": 60})
            assert e.value.status == 404 and e.value.code == "not_found", (e.value.code, e.value.message)
        assert not (tmp_path / "cache" / "claims" / "leases" / f"{lease['lease_id']}.json").exists()
