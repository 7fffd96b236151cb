"""Real daemons for tests: in-process (``running_daemon``) or as subprocesses (``DaemonProcess``).

Every daemon listens on loopback only and is started with mDNS off, as the network-safety rules
require; nothing here sends traffic anywhere but 127.0.0.0/8.

Test daemons allow ``file://`` imports from the temporary directory (where tests put their
files) unless a test names its own roots, and accept the admin token of ``ADMIN_TOKEN_FILE``,
which ``$CACHED_ADMIN_TOKEN_FILE`` points at for this test process: ``ApiClient`` and ``cachectl``
send it, so tests that are not about the admin split call admin routes as an operator would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cached.config import Config, load
from cached.daemon import Daemon

REPO = Path(__file__).resolve().parents[2]
NO_CONFIG_FILE = Path("/nonexistent/cached-test-config.toml")
TEST_FILE_ROOT = Path(tempfile.gettempdir())
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


def _admin_token_file() -> Path:
    path = Path(tempfile.gettempdir()) / f"cached-test-admin-{os.getuid()}" / "admin.token"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if not path.exists() or path.read_text() != ADMIN_TOKEN:
        path.write_text(ADMIN_TOKEN)
        path.chmod(0o600)
    return path


ADMIN_TOKEN_FILE = _admin_token_file()
os.environ.setdefault("CACHED_ADMIN_TOKEN_FILE", str(ADMIN_TOKEN_FILE))


def test_config(cache_dir: Path, **flags: Any) -> Config:
    """A Config for a loopback test node; ``flags`` use dotted keys (``store.max_bytes``)."""
    base: dict[str, Any] = {
        "node_id": "test-node",
        "cache_dir": str(cache_dir),
        "api.listen": "127.0.0.1:0",
        "peer.listen": "127.0.0.1:0",
        "discovery.mdns": False,
        "origins.hf.endpoint": "http://127.0.0.1:9",  # never the public hub
        "origins.http.backoff_s": 0.05,
        "origins.http.backoff_max_s": 0.2,
        "origins.http.read_timeout_s": 10.0,
        "origins.file.allowed_roots": [str(TEST_FILE_ROOT)],
        "api.admin_token_file": str(ADMIN_TOKEN_FILE),
    }
    base.update(flags)
    return load(None, base, default_file=NO_CONFIG_FILE)


@contextlib.asynccontextmanager
async def running_daemon(cache_dir: Path, **flags: Any) -> AsyncIterator[Daemon]:
    async with Daemon(test_config(cache_dir, **flags)) as daemon:
        yield daemon


class DaemonProcess:
    """``python -m cached`` as a child process with its API on a unix socket (no port races)."""

    def __init__(self, workdir: Path, *extra: str, file_roots: tuple[Path, ...] = (TEST_FILE_ROOT,)) -> None:
        self.workdir = workdir
        self.file_roots = file_roots
        self.cache_dir = workdir / "cache"
        self.socket = workdir / "api.sock"
        self.log_path = workdir / "daemon.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"unix:{self.socket}"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cached",
            "--node-id",
            "proc-node",
            "--cache-dir",
            str(self.cache_dir),
            "--api-listen",
            self.api,
            "--peer-listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--hf-endpoint",
            "http://127.0.0.1:9",
            *(arg for root in self.file_roots for arg in ("--allow-file-root", str(root))),
            *self.extra,
        ]

    def start(self, timeout_s: float = 20.0) -> DaemonProcess:
        self.socket.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, env=env, cwd=REPO)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if self.socket.exists() and self.cachectl("status", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not become ready:\n{self.log_path.read_text()}")

    def cachectl(self, *args: str, check: bool = True, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        r = subprocess.run(
            [sys.executable, "-m", "cached.cli", "--api", self.api, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"cachectl {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
