"""Cluster benchmark in network namespaces: the entry point of the ``cbench`` package next to this
file (see its docstring, or ``--help``). Run as root through ``scripts/bench-cluster``, which
builds the bench venv; the driver also starts its internal roles through this file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cbench, wherever this is started from

from cbench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
