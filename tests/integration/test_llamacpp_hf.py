"""llama.cpp's ``-hf org/m[:tag]`` through ``MODEL_ENDPOINT``/``HF_ENDPOINT=<api>/hf/``.

The requests are the ones llama.cpp's own source sends (read from ggml-org/llama.cpp, not guessed),
in its order and with its headers (``User-Agent: llama-cpp/<build>``, ``Accept: application/json``),
made here with aiohttp: the llama.cpp binary is not packaged in Debian 12 and building it is out
of this suite's reach.

- current releases (``common/hf-cache.cpp``, ``common/download.cpp``): ``GET api/models/{repo}/refs``
  (the ``main`` branch's ``targetCommit``), ``GET api/models/{repo}/tree/{commit}?recursive=true``,
  then per chosen file ``HEAD`` and ``GET {repo}/resolve/{commit}/{path}`` (``Range: bytes=N-`` to
  resume; it needs ``ETag``, ``Content-Length``, ``Accept-Ranges``).
- older releases (``common/arg.cpp``/``download.cpp`` ``common_get_hf_file``): ``GET
  v2/{repo}/manifests/{tag}`` (tag ``latest`` by default) for ``ggufFile.rfilename`` and
  ``mmprojFile.rfilename``, then ``HEAD``/``GET {repo}/resolve/main/{file}``.

What comes in this way is one model on the node, and a restart of llama.cpp while the hub is down
is answered from the store.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp

from cached.api.client import ApiClient
from cached.api.hf import pick_gguf
from tests.support.hub import Hub, random_bytes
from tests.support.node import running_daemon
from tests.support.wait import wait_until

REPO = "ggml-org/tiny-GGUF"
FILES = {
    "tiny-Q4_K_M.gguf": random_bytes(200_000, seed=11),
    "tiny-Q8_0.gguf": random_bytes(250_000, seed=12),
    "mmproj-tiny-f16.gguf": random_bytes(50_000, seed=13),
    "README.md": b"# tiny\n",
}
HEADERS = {"User-Agent": "llama-cpp/b6000-test", "Accept": "application/json"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def download(http: aiohttp.ClientSession, url: str, size: int) -> bytes:
    """llama.cpp's common_download_file_single_online: HEAD (status, ETag, Content-Length,
    Accept-Ranges), then GET; here the GET is cut and resumed with ``Range: bytes=N-``, as
    llama.cpp does with a ``.downloadInProgress`` file."""
    async with http.head(url, headers={"User-Agent": HEADERS["User-Agent"]}) as r:
        assert 200 <= r.status < 300, r.status
        assert r.headers["ETag"] and int(r.headers["Content-Length"]) == size
        assert r.headers["Accept-Ranges"] != "none"
    async with http.get(url, headers={"User-Agent": HEADERS["User-Agent"]}) as r:
        assert r.status == 200
        head = await r.content.readexactly(size // 3)
    async with http.get(url, headers={"User-Agent": HEADERS["User-Agent"], "Range": f"bytes={len(head)}-"}) as r:
        assert r.status == 206
        return head + await r.read()


async def current_sequence(http: aiohttp.ClientSession, endpoint: str, tag: str) -> tuple[str, dict[str, bytes]]:
    async with http.get(f"{endpoint}api/models/{REPO}/refs", headers=HEADERS) as r:
        assert r.status == 200
        refs = await r.json()
    commit = next(b["targetCommit"] for b in refs["branches"] if b["name"] == "main")
    async with http.get(f"{endpoint}api/models/{REPO}/tree/{commit}?recursive=true", headers=HEADERS) as r:
        assert r.status == 200
        tree = await r.json()
    files = {e["path"]: e for e in tree if e["type"] == "file"}
    model, mmproj = pick_gguf(sorted(files), tag)  # find_best_model / find_best_mmproj
    got = {}
    for path in (model, mmproj):
        assert path is not None
        assert files[path]["lfs"]["oid"] == sha(FILES[path])  # llama.cpp keys its blobs/ by this oid
        got[path] = await download(http, f"{endpoint}{REPO}/resolve/{commit}/{path}", files[path]["size"])
    return commit, got


async def older_sequence(http: aiohttp.ClientSession, endpoint: str, tag: str) -> dict[str, bytes]:
    async with http.get(f"{endpoint}v2/{REPO}/manifests/{tag}", headers=HEADERS) as r:
        assert r.status == 200, await r.text()
        manifest = await r.json()
    got = {}
    for key in ("ggufFile", "mmprojFile"):
        path = manifest[key]["rfilename"]
        got[path] = await download(http, f"{endpoint}{REPO}/resolve/main/{path}", len(FILES[path]))
    return got


def test_pick_gguf_follows_llama_cpp() -> None:
    paths = sorted(["a/m-Q8_0.gguf", "a/m-Q4_K_M.gguf", "a/mmproj-m-f16.gguf", "b/mmproj-x.gguf", "m-imatrix.gguf"])
    assert pick_gguf(paths, "latest") == ("a/m-Q4_K_M.gguf", "a/mmproj-m-f16.gguf")
    assert pick_gguf(paths, "q8_0") == ("a/m-Q8_0.gguf", "a/mmproj-m-f16.gguf")
    assert pick_gguf(paths, "Q2_K") == (None, None)
    split = ["big-Q4_K_M-00002-of-00002.gguf", "big-Q4_K_M-00001-of-00002.gguf"]
    assert pick_gguf(sorted(split), "latest") == ("big-Q4_K_M-00001-of-00002.gguf", None)
    assert pick_gguf(["only.gguf"], "latest") == ("only.gguf", None)


async def test_llama_cpp_requests_current_and_older_then_during_an_outage(tmp_path: Path) -> None:
    hub = Hub()
    await hub.start()
    try:
        commit = hub.add_repo(REPO, FILES)
        async with (
            running_daemon(tmp_path / "cache", **{"origins.hf.endpoint": hub.url}) as d,
            ApiClient(d.api_address) as api,
            aiohttp.ClientSession() as http,
        ):
            endpoint = d.api_address + "/hf/"  # llama.cpp appends a '/' to MODEL_ENDPOINT itself

            got_commit, got = await current_sequence(http, endpoint, "latest")
            assert got_commit == commit
            assert {p: sha(b) for p, b in got.items()} == {
                "tiny-Q4_K_M.gguf": sha(FILES["tiny-Q4_K_M.gguf"]),
                "mmproj-tiny-f16.gguf": sha(FILES["mmproj-tiny-f16.gguf"]),
            }
            old = await older_sequence(http, endpoint, "Q8_0")
            assert {p: sha(b) for p, b in old.items()} == {
                "tiny-Q8_0.gguf": sha(FILES["tiny-Q8_0.gguf"]),
                "mmproj-tiny-f16.gguf": sha(FILES["mmproj-tiny-f16.gguf"]),
            }
            async with http.get(f"{endpoint}v2/{REPO}/manifests/Q2_K", headers=HEADERS) as r:
                assert r.status == 404  # a tag the repo does not have

            async def settled() -> bool:
                models = await api.request("GET", "/v1/models")
                return bool(models) and all(m["state"] == "ready" for m in models)

            await wait_until(settled, timeout_s=30, what="the pulled files to be published")
            models = await api.request("GET", "/v1/models")
            assert [m["ref"] for m in models] == [f"hf://{REPO}@{commit}"]  # one model
            assert sorted(models[0]["files_held"]) == ["mmproj-tiny-f16.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
            fetched = hub.counters.file_bytes

            await hub.stop()  # llama.cpp restarts during an outage: the same requests, from the store
            assert (await current_sequence(http, endpoint, "latest"))[1] == got
            assert await older_sequence(http, endpoint, "Q8_0") == old
            async with http.get(f"{endpoint}api/models/{REPO}/refs", headers=HEADERS) as r:
                assert r.headers["X-Cached-Offline"] == "1"
            assert hub.counters.file_bytes == fetched
    finally:
        await hub.stop()
