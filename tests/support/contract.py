"""Names fixed by CONTRACT.md that several tests check: one copy, in the contract's order."""

from __future__ import annotations

# Every model object has at least these keys (CONTRACT.md, "A model object has at least").
MODEL_FIELDS = (
    "ref",
    "state",
    "bytes_total",
    "bytes_done",
    "path",
    "hf_path",
    "manifest",
    "pinned",
    "leases",
    "error",
    "sources",
)
