"""``cachectl`` as operators and scripts use it: exit codes, ``--json`` documents, ``--api`` forms.

One daemon (a ``python -m cached`` subprocess on a unix socket) serves the whole module; each test
works on refs of its own so the tests stay independent. Every ``cachectl`` is a real subprocess
run without blocking the event loop (the HTTP origin of the 404 test lives in that loop).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.contract import MODEL_FIELDS
from tests.support.hub import Hub
from tests.support.node import ADMIN_TOKEN_FILE, REPO, TEST_FILE_ROOT, DaemonProcess
from tests.support.origin import Origin, write_random_file

pytestmark = pytest.mark.system

MODEL_KEYS = set(MODEL_FIELDS)


# --- helpers --------------------------------------------------------------------------------------


async def cachectl(
    *args: str, api: str | None, env: dict[str, str] | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``cachectl`` (stdin not a tty, like a script) without blocking the loop."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO)}
    full_env.pop("CACHED_API", None)
    full_env.update(env or {})
    argv = [sys.executable, "-m", "cached.cli", *(["--api", api] if api is not None else []), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


def one_json(r: subprocess.CompletedProcess[str]) -> Any:
    """stdout must be exactly one JSON document (json.loads rejects trailing data)."""
    assert r.stdout.strip(), f"no JSON on stdout (exit {r.returncode}, stderr {r.stderr!r})"
    return json.loads(r.stdout)


def make_model_dir(root: Path, name: str, size: int = 300 * 1024 + 7) -> Path:
    d = root / name
    write_random_file(d / "weights.bin", size, seed=zlib.crc32(name.encode()))
    (d / "config.json").write_text('{"model_type": "test"}\n')
    return d


def same_tree(src: Path, view: Path) -> bool:
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    viewed = sorted(p.relative_to(view) for p in view.rglob("*") if p.is_file())
    return files == viewed and all((src / f).read_bytes() == (view / f).read_bytes() for f in files)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpDaemon:
    """``python -m cached`` with its API on 127.0.0.1:0; the real port is read from its log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout_s: float = 20.0) -> TcpDaemon:
        argv = [
            sys.executable,
            "-m",
            "cached",
            "--node-id",
            "tcp-node",
            "--cache-dir",
            str(self.workdir / "cache"),
            "--api-listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--hf-endpoint",
            "http://127.0.0.1:9",
            "--admin-token-file",
            str(ADMIN_TOKEN_FILE),
            "--allow-file-root",
            str(TEST_FILE_ROOT),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            m = re.search(r"api=http://(127\.0\.0\.1:\d+)", self.log_path.read_text())
            if m:
                self.address = m.group(1)
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start listening:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- fixtures -------------------------------------------------------------------------------------
# Module-scoped fixtures are set up before the per-test loop guard starts, so their blocking
# start-up (subprocess polling) does not count as blocking the test's event loop.


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("cli-node"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-sources")


@pytest.fixture(scope="module")
def ready_model(node: DaemonProcess, sources: Path) -> tuple[str, Path]:
    """A model made ready once for the read-only checks: (ref, source dir)."""
    src = make_model_dir(sources, "shared-model")
    ref = f"file://{src}"
    node.cachectl("prefetch", ref, "--wait")
    return ref, src


@pytest.fixture(scope="module")
def tcp_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpDaemon]:
    d = TcpDaemon(tmp_path_factory.mktemp("cli-tcp-node"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


# --- success paths --------------------------------------------------------------------------------


async def test_prefetch_wait_prints_the_path_of_an_identical_view(node: DaemonProcess, sources: Path) -> None:
    src = await asyncio.to_thread(make_model_dir, sources, "wait-model")
    ref = f"file://{src}"
    r = await cachectl("prefetch", ref, "--wait", api=node.api)
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip()
    assert "\n" not in printed, f"not a tty: expected only the path, got {r.stdout!r}"
    view = Path(printed)
    assert view.is_dir() and view.is_relative_to(node.cache_dir)
    assert await asyncio.to_thread(same_tree, src, view)

    again = await cachectl("path", ref, api=node.api)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == printed


async def test_status_without_ref_prints_the_node_summary(node: DaemonProcess) -> None:
    human = await cachectl("status", api=node.api)
    assert human.returncode == 0, human.stderr
    assert "proc-node" in human.stdout
    assert str(node.cache_dir) in human.stdout

    as_json = one_json(await cachectl("--json", "status", api=node.api))
    assert isinstance(as_json, dict)
    assert as_json["node_id"] == "proc-node"
    assert as_json["cache_dir"] == str(node.cache_dir)


async def test_status_of_an_unknown_model_is_absent_and_exits_0(node: DaemonProcess, sources: Path) -> None:
    r = await cachectl("status", f"file://{sources}/never-fetched", "--json", api=node.api)
    assert r.returncode == 0, r.stderr
    model = one_json(r)
    assert model["state"] == "absent"
    assert MODEL_KEYS <= model.keys()


def check_model(doc: Any, ref: str, **expect: Any) -> None:
    assert isinstance(doc, dict) and MODEL_KEYS <= doc.keys(), doc
    assert doc["ref"] == ref, doc
    for k, v in expect.items():
        assert doc[k] == v, (k, doc)


def check_node(doc: Any, ref: str, cache: Path) -> None:
    assert isinstance(doc, dict) and doc["node_id"] == "proc-node", doc


def check_ls(doc: Any, ref: str, cache: Path) -> None:
    assert isinstance(doc, list), doc
    assert any(isinstance(m, dict) and m.get("ref") == ref and MODEL_KEYS <= m.keys() for m in doc), doc


def check_path(doc: Any, ref: str, cache: Path) -> None:
    assert isinstance(doc, dict) and set(doc) == {"ref", "path", "hf_path"}, doc
    assert doc["ref"] == ref and Path(doc["path"]).is_dir() and Path(doc["path"]).is_relative_to(cache), doc


def check_verify(doc: Any, ref: str, cache: Path) -> None:
    assert isinstance(doc, dict) and {"checked_bytes", "bad_pieces"} <= doc.keys(), doc
    assert doc["checked_bytes"] > 300 * 1024 and doc["bad_pieces"] == 0, doc


def check_gc(doc: Any, ref: str, cache: Path) -> None:
    assert isinstance(doc, dict) and {"freed_bytes", "evicted"} <= doc.keys(), doc
    assert isinstance(doc["freed_bytes"], int) and isinstance(doc["evicted"], list), doc


def check_peers(doc: Any, ref: str, cache: Path) -> None:
    assert isinstance(doc, list), doc
    assert all({"node_id", "address", "state"} <= p.keys() for p in doc), doc


def model_is(**expect: Any) -> Callable[[Any, str, Path], None]:
    return lambda doc, ref, cache: check_model(doc, ref, **expect)


# argv (REF is replaced by the ready model's ref; --json goes before or after the command) and the
# check of the one document it prints.
JSON_CASES: dict[str, tuple[list[str], Callable[[Any, str, Path], None]]] = {
    "status-node": (["--json", "status"], check_node),
    "status-ref": (["status", "REF", "--json"], model_is(state="ready")),
    "ls": (["--json", "ls"], check_ls),
    "prefetch": (["prefetch", "REF", "--json"], model_is()),
    "prefetch-wait": (["--json", "prefetch", "REF", "--wait"], model_is(state="ready")),
    "path": (["path", "REF", "--json"], check_path),
    "pin": (["--json", "pin", "REF"], model_is(pinned=True)),
    "unpin": (["unpin", "REF", "--json"], model_is(pinned=False)),
    "verify-all": (["--json", "verify"], check_verify),
    "verify-ref": (["verify", "REF", "--json"], check_verify),
    "gc": (["gc", "--json"], check_gc),
    "peers": (["--json", "peers"], check_peers),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
async def test_json_prints_exactly_one_document(case: str, node: DaemonProcess, ready_model: tuple[str, Path]) -> None:
    ref, _ = ready_model
    argv, check = JSON_CASES[case]
    r = await cachectl(*[ref if a == "REF" else a for a in argv], api=node.api)
    assert r.returncode == 0, r.stderr
    check(one_json(r), ref, node.cache_dir)


async def test_evict_json_removes_the_model_and_its_view(node: DaemonProcess, sources: Path) -> None:
    src = await asyncio.to_thread(make_model_dir, sources, "evict-model")
    ref = f"file://{src}"
    view = Path((await cachectl("prefetch", ref, "--wait", api=node.api)).stdout.strip())
    assert view.is_dir()

    r = await cachectl("evict", ref, "--json", api=node.api)
    assert r.returncode == 0, f"evict of an unpinned ready model failed: {r.stderr}"
    check_model(one_json(r), ref, state="absent")
    assert not view.exists()
    assert (await cachectl("path", ref, api=node.api)).returncode == 1


async def test_evict_force_removes_a_pinned_model(node: DaemonProcess, sources: Path) -> None:
    src = await asyncio.to_thread(make_model_dir, sources, "force-evict-model")
    ref = f"file://{src}"
    assert (await cachectl("prefetch", ref, "--wait", api=node.api)).returncode == 0
    assert (await cachectl("pin", ref, api=node.api)).returncode == 0

    r = await cachectl("--json", "evict", ref, "--force", api=node.api)
    assert r.returncode == 0, f"evict --force of a pinned model failed: {r.stderr}"
    check_model(one_json(r), ref, state="absent", pinned=False)


# --- exit 1: the operation failed -----------------------------------------------------------------


async def test_path_of_an_absent_model_exits_1(node: DaemonProcess, sources: Path) -> None:
    r = await cachectl("path", f"file://{sources}/not-here", api=node.api)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "not ready" in r.stderr


async def test_prefetch_wait_of_a_404_url_exits_1(node: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    async with Origin(tmp_path / "origin") as origin:
        ref = origin.file_url("missing.gguf")
        r = await cachectl("prefetch", ref, "--wait", api=node.api)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert r.stdout == ""
        assert "404" in r.stderr or "not found" in r.stderr.lower(), r.stderr

        status = one_json(await cachectl("status", ref, "--json", api=node.api))
        assert status["state"] == "failed" and status["error"], status

        # With --json a failure still leaves stdout parseable: nothing, or one document.
        j = await cachectl("--json", "prefetch", ref, "--wait", api=node.api)
        assert j.returncode == 1
        if j.stdout.strip():
            one_json(j)


async def test_evict_of_a_pinned_model_without_force_exits_1(node: DaemonProcess, sources: Path) -> None:
    src = await asyncio.to_thread(make_model_dir, sources, "pinned-model")
    ref = f"file://{src}"
    view = Path((await cachectl("prefetch", ref, "--wait", api=node.api)).stdout.strip())
    assert (await cachectl("pin", ref, api=node.api)).returncode == 0

    r = await cachectl("evict", ref, api=node.api)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "pinned" in r.stderr
    model = one_json(await cachectl("status", ref, "--json", api=node.api))
    assert model["state"] == "ready" and model["pinned"] is True
    assert await asyncio.to_thread(same_tree, src, view)


# --- exit 2: usage --------------------------------------------------------------------------------

USAGE_CASES = {
    "unknown-command": ["frobnicate"],
    "missing-ref-path": ["path"],
    "missing-ref-prefetch": ["prefetch"],
    "hf-without-repo": ["path", "hf://"],
    "file-dotdot": ["prefetch", "file:///../x"],
    "status-bad-ref": ["status", "hf://"],
    "unknown-scheme": ["prefetch", "ftp://example.invalid/m.gguf"],
    "no-scheme": ["pin", "just-a-name"],
    "bad-priority": ["prefetch", "hf://org/name", "--priority", "urgent"],
    "unknown-option": ["status", "--frobnicate"],
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
async def test_usage_errors_exit_2(case: str, node: DaemonProcess) -> None:
    r = await cachectl(*USAGE_CASES[case], api=node.api)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip(), "a usage error says what is wrong"


@pytest.mark.parametrize("ref", ["hf://", "file:///../x", "file:///a/./b"])
async def test_a_malformed_ref_is_rejected_before_any_io(ref: str, tmp_path: Path) -> None:
    r = await cachectl("prefetch", ref, "--wait", api=f"unix:{tmp_path / 'no-daemon.sock'}")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "invalid ref" in r.stderr


async def test_an_api_address_that_does_not_parse_is_a_usage_error() -> None:
    r = await cachectl("status", api="no-port-here")
    assert r.returncode == 2, (r.returncode, r.stderr)


# --- exit 3: daemon unreachable -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "command"),
    [
        ("unix", ["status"]),
        ("host-port", ["status"]),
        ("http", ["status"]),
        ("unix", ["prefetch", "hf://org/name", "--wait"]),
        ("host-port", ["ls", "--json"]),
    ],
)
async def test_unreachable_daemon_exits_3(form: str, command: list[str], tmp_path: Path) -> None:
    port = closed_port()
    api = {
        "unix": f"unix:{tmp_path / 'absent.sock'}",
        "host-port": f"127.0.0.1:{port}",
        "http": f"http://127.0.0.1:{port}",
    }[form]
    r = await cachectl(*command, api=api)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "cannot reach" in r.stderr


# --- --api and CACHED_API -------------------------------------------------------------------------


async def test_api_accepts_http_host_port_and_unix_forms(node: DaemonProcess, tcp_node: TcpDaemon) -> None:
    for api, node_id in (
        (f"http://{tcp_node.address}", "tcp-node"),
        (tcp_node.address, "tcp-node"),
        (node.api, "proc-node"),
    ):
        r = await cachectl("--json", "status", api=api)
        assert r.returncode == 0, (api, r.stderr)
        assert one_json(r)["node_id"] == node_id, api


async def test_cached_api_environment_variable_is_used(
    node: DaemonProcess, tcp_node: TcpDaemon, tmp_path: Path
) -> None:
    for env_api, node_id in (
        (node.api, "proc-node"),
        (tcp_node.address, "tcp-node"),
        (f"http://{tcp_node.address}", "tcp-node"),
    ):
        r = await cachectl("--json", "status", api=None, env={"CACHED_API": env_api})
        assert r.returncode == 0, (env_api, r.stderr)
        assert one_json(r)["node_id"] == node_id

    # --api wins over the environment.
    r = await cachectl("--json", "status", api=node.api, env={"CACHED_API": f"unix:{tmp_path / 'absent.sock'}"})
    assert r.returncode == 0, r.stderr
    assert one_json(r)["node_id"] == "proc-node"

    # And the environment really is consulted: a dead address there is "unreachable".
    r = await cachectl("status", api=None, env={"CACHED_API": f"unix:{tmp_path / 'absent.sock'}"})
    assert r.returncode == 3, (r.returncode, r.stderr)


# --- the admin token --------------------------------------------------------------------------------


async def test_admin_commands_over_tcp_need_the_admin_token(tcp_node: TcpDaemon, sources: Path, tmp_path: Path) -> None:
    """Over TCP nobody is an admin by identity: pin/gc/evict --force need the token, from
    --admin-token-file or $CACHED_ADMIN_TOKEN_FILE; without it cachectl exits 1 and says how."""
    src = make_model_dir(sources, "admin-model", size=50_000)
    ref = f"file://{src}"
    bare = {"CACHED_ADMIN_TOKEN_FILE": ""}
    r = await cachectl("prefetch", ref, "--wait", api=tcp_node.address, env=bare)
    assert r.returncode == 0, r.stderr  # prefetch stays open to every local caller

    r = await cachectl("pin", ref, api=tcp_node.address, env=bare)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "admin_required" in r.stderr and "--admin-token-file" in r.stderr, r.stderr
    r = await cachectl("gc", api=tcp_node.address, env=bare)
    assert r.returncode == 1 and "admin_required" in r.stderr, r.stderr

    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-admin-token-0123456789")
    r = await cachectl("--admin-token-file", str(wrong), "pin", ref, api=tcp_node.address, env=bare)
    assert r.returncode == 1 and "forbidden" in r.stderr, r.stderr
    r = await cachectl(
        "--admin-token-file", str(tmp_path / "missing.token"), "pin", ref, api=tcp_node.address, env=bare
    )
    assert r.returncode == 2 and "--admin-token-file" in r.stderr, r.stderr

    r = await cachectl(
        "--admin-token-file", str(ADMIN_TOKEN_FILE), "--json", "pin", ref, api=tcp_node.address, env=bare
    )
    assert r.returncode == 0 and one_json(r)["pinned"] is True, r.stderr
    r = await cachectl(
        "evict", ref, "--force", api=tcp_node.address, env={"CACHED_ADMIN_TOKEN_FILE": str(ADMIN_TOKEN_FILE)}
    )
    assert r.returncode == 0, r.stderr
    r = await cachectl("--json", "status", ref, api=tcp_node.address, env=bare)
    assert one_json(r)["state"] == "absent"


# --- issue 17: what a new user trips on -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "http"])
async def test_include_on_a_non_hf_ref_is_one_line_and_exit_2(kind: str, node: DaemonProcess, sources: Path) -> None:
    ref = f"file://{sources}/some-model" if kind == "file" else "http://127.0.0.1:9/m.gguf"
    r = await cachectl("prefetch", ref, "--include", "*.json", "--exclude", "*.bin", api=node.api)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "hf://" in r.stderr and "--include" in r.stderr, r.stderr


@pytest.mark.parametrize("addr", ["bogus:::", "http://:80", "http://127.0.0.1:7470/v1", "unix:", "host:port"])
async def test_a_malformed_api_address_is_named(addr: str) -> None:
    r = await cachectl("status", api=addr)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"--api {addr!r} " in r.stderr, r.stderr
    assert "not an API address" in r.stderr or "names no socket path" in r.stderr, r.stderr
    assert "/v1/node" not in r.stderr and "Traceback" not in r.stderr, r.stderr

    r = await cachectl("status", api=None, env={"CACHED_API": addr})
    assert r.returncode == 2 and "$CACHED_API" in r.stderr, r.stderr


async def test_version_of_cachectl_and_cached_is_the_package_version() -> None:
    from importlib.metadata import version

    r = await cachectl("--version", api=None)
    assert r.returncode == 0 and r.stdout.split() == ["cachectl", "(cached)", version("cached")], r
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cached",
        "--version",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and out.decode().split() == ["cached", version("cached")], err


@pytest.fixture(scope="module")
def long_refs(node: DaemonProcess, sources: Path) -> list[str]:
    """Four ready models whose refs are longer than a terminal and differ only at the end."""
    base = sources / ("a-rather-long-directory-name-for-models-" * 2).rstrip("-")
    refs = []
    for tail in ("variant-q4", "variant-q5", "variant-q8", "variant-f16"):
        src = make_model_dir(base, f"llama-3-70b-instruct-{tail}", size=10_000)
        refs.append(f"file://{src}")
        node.cachectl("prefetch", refs[-1], "--wait")
    return refs


async def test_ls_in_a_pipe_prints_whole_refs(node: DaemonProcess, long_refs: list[str]) -> None:
    r = await cachectl("ls", api=node.api, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["REF", "STATE", "SIZE", "DONE", "PIN", "LEASES"]
    for ref in long_refs:
        assert len(ref) > 80
        assert [line.split()[0] for line in lines if line.startswith(ref)] == [ref], r.stdout
    assert "…" not in r.stdout


async def test_ls_on_a_terminal_keeps_the_distinguishing_tail(node: DaemonProcess, long_refs: list[str]) -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "90", "TERM": "xterm"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cached.cli", "--api", node.api, "ls", stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the child closed its end
                return
            if not chunk:
                return
            chunks.extend(chunk)

    await asyncio.wait_for(asyncio.gather(proc.wait(), asyncio.to_thread(drain)), 60)
    os.close(master)
    assert proc.returncode == 0
    lines = chunks.decode().replace("\r", "").splitlines()
    assert all(len(line) <= 90 for line in lines), lines
    for ref in long_refs:
        tail = ref.rsplit("-", 1)[1]  # q4, q5, q8, f16
        shown = [line.split()[0] for line in lines if line.startswith("file://…") and f"-variant-{tail} " in line + " "]
        assert len(shown) == 1 and ref.endswith(shown[0].removeprefix("file://…")), (ref, lines)


async def test_plain_status_shows_replicas_and_binary_units(tmp_path: Path) -> None:
    """A node in a cluster (of one) with a catalog entry for an hf ref: plain `status` shows the
    replica plan `--json` has, and sizes in the binary units of the progress bar."""
    (tmp_path / "d").mkdir()
    token = tmp_path / "cluster.token"
    token.write_text("cluster-token-for-the-replicas-test-0123456789")
    token.chmod(0o600)
    async with Hub() as hub:
        hub.add_repo("acme/replicated", {"model.safetensors": b"\x01" * (1536 * 1024 + 5), "config.json": b"{}"})
        daemon = DaemonProcess(tmp_path / "d", "--hf-endpoint", hub.url, "--cluster-token-file", str(token))
        await asyncio.to_thread(daemon.start)
        try:
            ref = "hf://acme/replicated"
            r = await cachectl("prefetch", ref, "--wait", api=daemon.api)
            assert r.returncode == 0, r.stderr
            r = await cachectl("replicate", ref, "--replicas", "1", api=daemon.api)
            assert r.returncode == 0, r.stderr
            doc = one_json(await cachectl("--json", "status", ref, api=daemon.api))
            human = await cachectl("status", ref, api=daemon.api)
        finally:
            await asyncio.to_thread(daemon.stop)
    assert human.returncode == 0, human.stderr
    replicas = doc["replicas"]
    line = next(x for x in human.stdout.splitlines() if x.startswith("replicas:"))
    assert f"{replicas['target']} wanted" in line, line
    assert replicas["owners"] == ["proc-node"] and "owners proc-node" in line, (line, replicas)
    assert "progress: 1.5 MiB / 1.5 MiB" in human.stdout, human.stdout


async def test_ls_all_is_accepted_and_sent_as_all_1(node: DaemonProcess, ready_model: tuple[str, Path]) -> None:
    r = await cachectl("ls", "--all", "--json", api=node.api)
    assert r.returncode == 0, r.stderr
    assert any(m["ref"] == ready_model[0] for m in one_json(r))

    # What goes over the wire: a loopback server in the daemon's place records the query.
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        addr = "127.0.0.1:%d" % runner.addresses[0][1]
        assert (await cachectl("ls", "--all", api=addr)).returncode == 0
        assert (await cachectl("ls", api=addr)).returncode == 0
    finally:
        await runner.cleanup()
    assert seen == [{"all": "1"}, {}]
