"""The daemon's command line and config file, as systemd and operators meet them.

A bad flag or file exits 78 (EX_CONFIG, which ``RestartPreventExitStatus`` honours) with exactly
one line on stderr naming the culprit; a good file is used, and flags override it. Every daemon
here is a ``python -m cached`` subprocess with mDNS off and its APIs on loopback or a unix socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cached import __version__
from tests.support.node import REPO
from tests.support.wait import wait_until

pytestmark = pytest.mark.system

EX_CONFIG = 78
GiB = 1 << 30


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO)}
    e.pop("NOTIFY_SOCKET", None)
    e.pop("CACHED_API", None)
    return e


async def run(argv: list[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run to completion without blocking the loop; a process that does not exit is killed."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


def cached(*args: str) -> list[str]:
    return [sys.executable, "-m", "cached", *args]


async def cachectl(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await run([sys.executable, "-m", "cached.cli", "--api", api, *args])


class Daemon:
    """A running ``python -m cached``; stdout and stderr go to separate files."""

    def __init__(self, workdir: Path, argv: list[str]) -> None:
        self.workdir = workdir
        self.argv = argv
        self.stdout_path = workdir / "daemon.stdout"
        self.stderr_path = workdir / "daemon.stderr"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, api: str, timeout_s: float = 20.0) -> Daemon:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env(), cwd=REPO
            )

        async def up() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr_path.read_text()}")
            return (await cachectl(api, "status")).returncode == 0

        await wait_until(up, timeout_s=timeout_s, interval_s=0.1, what="the daemon to answer on its API")
        return self

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def safe_flags(tmp_path: Path) -> list[str]:
    """Flags that keep a daemon on loopback with mDNS off, should one start by mistake."""
    return [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--api-listen",
        f"unix:{tmp_path / 'api.sock'}",
        "--peer-listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--hf-endpoint",
        "http://127.0.0.1:9",
        # Some tests import file:// refs from tmp_path; no daemon imports from anywhere unasked.
        "--allow-file-root",
        str(tmp_path),
    ]


def assert_one_config_line(r: subprocess.CompletedProcess[str], *names: str) -> str:
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert any(n in lines[0] for n in names), f"the error names none of {names}: {lines[0]!r}"
    return lines[0]


# --- bad flags and files: 78 ----------------------------------------------------------------------

BAD_FLAGS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "max-cache-bytes-12Q": (["--max-cache-bytes", "12Q"], ("--max-cache-bytes", "store.max_bytes")),
    "api-listen-nonsense": (["--api-listen", "nonsense"], ("--api-listen", "api.listen")),
    "log-format-xml": (["--log-format", "xml"], ("--log-format", "log.format")),
    "unknown-flag": (["--frobnicate", "7"], ("--frobnicate",)),
    "missing-value": (["--cache-dir"], ("--cache-dir",)),
    "relative-cache-dir": (["--cache-dir", "relative/dir"], ("--cache-dir", "cache_dir")),
    "piece-size-too-small": (["--piece-size", "1K"], ("--piece-size", "piece_size")),
    "peer-listen-no-port": (["--peer-listen", "127.0.0.1"], ("--peer-listen", "peer.listen")),
    "hf-endpoint-not-http": (["--hf-endpoint", "ftp://mirror"], ("--hf-endpoint", "origins.hf.endpoint")),
    "missing-config-file": (["--config", "/nonexistent/cached.toml"], ("--config", "/nonexistent/cached.toml")),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
async def test_a_bad_flag_exits_78_with_one_line_naming_it(case: str, tmp_path: Path) -> None:
    flags, names = BAD_FLAGS[case]
    empty = write_config(tmp_path / "empty.toml", "")
    r = await run(cached("--config", str(empty), *safe_flags(tmp_path), *flags))
    assert_one_config_line(r, *names)
    assert not (tmp_path / "api.sock").exists(), "the daemon started despite the bad flag"


BAD_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "syntax-error": ('cache_dir = "/tmp/x"\n[store\nmax_bytes = "1G"\n', ("--config", "config.toml")),
    "unknown-top-level-key": ('cahce_dir = "/tmp/x"\n', ("cahce_dir",)),
    "unknown-nested-key": ('[store]\nmax_byte = "1G"\n', ("store.max_byte",)),
    "high-watermark-string": ('[store]\nhigh_watermark = "high"\n', ("store.high_watermark",)),
    "high-watermark-bool": ("[store]\nhigh_watermark = true\n", ("store.high_watermark",)),
    "high-watermark-array": ("[store]\nhigh_watermark = [0.9]\n", ("store.high_watermark",)),
    "high-watermark-out-of-range": ("[store]\nhigh_watermark = 7\n", ("store.high_watermark",)),
    "table-expected": ('store = "big"\n', ("store",)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
async def test_a_bad_config_file_exits_78_with_one_line_naming_the_key(case: str, tmp_path: Path) -> None:
    text, names = BAD_FILES[case]
    cfg = write_config(tmp_path / "config.toml", text)
    # The safe flags touch none of the bad keys: the file's error must still be caught.
    r = await run(cached("--config", str(cfg), *safe_flags(tmp_path)))
    assert_one_config_line(r, *names)


async def test_an_unusable_cache_dir_exits_78_with_one_line(tmp_path: Path) -> None:
    """A cache_dir below a regular file can never work: a config error, not a crash to retry."""
    (tmp_path / "a-file").write_text("not a directory\n")
    flags = safe_flags(tmp_path)
    flags[flags.index("--cache-dir") + 1] = str(tmp_path / "a-file" / "cache")
    r = await run(cached("--config", str(write_config(tmp_path / "empty.toml", "")), *flags))
    assert "Traceback" not in r.stderr, r.stderr
    assert_one_config_line(r, "cache_dir", "--cache-dir")


async def test_an_api_address_in_use_fails_with_a_clear_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        flags = safe_flags(tmp_path)
        flags[flags.index("--api-listen") + 1] = f"127.0.0.1:{port}"
        r = await run(cached("--config", str(write_config(tmp_path / "empty.toml", "")), *flags), timeout_s=20)
    assert r.returncode not in (0, None), r.stderr
    assert "Traceback" not in r.stderr, f"a start-up failure should be one clear line, not a traceback:\n{r.stderr}"
    assert str(port) in r.stderr.strip().splitlines()[-1], r.stderr


async def test_version() -> None:
    r = await run(cached("--version"))
    assert r.returncode == 0, r.stderr
    assert __version__ in r.stdout
    assert r.stdout.strip().startswith("cached")


# --- a good file is used; flags win ---------------------------------------------------------------


def good_config(tmp_path: Path, *, log_format: str = "text") -> tuple[Path, Path, str]:
    cache = tmp_path / "cache-from-file"
    sock = tmp_path / "from-file.sock"
    cfg = write_config(
        tmp_path / "cached.toml",
        f"""
