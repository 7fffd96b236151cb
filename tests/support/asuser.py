"""One HTTP request to a local daemon from another user: a forked child that drops to ``uid:gid``.

The child has no supplementary groups, speaks HTTP/1.1 by hand on a raw socket (unix or loopback
TCP), sends its answer back over a pipe and leaves with ``os._exit`` (no Python cleanup runs in
it). Blocking: call it off the event loop (``asyncio.to_thread``) when the daemon runs in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

NOBODY = 65534


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer (see error)
    body: Any = None
    error: str = ""


def request_as(
    uid: int,
    gid: int,
    *,
    unix: str | None = None,
    tcp: tuple[str, int] | None = None,
    method: str = "GET",
    target: str = "/healthz",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Answer:
    payload = json.dumps(body).encode() if body is not None else b""
    head = {
        "Host": "localhost",
        "Connection": "close",
        **({"Content-Type": "application/json"} if body is not None else {}),
        **(headers or {}),
    }
    head["Content-Length"] = str(len(payload))
    raw = (
        f"{method} {target} HTTP/1.1\r\n".encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in head.items())
        + b"\r\n"
        + payload
    )
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = b"error"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(timeout_s)
            s.connect(unix if unix else tcp)
            s.sendall(raw)
            data = b""
            while len(data) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            out = data
        except OSError as e:
            out = f"OSERROR {e}".encode()
        finally:
            with contextlib.suppress(OSError):
                while out:
                    out = out[os.write(w, out) :]
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout_s + 5
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    if not data.startswith(b"HTTP/1."):
        return Answer(0, error=data[:300].decode(errors="replace"))
    head_b, _, rest = data.partition(b"\r\n\r\n")
    status = int(head_b.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_b.lower():
        rest = _dechunk(rest)
    try:
        return Answer(status, json.loads(rest) if rest else None)
    except ValueError:
        return Answer(status, rest.decode(errors="replace"))


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
