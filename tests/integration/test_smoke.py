"""The shortest end-to-end path: an http:// file through a real daemon and origin."""

from __future__ import annotations

from pathlib import Path

from cached.api.client import ApiClient
from tests.support.node import running_daemon
from tests.support.origin import Origin, write_random_file


async def test_http_prefetch_gives_identical_read_only_hardlink(tmp_path: Path) -> None:
    src = write_random_file(tmp_path / "origin" / "model.gguf", 3 * 1024 * 1024 + 17)
    async with (
        Origin(tmp_path / "origin") as origin,
        running_daemon(tmp_path / "cache", **{"store.piece_size_bytes": "256K"}) as d,
    ):
        async with ApiClient(d.api_address) as api:
            model = await api.request("POST", "/v1/prefetch", body={"ref": origin.file_url("model.gguf"), "wait": True})
        assert model["state"] == "ready"
        view = Path(model["path"]) / "model.gguf"
        assert view.read_bytes() == src.read_bytes()
        st = view.stat()
        assert st.st_nlink >= 2 and st.st_mode & 0o777 == 0o440
        assert origin.counters.bytes_sent == src.stat().st_size
