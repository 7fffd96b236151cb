"""Run the real Hugging Face client (huggingface_hub, transformers) in a subprocess.

``run_client(code, env, version)`` runs ``code`` with ``PRELUDE`` in front of it and returns the JSON
document the code printed last (``emit(...)``). Version ``"2"`` is the project venv (huggingface_hub
2.x + transformers 5.x); ``"0.36"`` is a separate venv, ``<repo>/.venv-hf036``, made on first use with
the pair that transformers 4.x launchers run (huggingface_hub 0.36.2, transformers 4.57.6); a test
that needs it is skipped, with pip's reason, if pip cannot install it.

The client never sees the developer's Hugging Face setup: ``HF_HOME`` is a fresh directory (no stored
token, no agent file), every inherited ``HF_*``/``TRANSFORMERS_*`` variable is dropped, ``HF_TOKEN``
is set only if the test passes one, telemetry is off, and ``HF_ENDPOINT`` must be on 127.0.0.1
(unset, it points at a closed loopback port), so no test can reach huggingface.co.

Subprocesses are started with asyncio so the hub and daemon in the test's loop keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_036 = REPO / ".venv-hf036"
PINS_036 = ("huggingface_hub==0.36.2", "transformers==4.57.6")
VERSIONS = ("2", "0.36")
CLOSED_ENDPOINT = "http://127.0.0.1:9"  # discard port: refused at once
INSTALL_TIMEOUT_S = 600.0

_DROP_PREFIXES = (
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "PYTORCH_TRANSFORMERS_",
    "PYTORCH_PRETRAINED_",
    "XDG_CACHE_HOME",
)
_DROP = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "TORCH_HOME"}

# Put in front of every client script: ``emit`` prints the result, ``attempt`` turns an exception
# into data (its class, the class names it derives from and the message) so one script can check
# several calls and still print one JSON summary.
PRELUDE = """
import hashlib as _hashlib, json as _json, os as _os, sys as _sys

def emit(obj):
    _sys.stdout.write("\\n" + _json.dumps(obj) + "\\n")
    _sys.stdout.flush()

def sha256_of(path):
    with open(path, "rb") as f:
        return _hashlib.sha256(f.read()).hexdigest()

def attempt(fn, *args, **kwargs):
    try:
        return {"ok": fn(*args, **kwargs)}
    except Exception as e:
        return {"error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "message": str(e)[:2000]}
"""


class ClientFailed(AssertionError):
    pass


def client_env(env: Mapping[str, str], hf_home: str) -> dict[str, str]:
    """The process environment for a client: the test's ``env`` on a scrubbed copy of ours."""
    base = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(_DROP_PREFIXES)}
    base.update(
        HF_HOME=hf_home,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        HF_ENDPOINT=CLOSED_ENDPOINT,
    )
    base.update(env)
    if "HF_TOKEN" in env:
        base.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)  # a token the test passes on purpose is sent
    endpoint = urlsplit(base["HF_ENDPOINT"])
    if endpoint.scheme != "http" or endpoint.hostname != "127.0.0.1":
        raise ValueError(f"HF_ENDPOINT must be an http://127.0.0.1 URL in tests, not {base['HF_ENDPOINT']!r}")
    return base


async def run_client(code: str, env: Mapping[str, str], version: str = "2", *, timeout_s: float = 90.0) -> Any:
    """Run ``code`` under the real client of ``version`` and return what it ``emit``-ted last."""
    python = await client_python(version)
    hf_home = env.get("HF_HOME") or await asyncio.to_thread(tempfile.mkdtemp, prefix="hf-home-")
    try:
        proc = await asyncio.create_subprocess_exec(
            python,
            "-c",
            PRELUDE + "\n" + code,
            env=client_env(env, hf_home),
            cwd=hf_home,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
    finally:
        if "HF_HOME" not in env:
            await asyncio.to_thread(shutil.rmtree, hf_home, True)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    lines = [line for line in stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise ClientFailed(
            f"huggingface_hub {version} client exited {proc.returncode}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-6000:]}"
        )
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise ClientFailed(
            f"client's last line is not JSON: {lines[-1][:500]!r}\n--- stderr\n{stderr[-4000:]}"
        ) from None


# --- interpreters -------------------------------------------------------------------------------

_skip_036: str | None = None


async def client_python(version: str) -> str:
    if version == "2":
        return sys.executable
    if version == "0.36":
        return await _venv_036()
    raise ValueError(f"unknown client version {version!r}; use one of {VERSIONS}")


async def _venv_036() -> str:
    """``<repo>/.venv-hf036/bin/python``, made once (a marker says it is complete; a lock lets
    parallel test processes share the work)."""
    if _skip_036 is not None:
        pytest.skip(_skip_036)
    python = VENV_036 / "bin" / "python"
    marker = VENV_036 / ".cached-test-ready"
    want = "\n".join(PINS_036)
    if _read(marker) == want:
        return str(python)
    VENV_036.mkdir(exist_ok=True)
    # The venv is a build product: keep it out of git without touching the project's .gitignore.
    (VENV_036 / ".gitignore").write_text("*\n")
    lock = await asyncio.to_thread(os.open, VENV_036 / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        if _read(marker) == want:
            return str(python)
        if not python.exists():
            await _run_or_skip([sys.executable, "-m", "venv", str(VENV_036)], "python -m venv")
        await _run_or_skip(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS_036],
            "pip install " + " ".join(PINS_036),
        )
        await _run_or_skip([str(python), "-c", "import huggingface_hub, transformers"], "import check")
        await asyncio.to_thread(marker.write_text, want)
        return str(python)
    finally:
        os.close(lock)  # closing the descriptor drops the flock


async def _run_or_skip(argv: list[str], what: str) -> None:
    global _skip_036
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), INSTALL_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        out = b"timed out"
    if proc.returncode != 0:
        tail = "\n".join(line for line in out.decode(errors="replace").splitlines() if "is ignored" not in line)[-1500:]
        _skip_036 = f"cannot set up the huggingface_hub 0.36 client venv ({what} failed): {tail}"
        pytest.skip(_skip_036)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# --- the repo most tests use --------------------------------------------------------------------

TINY = "acme/tiny-model"


def tiny_model_files(weights_size: int = 300_000, seed: int = 1) -> dict[str, bytes]:
    """A loadable config (transformers' gpt2), an LFS weights file and a file in a sub-folder."""
    from tests.support.hub import random_bytes

    config = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 128}
    return {
        "config.json": json.dumps(config, indent=2).encode() + b"\n",
        "model.safetensors": random_bytes(weights_size, seed=seed),
        "nested/notes.txt": b"hello from the hub double\n",
    }
