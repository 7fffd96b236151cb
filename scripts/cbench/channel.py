"""The channel between the driver and a role process: the role prints JSON lines on stdout
(``emit``), the driver writes ``go`` / ``quit`` lines to its stdin (``Control``). The driver side of
it lives in ``processes``."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any


def emit(obj: dict[str, Any]) -> None:
    """Roles talk to the driver in JSON lines on stdout."""
    print(json.dumps(obj), flush=True)


class Control:
    """What the driver said on stdin: ``go`` sets ``go``; ``quit`` (or stdin closing) sets ``quit``."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.quit = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            if line.strip() == "go":
                self.go.set()
            elif line.strip() == "quit":
                break
        self.quit.set()

    def wait_go(self, deadline: float) -> bool:
        """Wait for ``go`` (checked every 0.1 s); False when told to quit or past ``deadline``."""
        while not self.go.wait(0.1):
            if self.quit.is_set() or time.monotonic() > deadline:
                return False
        return True
