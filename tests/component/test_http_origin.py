"""HttpOrigin against a real aiohttp origin on 127.0.0.1: resolve, ranged reads, typed errors."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from cached.config import HttpOriginConfig
from cached.errors import OriginChanged, OriginDenied, OriginError, OriginNotFound
from cached.origins.http import HttpOrigin
from cached.rangeio import ThreadedRangeReader
from cached.types import ModelRef
from tests.support.origin import Origin, write_random_file

SIZE = 3 * 65536 + 321
CFG = HttpOriginConfig(connect_timeout_s=5.0, read_timeout_s=5.0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Origin, bytes]]:
    data = write_random_file(tmp_path / "www" / "model.gguf", SIZE, seed=3).read_bytes()
    async with Origin(tmp_path / "www") as origin:
        yield origin, data


@pytest.fixture
async def http() -> AsyncIterator[HttpOrigin]:
    reader = ThreadedRangeReader(
        connect_timeout_s=CFG.connect_timeout_s, read_timeout_s=CFG.read_timeout_s, user_agent="test"
    )
    async with aiohttp.ClientSession() as session:
        yield HttpOrigin(session, CFG, reader)
    reader.close()


def ref_of(origin: Origin, name: str = "model.gguf") -> ModelRef:
    return ModelRef.parse(origin.file_url(name))


async def test_resolve_gives_size_validator_and_ranges(served, http: HttpOrigin) -> None:
    origin, _ = served
    res = await http.resolve(ref_of(origin))
    (f,) = res.files
    etag = Origin.etag_of(origin.root / "model.gguf")
    assert f.path == "model.gguf"
    assert f.size == SIZE
    assert f.locator == origin.file_url("model.gguf")
    assert f.checksums["etag"] == etag
    assert str(SIZE) in f.identity and etag in f.identity
    assert http.supports_ranges(f)
    assert http.local_path(f) is None
    assert origin.counters.heads == 1 and origin.counters.gets == 0  # HEAD was enough


async def test_identity_changes_with_the_file(served, http: HttpOrigin) -> None:
    origin, _ = served
    before = (await http.resolve(ref_of(origin))).files[0]
    write_random_file(origin.root / "model.gguf", SIZE + 1, seed=4)
    after = (await http.resolve(ref_of(origin))).files[0]
    assert after.size == SIZE + 1
    assert after.key != before.key


async def test_head_405_falls_back_to_a_ranged_get_probe(served, http: HttpOrigin) -> None:
    origin, _ = served
    origin.faults.no_head = True
    (f,) = (await http.resolve(ref_of(origin))).files
    assert f.size == SIZE
    assert http.supports_ranges(f)
    assert f.checksums["etag"] == Origin.etag_of(origin.root / "model.gguf")
    assert origin.counters.heads == 1 and origin.counters.gets == 1
    assert origin.counters.ranges == ["0-0"]


async def test_server_without_range_support_is_detected(served, http: HttpOrigin) -> None:
    origin, _ = served
    origin.faults.no_ranges = True
    (f,) = (await http.resolve(ref_of(origin))).files
    assert f.size == SIZE
    assert not http.supports_ranges(f)
    assert origin.counters.ranges == []


async def test_server_without_range_support_and_head(served, http: HttpOrigin) -> None:
    origin, _ = served
    origin.faults.no_ranges = True
    origin.faults.no_head = True
    (f,) = (await http.resolve(ref_of(origin))).files
    assert f.size == SIZE
    assert not http.supports_ranges(f)


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (404, OriginNotFound, False),
        (410, OriginNotFound, False),
        (403, OriginDenied, False),
        (401, OriginDenied, False),
    ],
)
async def test_client_error_statuses_are_typed_and_final(served, http: HttpOrigin, status, error, retryable) -> None:
    origin, _ = served
    origin.faults.status = status
    with pytest.raises(error) as info:
        await http.resolve(ref_of(origin))
    assert info.value.status == status
    assert info.value.retryable is retryable
    assert str(status) in info.value.message


async def test_missing_file_is_not_found(served, http: HttpOrigin) -> None:
    origin, _ = served
    with pytest.raises(OriginNotFound) as info:
        await http.resolve(ref_of(origin, "nope.gguf"))
    assert info.value.status == 404 and not info.value.retryable


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retryable(served, http: HttpOrigin, status: int) -> None:
    origin, _ = served
    origin.faults.status = status
    with pytest.raises(OriginError) as info:
        await http.resolve(ref_of(origin))
    assert type(info.value) is OriginError
    assert info.value.retryable and info.value.status == status


async def test_server_error_on_read_is_retryable(served, http: HttpOrigin) -> None:
    origin, _ = served
    (f,) = (await http.resolve(ref_of(origin))).files
    origin.faults.fail_first, origin.faults.fail_status = 1, 503
    with pytest.raises(OriginError) as info:
        await http.read_range(f, 0, 100)
    assert info.value.retryable and info.value.status == 503
    assert len(await http.read_range(f, 0, 100)) == 100  # the next request is served


async def test_connection_refused_is_retryable_and_names_host_and_port(http: HttpOrigin) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port any more.
    with pytest.raises(OriginError) as info:
        await http.resolve(ModelRef.parse(f"http://127.0.0.1:{port}/model.gguf"))
    assert info.value.retryable
    assert f"cannot connect to 127.0.0.1:{port}" in info.value.message


async def test_read_range_returns_exact_bytes(served, http: HttpOrigin) -> None:
    origin, data = served
    (f,) = (await http.resolve(ref_of(origin))).files
    for off, length in [(0, 1), (0, 65536), (65536, 65536), (12345, 99999), (SIZE - 321, 321), (SIZE - 1, 1)]:
        assert await http.read_range(f, off, length) == data[off : off + length]
    assert origin.counters.ranges[-1] == f"{SIZE - 1}-{SIZE - 1}"


async def test_stream_returns_the_whole_file(served, http: HttpOrigin) -> None:
    origin, data = served
    origin.faults.no_ranges = True
    (f,) = (await http.resolve(ref_of(origin))).files
    chunks = [c async for c in http.stream(f)]
    assert b"".join(chunks) == data


async def test_changed_file_raises_origin_changed_on_read(served, http: HttpOrigin) -> None:
    origin, data = served
    (f,) = (await http.resolve(ref_of(origin))).files
    origin.faults.change_after_gets = 1
    assert await http.read_range(f, 0, 1000) == data[:1000]  # the first GET still sees the old version
    with pytest.raises(OriginChanged) as info:
        await http.read_range(f, 1000, 1000)
    assert not info.value.retryable


async def test_changed_file_raises_origin_changed_on_stream(served, http: HttpOrigin) -> None:
    origin, _ = served
    origin.faults.no_ranges = True
    (f,) = (await http.resolve(ref_of(origin))).files
    origin.faults.change_after_gets = origin.counters.gets
    with pytest.raises(OriginChanged):
        async for _ in http.stream(f):
            pass


async def test_file_that_shrank_raises_origin_changed(served, http: HttpOrigin) -> None:
    origin, _ = served
    (f,) = (await http.resolve(ref_of(origin))).files
    # Same URL, smaller file, and a server that no longer checks validators: 416 past the end.
    write_random_file(origin.root / "model.gguf", 1000, seed=5)
    no_validator = type(f)(path=f.path, size=f.size, identity=f.identity, checksums={"ranges": "1"}, locator=f.locator)
    with pytest.raises(OriginChanged):
        await http.read_range(no_validator, SIZE - 100, 100)
    with pytest.raises(OriginChanged, match="changed size"):
        await http.read_range(no_validator, 0, 100)  # in range, but Content-Range names the new size