node_id = "node-from-file"
cache_dir = "{cache}"

[api]
listen = "unix:{sock}"

[peer]
listen = "127.0.0.1:0"

[discovery]
mdns = false

[origins.hf]
endpoint = "http://127.0.0.1:9"

[store]
max_bytes = "1G"
high_watermark = 0.9
low_watermark = 0.8

[log]
format = "{log_format}"
""",
    )
    return cfg, cache, f"unix:{sock}"


def assert_every_line_is_a_json_object(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line on stderr: {line!r}") from None
        assert isinstance(rec, dict), line
        records.append(rec)
    return records


async def node_status(api: str) -> dict[str, Any]:
    r = await cachectl(api, "--json", "status")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


async def test_a_valid_config_file_is_honoured(tmp_path: Path) -> None:
    cfg, cache, api = good_config(tmp_path, log_format="json")
    d = Daemon(tmp_path, cached("--config", str(cfg), "--no-mdns"))
    try:
        await d.start(api)  # api.listen from the file: its unix socket answers
        node = await node_status(api)
        assert node["node_id"] == "node-from-file"
        assert node["cache_dir"] == str(cache)
        assert node["capacity_bytes"] == 1 * GiB
        assert (cache / "blobs").is_dir()
    finally:
        rc = await d.stop()
    assert rc == 0, f"SIGTERM should stop the daemon cleanly:\n{d.stderr_path.read_text()}"
    records = assert_every_line_is_a_json_object(d.stderr_path.read_text())  # log.format from the file
    assert any("listening" in str(r.get("msg", "")) for r in records), records


async def test_flags_override_the_config_file(tmp_path: Path) -> None:
    cfg, file_cache, file_api = good_config(tmp_path)
    flag_cache = tmp_path / "cache-from-flag"
    flag_api = f"unix:{tmp_path / 'from-flag.sock'}"
    d = Daemon(
        tmp_path,
        cached(
            "--config",
            str(cfg),
            "--no-mdns",
            "--node-id",
            "node-from-flag",
            "--cache-dir",
            str(flag_cache),
            "--api-listen",
            flag_api,
            "--max-cache-bytes",
            "2G",
        ),
    )
    try:
        await d.start(flag_api)
        node = await node_status(flag_api)
        assert node["node_id"] == "node-from-flag"
        assert node["cache_dir"] == str(flag_cache)
        assert node["capacity_bytes"] == 2 * GiB
        assert (flag_cache / "blobs").is_dir()
        assert not file_cache.exists()
        assert not Path(file_api.removeprefix("unix:")).exists()
    finally:
        rc = await d.stop()
    assert rc == 0, f"SIGTERM should stop the daemon cleanly:\n{d.stderr_path.read_text()}"
    # Keys given only in the file still apply (log.format is text there: no JSON lines).
    text = d.stderr_path.read_text()
    assert text and not text.lstrip().startswith("{"), text


# --- --log-format json ----------------------------------------------------------------------------


async def test_log_format_json_makes_every_stderr_line_a_json_object(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(200_000))
    api = f"unix:{tmp_path / 'api.sock'}"
    # retries = 0: the failed fetch below fails at once instead of backing off.
    config = write_config(tmp_path / "c.toml", "[origins.http]\nretries = 0\n")
    d = Daemon(tmp_path, cached("--config", str(config), *safe_flags(tmp_path), "--log-format", "json"))
    try:
        await d.start(api)
        # Traffic that logs at info and warning level: a success, a failed fetch, a refused evict.
        # (A missing file:// path is refused at the API now, before any job; an origin that
        # refuses connections on loopback makes a job that fails and logs a warning.)
        assert (await cachectl(api, "prefetch", f"file://{model}", "--wait")).returncode == 0
        assert (await cachectl(api, "prefetch", "http://127.0.0.1:9/no-such-model.gguf", "--wait")).returncode == 1
        assert (await cachectl(api, "evict", f"file://{tmp_path}/never-seen")).returncode == 1
    finally:
        rc = await d.stop()
    assert rc == 0, f"SIGTERM should stop the daemon cleanly:\n{d.stderr_path.read_text()}"
    records = assert_every_line_is_a_json_object(d.stderr_path.read_text())
    messages = " | ".join(str(r.get("msg", "")) for r in records)
    assert len(records) >= 3 and "listening" in messages and "stopped" in messages, messages
    assert {"warning", "info"} <= {r.get("level") for r in records}, records
