"""Bit rot on demand: change bytes of a stored (read-only) file in place, as a failing disk would."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte with ``mask``; the file's mode (0440 for blobs) is restored afterwards."""
    mode = stat.S_IMODE(path.stat().st_mode)
    os.chmod(path, 0o644)
    try:
        with open(path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ mask]))
    finally:
        os.chmod(path, mode)
