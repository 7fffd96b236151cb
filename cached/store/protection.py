"""What eviction must spare besides pins, leases and refs being worked on: asked of a layer above.

The store knows nothing of the cluster; the cluster knows which copies it cannot spare. A
``Protector`` given to the store at construction answers for a canonical ref.
"""

from __future__ import annotations

from typing import Protocol


class Protector(Protocol):
    def protects(self, ref: str) -> bool:
        """True if the copy of ``ref`` on this node must not be evicted."""
        ...
