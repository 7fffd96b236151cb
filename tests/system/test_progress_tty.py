"""``cachectl prefetch --wait`` on a terminal: a progress bar on stderr, only the path on stdout."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.node import REPO, DaemonProcess
from tests.support.origin import Origin, write_random_file

pytestmark = pytest.mark.system


async def test_progress_bar_goes_to_the_terminal_and_the_path_to_stdout(tmp_path: Path) -> None:
    size = 6 * 1024 * 1024
    src = write_random_file(tmp_path / "o" / "m.bin", size)
    daemon = DaemonProcess(tmp_path, "--piece-size", "256K")
    async with Origin(tmp_path / "o") as origin:
        origin.faults.rate_bps = 3 * 1024 * 1024  # ~2 s, so the bar has something to draw
        await asyncio.to_thread(daemon.start)
        try:
            master, slave = pty.openpty()
            env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120", "TERM": "xterm"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cached.cli",
                "--api",
                daemon.api,
                "prefetch",
                "--wait",
                origin.file_url("m.bin"),
                stdout=subprocess.PIPE,
                stderr=slave,
                env=env,
            )
            os.close(slave)
            terminal = bytearray()

            def drain() -> None:
                while True:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # EIO once the child closed its end
                        return
                    if not chunk:
                        return
                    terminal.extend(chunk)

            reader = asyncio.create_task(asyncio.to_thread(drain))
            stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
            await asyncio.wait_for(reader, 10)
            os.close(master)
        finally:
            await asyncio.to_thread(daemon.stop)
    assert proc.returncode == 0
    path = stdout.decode().strip()
    assert "\n" not in path and "\x1b" not in path, f"stdout must hold only the path, got {stdout!r}"
    assert (Path(path) / "m.bin").read_bytes() == src.read_bytes()
    drawn = terminal.decode(errors="replace")
    assert "m.bin" in drawn and "MiB" in drawn and " MB" not in drawn, (
        f"no binary-unit progress bar drawn on the terminal: {drawn[:300]!r}"
    )
