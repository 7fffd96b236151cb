"""``cachectl run REF -- CMD``: a real daemon, a real cachectl and a real child process.

The child (``CHILD``, a small Python program) writes the argv and environment it was started
with to a file, records a signal it receives and then dies of it, and otherwise waits until the
test creates its "go" file, then exits with the status it was given. The test reads the lease
from the daemon's API while the child runs, kills and restarts the daemon under it, and checks
cachectl's exit status. The transformers recipe of the README runs for real against a model
served by a loopback hub, offline: the child's HF_ENDPOINT is a closed port, so any attempt to
reach a hub would fail the load.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cached.api.client import ApiClient
from tests.support.hub import Hub
from tests.support.node import REPO, DaemonProcess
from tests.support.origin import Origin, write_random_file
from tests.support.wait import wait_until

pytestmark = pytest.mark.system

CHILD = r"""
import json, os, signal, sys, time
out, go, code = sys.argv[1], sys.argv[2], int(sys.argv[3])

def on_signal(sig, frame):
    with open(out + ".signal", "w") as f:
        f.write(str(sig))
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)

for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, on_signal)
seen = {"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith(("CACHED_", "HF_"))}}
with open(out + ".tmp", "w") as f:
    json.dump(seen, f)
os.replace(out + ".tmp", out)
deadline = time.monotonic() + 120
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(code)
"""


class Run:
    """One ``cachectl run`` subprocess and the files its child writes."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.dir = workdir / name
        self.dir.mkdir()
        self.out = self.dir / "seen.json"
        self.go = self.dir / "go"
        self.script = self.dir / "child.py"
        self.script.write_text(CHILD)
        self.proc: asyncio.subprocess.Process | None = None

    def child(self, code: int = 0, *extra: str) -> list[str]:
        return [sys.executable, str(self.script), str(self.out), str(self.go), str(code), *extra]

    async def start(self, api: str, ref: str, *options: str, command: list[str]) -> Run:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": "http://127.0.0.1:9"}
        env.pop("CACHED_API", None)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cached.cli",
            "--api",
            api,
            "run",
            ref,
            *options,
            "--",
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        return self

    async def seen(self) -> dict[str, Any]:
        """What the child saw, once it has started (or fail if cachectl exits first)."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None and not self.out.exists():
                raise AssertionError(f"cachectl exited {self.proc.returncode} before the child started")
            return self.out.exists()

        await wait_until(ready, timeout_s=60, what="the child to start")
        return json.loads(self.out.read_text())

    async def finish(self, timeout_s: float = 60.0) -> tuple[int, str, str]:
        assert self.proc is not None
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), timeout_s)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()


async def leases_of(api: str, ref: str) -> list[dict[str, Any]]:
    async with ApiClient(api) as client:
        model = await client.request("GET", "/v1/models/status", params={"ref": ref})
    return model["leases"]


async def all_leases(api: str) -> list[dict[str, Any]]:
    async with ApiClient(api) as client:
        return await client.request("GET", "/v1/leases")


def make_model(root: Path, name: str) -> Path:
    d = root / name
    write_random_file(d / "weights.bin", 200_000, seed=zlib.crc32(name.encode()))
    (d / "config.json").write_text('{"model_type": "test"}\n')
    return d


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("run-node"))
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def model_ref(node: DaemonProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A file:// model; `run` prefetches it itself the first time."""
    return f"file://{make_model(tmp_path_factory.mktemp('run-sources'), 'run-model')}"


# --- the child's view, the lease around it, its status ----------------------------------------------


async def test_the_child_sees_the_path_and_environment_under_a_lease_released_after(
    node: DaemonProcess, model_ref: str, tmp_path: Path
) -> None:
    run = Run(tmp_path, "env")
    await run.start(
        node.api, model_ref, "--holder", "engine@test", command=run.child(7, "--model={path}/config.json", "{path}")
    )
    seen = await run.seen()

    path = seen["env"]["CACHED_MODEL_PATH"]
    assert Path(path).is_relative_to(node.cache_dir) and (Path(path) / "weights.bin").is_file()
    assert seen["argv"][3:] == [f"--model={path}/config.json", path], "{path} is replaced in every argument"
    assert seen["env"]["CACHED_MODEL_REF"] == model_ref
    assert "HF_HUB_CACHE" not in seen["env"] and "HF_HUB_OFFLINE" not in seen["env"], "only hf refs get HF_*"

    leases = await leases_of(node.api, model_ref)
    assert [(lease["lease_id"], lease["holder"]) for lease in leases] == [
        (seen["env"]["CACHED_LEASE_ID"], "engine@test")
    ]

    run.go.touch()
    code, out, err = await run.finish()
    assert code == 7, err
    assert await leases_of(node.api, model_ref) == [], "the lease is released when the child exits"


async def test_a_short_ttl_is_outlived_by_a_longer_child(node: DaemonProcess, model_ref: str, tmp_path: Path) -> None:
    run = Run(tmp_path, "ttl")
    await run.start(node.api, model_ref, "--ttl", "2", command=run.child(0))
    seen = await run.seen()
    lease_id = seen["env"]["CACHED_LEASE_ID"]
    first = (await leases_of(node.api, model_ref))[0]
    assert first["lease_id"] == lease_id

    async def outlived() -> bool:
        # The lease is still listed (the daemon lists only unexpired leases) after its first TTL ran out.
        leases = await leases_of(node.api, model_ref)
        return time.time() > first["expires_at"] + 2 and [lease["lease_id"] for lease in leases] == [lease_id]

    await wait_until(outlived, timeout_s=30, interval_s=0.2, what="the lease to outlive its first TTL")
    assert run.proc is not None and run.proc.returncode is None

    run.go.touch()
    code, _, err = await run.finish()
    assert code == 0, err
    assert "cannot renew" not in err, err
    assert await leases_of(node.api, model_ref) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
async def test_signals_are_forwarded_and_the_status_is_128_plus_n(
    sig: signal.Signals, node: DaemonProcess, model_ref: str, tmp_path: Path
) -> None:
    run = Run(tmp_path, sig.name)
    await run.start(node.api, model_ref, command=run.child(0))
    await run.seen()
    assert await leases_of(node.api, model_ref)
    assert run.proc is not None
    run.proc.send_signal(sig)  # to cachectl, not to the child

    code, _, err = await run.finish()
    assert code == 128 + sig, (code, err)
    assert Path(f"{run.out}.signal").read_text() == str(int(sig)), "the child received the signal"
    assert await leases_of(node.api, model_ref) == []


# --- nothing starts when the model cannot be made ready ---------------------------------------------


async def test_a_failing_prefetch_starts_nothing_and_exits_1(node: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir()
    async with Origin(tmp_path / "origin") as origin:
        run = Run(tmp_path, "fail")
        await run.start(node.api, origin.file_url("missing.gguf"), command=run.child(0))
        code, out, err = await run.finish()
    assert code == 1, (code, err)
    assert "404" in err or "not found" in err.lower(), err
    assert not run.out.exists(), "the command must not start"
    assert await all_leases(node.api) == []


@pytest.mark.parametrize(
    ("case", "expect"),
    [("unreachable", 3), ("no-command", 2), ("unknown-command", 2), ("bad-ttl", 2), ("bad-ref", 2)],
)
async def test_failures_before_the_child_exit_1_2_3_and_start_nothing(
    case: str, expect: int, node: DaemonProcess, model_ref: str, tmp_path: Path
) -> None:
    run = Run(tmp_path, case)
    api, ref, options, command = node.api, model_ref, [], run.child(0)
    if case == "unreachable":
        api = f"unix:{tmp_path / 'absent.sock'}"
    elif case == "no-command":
        command = []
    elif case == "unknown-command":
        command = [str(tmp_path / "no-such-engine"), "serve"]
    elif case == "bad-ttl":
        options = ["--ttl", "0"]
    elif case == "bad-ref":
        ref = "hf://"
    await run.start(api, ref, *options, command=command)
    code, out, err = await run.finish()
    assert code == expect, (code, err)
    assert err.strip() and "Traceback" not in err, err
    assert not run.out.exists()
    assert await all_leases(node.api) == []


# --- the daemon restarts under a running child ------------------------------------------------------


async def test_a_daemon_restart_keeps_the_lease_and_renewal_resumes(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d")
    (tmp_path / "d").mkdir()
    ref = f"file://{make_model(tmp_path, 'restart-model')}"
    await asyncio.to_thread(daemon.start)
    try:
        run = Run(tmp_path, "restart")
        # TTL 9: renewed every 3 s, so the daemon has several seconds to come back.
        await run.start(daemon.api, ref, "--ttl", "9", command=run.child(3))
        lease_id = (await run.seen())["env"]["CACHED_LEASE_ID"]
        assert [lease["lease_id"] for lease in await leases_of(daemon.api, ref)] == [lease_id]

        await asyncio.to_thread(daemon.kill, signal.SIGKILL)
        await asyncio.to_thread(daemon.start)
        after = await leases_of(daemon.api, ref)
        assert [lease["lease_id"] for lease in after] == [lease_id], "the lease survived the restart"

        async def renewed() -> bool:
            leases = await leases_of(daemon.api, ref)
            return (
                bool(leases) and leases[0]["lease_id"] == lease_id and leases[0]["expires_at"] > after[0]["expires_at"]
            )

        await wait_until(renewed, timeout_s=30, interval_s=0.2, what="a renewal after the restart")
        assert run.proc is not None and run.proc.returncode is None, "the child kept running"

        run.go.touch()
        code, _, err = await run.finish()
        assert code == 3, err
        assert await leases_of(daemon.api, ref) == []
    finally:
        await asyncio.to_thread(daemon.stop)


# --- hf refs: HF_HUB_CACHE, HF_HUB_OFFLINE, and the transformers recipe -----------------------------


def tiny_tokenizer_files() -> dict[str, bytes]:
    """A loadable config and a word-level fast tokenizer, a few hundred bytes each."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "from": 3, "the": 4, "node": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": len(vocab)}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]"}
    return {
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(tok_config).encode(),
    }


TRANSFORMERS_RECIPE = """
import json, os, sys
from transformers import AutoConfig, AutoTokenizer
config = AutoConfig.from_pretrained("acme/tiny-engine")
tok = AutoTokenizer.from_pretrained("acme/tiny-engine")
out = {"model_type": config.model_type, "n_layer": config.n_layer, "ids": tok("hello from the node")["input_ids"],
       "env": {k: os.environ[k] for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "CACHED_MODEL_PATH")}}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


async def test_the_transformers_recipe_loads_offline_from_the_view(tmp_path: Path) -> None:
    # Only looked up here (importing transformers would block this loop); the child imports it.
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("tokenizers") is None:
        pytest.skip("transformers and tokenizers (the test extra) are needed for the recipe")
    files = await asyncio.to_thread(tiny_tokenizer_files)
    async with Hub() as hub:
        hub.add_repo("acme/tiny-engine", files)
        daemon = DaemonProcess(tmp_path / "d", "--hf-endpoint", hub.url)
        (tmp_path / "d").mkdir()
        await asyncio.to_thread(daemon.start)
        try:
            run = Run(tmp_path, "transformers")
            out = tmp_path / "loaded.json"
            await run.start(
                daemon.api, "hf://acme/tiny-engine", command=[sys.executable, "-c", TRANSFORMERS_RECIPE, str(out)]
            )
            code, stdout, err = await run.finish(timeout_s=120)
            assert code == 0, err
            loaded = json.loads(out.read_text())
            leases_after = await all_leases(daemon.api)
        finally:
            await asyncio.to_thread(daemon.stop)
    assert loaded["model_type"] == "gpt2" and loaded["n_layer"] == 2
    assert loaded["ids"] == [2, 3, 4, 5]
    env = loaded["env"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert Path(env["HF_HUB_CACHE"]).is_relative_to(daemon.cache_dir)
    snapshot = Path(env["CACHED_MODEL_PATH"])
    assert snapshot.is_relative_to(Path(env["HF_HUB_CACHE"]) / "models--acme--tiny-engine" / "snapshots")
    assert (snapshot / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    assert leases_after == []
