"""``cachectl run``: a command (an inference engine) runs on a ready model under a lease.

Owns what happens once the model is ready: the lease (taken, renewed while the command runs,
released when it exits for any reason), the command's arguments (``{path}``) and environment, the
forwarding of SIGINT/SIGTERM/SIGHUP, and the exit status (the command's, 128+N when signal N
killed it). Prefetching, waiting and the exit codes of failures before anything starts are
``cached.cli``'s; the lease itself (durable, expiring) is the daemon's (``cached.store.claims``).

Renewal never harms the command: while the daemon is down or restarting, renewal is retried and
the command keeps running. The lease is a file in the daemon's store, so it survives a restart;
if it expired meanwhile (the daemon was away longer than the TTL) a new one is taken and the
command is told on stderr, since its ``CACHED_LEASE_ID`` is then stale.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cached.api.client import ApiClient, ApiError
from cached.errors import CachedError, DaemonUnreachable

PATH_PLACEHOLDER = "{path}"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Renew three times per TTL, so two renewals in a row can fail before the lease is at risk; at
# least once a minute so a long TTL still notices a lost lease.
RENEWALS_PER_TTL = 3
MAX_RENEW_INTERVAL_S = 60.0
MIN_RENEW_INTERVAL_S = 0.3
# While renewal fails (daemon restarting), try again this often.
RETRY_INTERVAL_S = 1.0
# Releasing at exit: a daemon that is restarting right then gets this long to come back.
RELEASE_ATTEMPTS = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """What the command is started with: its argv and the variables added to the environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]


def launch_for(command: Sequence[str], *, ref: str, lease: Mapping[str, Any]) -> Launch:
    """``{path}`` in each argument becomes the model's directory; the environment names the model,
    its directory and the lease, and for hf refs points the Hugging Face libraries at the node's
    hub-layout view, offline (``vllm serve org/name`` then loads without the network)."""
    path = str(lease["path"])
    env = {"CACHED_MODEL_PATH": path, "CACHED_MODEL_REF": ref, "CACHED_LEASE_ID": str(lease["lease_id"])}
    if ref.startswith("hf://") and lease.get("hf_path"):
        env.update(HF_HUB_CACHE=str(lease["hf_path"]), HF_HUB_OFFLINE="1")
    return Launch(argv=tuple(arg.replace(PATH_PLACEHOLDER, path) for arg in command), env=env)


def exit_status(returncode: int) -> int:
    """The shell's convention: the command's status, or 128+N when signal N killed it."""
    return returncode if returncode >= 0 else 128 - returncode


def renew_interval(ttl_s: float) -> float:
    return max(MIN_RENEW_INTERVAL_S, min(ttl_s / RENEWALS_PER_TTL, MAX_RENEW_INTERVAL_S))


def _warn(message: str) -> None:
    print(f"cachectl: {message}", file=sys.stderr, flush=True)


class LeaseKeeper:
    """Keeps one lease alive: renews it every ``renew_interval(ttl)``; retries while the daemon is
    unreachable; takes a new lease if the old one is gone. ``lease_id`` is the current one."""

    def __init__(self, api: ApiClient, *, ref: str, holder: str, ttl_s: float, lease_id: str) -> None:
        self._api = api
        self._ref = ref
        self._holder = holder
        self._ttl_s = ttl_s
        self.lease_id = lease_id
        self._failing = False

    async def run(self) -> None:
        interval = renew_interval(self._ttl_s)
        delay = interval
        while True:
            await asyncio.sleep(delay)
            delay = interval if await self._renew_once() else min(RETRY_INTERVAL_S, interval)

    async def _renew_once(self) -> bool:
        # A renewal that hangs must not outlast the lease it is renewing.
        timeout = max(1.0, renew_interval(self._ttl_s))
        try:
            try:
                await asyncio.wait_for(
                    self._api.request("POST", f"/v1/leases/{self.lease_id}/renew", body={"ttl_s": self._ttl_s}),
                    timeout,
                )
            except ApiError as e:
                if e.status != 404:
                    raise
                await asyncio.wait_for(self._replace(), timeout)
        except (CachedError, TimeoutError, OSError) as e:
            if not self._failing:
                _warn(f"cannot renew lease {self.lease_id} ({e}); retrying, the command keeps running")
            self._failing = True
            return False
        if self._failing:
            _warn(f"lease {self.lease_id} renewed again")
        self._failing = False
        return True

    async def _replace(self) -> None:
        lease = await self._api.request(
            "POST", "/v1/leases", body={"ref": self._ref, "holder": self._holder, "ttl_s": self._ttl_s}
        )
        _warn(
            f"lease {self.lease_id} was gone (expired while the daemon was away, or released); "
            f"holding {self._ref} under a new lease {lease['lease_id']}"
        )
        self.lease_id = str(lease["lease_id"])

    async def release(self) -> None:
        """Release the current lease; a daemon that is restarting right now gets a few seconds.
        If it does not come back the lease simply expires after its TTL."""
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                await asyncio.wait_for(self._api.request("DELETE", f"/v1/leases/{self.lease_id}"), 5.0)
                return
            except ApiError as e:
                if e.status == 404:
                    return  # already gone: nothing holds the model on our behalf
                _warn(f"cannot release lease {self.lease_id}: {e}")
                return
            except (DaemonUnreachable, TimeoutError, OSError) as e:
                if attempt == RELEASE_ATTEMPTS - 1:
                    _warn(f"cannot release lease {self.lease_id} ({e}); it expires within {self._ttl_s:g} s")
                    return
                await asyncio.sleep(RETRY_INTERVAL_S)


def _terminal_delivers_sigint() -> bool:
    """True when cachectl (and so the command, which stays in its process group) is the
    foreground job of a terminal: Ctrl-C then reaches the command directly, and forwarding it
    too would be a second Ctrl-C, which engines such as vLLM take as "stop now"."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


async def run_command(
    api: ApiClient, *, ref: str, holder: str, ttl_s: float, command: Sequence[str], lease: Mapping[str, Any]
) -> int:
    """Run ``command`` under ``lease`` (already taken) and return cachectl's exit status."""
    keeper = LeaseKeeper(api, ref=ref, holder=holder, ttl_s=ttl_s, lease_id=str(lease["lease_id"]))
    launch = launch_for(command, ref=ref, lease=lease)
    loop = asyncio.get_running_loop()
    terminal_sigint = _terminal_delivers_sigint()
    proc: asyncio.subprocess.Process | None = None
    pending: list[int] = []  # signals that came while the command was being started

    def forward(sig: int) -> None:
        if proc is None:
            pending.append(sig)
        elif proc.returncode is None and not (sig == signal.SIGINT and terminal_sigint):
            proc.send_signal(sig)

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    renewing: asyncio.Task[None] | None = None
    try:
        try:
            proc = await asyncio.create_subprocess_exec(*launch.argv, env={**os.environ, **launch.env})
        except OSError as e:
            _warn(f"cannot start {launch.argv[0]}: {e.strerror or e}")
            return 2
        for sig in pending:
            forward(sig)
        renewing = asyncio.create_task(keeper.run())
        return exit_status(await proc.wait())
    finally:
        if renewing is not None:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
        await keeper.release()
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
