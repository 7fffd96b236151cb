"""HTTP byte ranges: the one parser of ``Range`` (what a client asks of us) and ``Content-Range``
(what a server answered us) for the whole package.

``parse_range`` accepts a single ``bytes=first-last``, ``bytes=first-`` or suffix ``bytes=-n``
(surrounding blanks ignored); anything else -- another unit, several ranges, garbage -- is "no
usable Range" and the caller decides (the hub protocol serves the whole file, the peer API asks
for a range). ``RangeRequest.span(size)`` resolves it against a file: None means not satisfiable
(416 with ``Content-Range: bytes */size``). A number longer than 18 digits is beyond any file, so
a range naming one is never satisfiable, whatever its other end.

Pure functions and values; no I/O, no HTTP framework. The choice of status and body stays with
the API that answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_MAX_DIGITS = 18
BEYOND = 10**_MAX_DIGITS  # stands for a number too long to name an offset in any file


@dataclass(frozen=True, slots=True, kw_only=True)
class ByteSpan:
    """Bytes ``start``..``end`` (inclusive, as HTTP counts) of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeRequest:
    """One parsed ``Range`` header. ``first`` is None for a suffix range (then ``last`` is the
    suffix length); ``last`` is None for "to the end"."""

    first: int | None
    last: int | None

    @property
    def is_suffix(self) -> bool:
        return self.first is None

    def span(self, size: int) -> ByteSpan | None:
        """The bytes this names in a file of ``size`` bytes, or None if it names none of them."""
        if (self.first or 0) >= BEYOND or (self.last or 0) >= BEYOND:
            return None
        if self.first is None:
            assert self.last is not None
            start, end = max(0, size - self.last), size - 1
        else:
            start = self.first
            end = size - 1 if self.last is None else min(self.last, size - 1)
        if start > end or start >= size:
            return None
        return ByteSpan(start=start, end=end, size=size)


def parse_range(value: str | None) -> RangeRequest | None:
    """A ``Range`` header value, or None when there is none this package serves."""
    m = _RANGE.match((value or "").strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    first, last = (_number(g) for g in m.groups())
    return RangeRequest(first=first, last=last)


def unsatisfiable(size: int) -> str:
    """The ``Content-Range`` of a 416 answer."""
    return f"bytes */{size}"


def content_range(headers: Mapping[str, str] | Message) -> tuple[int, int, int | None] | None:
    """(first, last, total or None for "*") of a Content-Range header, or None if malformed."""
    m = _CONTENT_RANGE.match(headers.get("Content-Range", "") or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


def _number(digits: str) -> int | None:
    if not digits:
        return None
    return BEYOND if len(digits) > _MAX_DIGITS else int(digits)
