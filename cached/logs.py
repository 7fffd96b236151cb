"""Logging set-up for the daemon: one handler on stderr, as text, JSON lines or journal lines.

Under systemd (``$JOURNAL_STREAM`` set) each line carries its syslog priority as a ``<N>`` prefix
so ``journalctl -p`` filters; the journal adds its own timestamp. Components only ever call
``logging.getLogger(__name__)``; this module is called once, by the daemon's entry point.

Messages are written ``what happened key=value key=value`` (STYLE.md). As JSON, the text before the
first ``key=`` is ``msg`` and each pair is a field of its own (integers as numbers), so a log
pipeline can filter on ``ref`` or ``error`` without parsing ``msg``. A value runs to the next
`` key=``; a key that would overwrite ``time``/``level``/``logger``/``msg``/``exc`` gets a ``_`` suffix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

_KEY = re.compile(r"(?:^|(?<=\s))([a-z][a-z0-9_]*)=")
_INT = re.compile(r"^-?[0-9]{1,18}$")
_RESERVED = frozenset({"time", "level", "logger", "msg", "exc"})


def split_context(message: str) -> tuple[str, dict[str, Any]]:
    """``"model ready ref=x bytes=3"`` -> ``("model ready", {"ref": "x", "bytes": 3})``."""
    keys = list(_KEY.finditer(message))
    if not keys:
        return message, {}
    fields: dict[str, Any] = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(message)
        value = message[m.end() : end].rstrip()
        name = m.group(1)
        while name in _RESERVED or name in fields:
            name += "_"
        fields[name] = int(value) if _INT.match(value) else value
    return message[: keys[0].start()].rstrip(), fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text, fields = split_context(record.getMessage())
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": text,
            **fields,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (sd-daemon(3)) so ``journalctl -p`` filters."""

    def format(self, record: logging.LogRecord) -> str:
        n = record.levelno
        prio = (
            2
            if n >= logging.CRITICAL
            else 3
            if n >= logging.ERROR
            else 4
            if n >= logging.WARNING
            else 6
            if n >= logging.INFO
            else 7
        )
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # The journal adds its own timestamp; it reads the <N> prefix as the priority.
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """SIGHUP: a new log.level for every logger."""
    logging.getLogger().setLevel(level.upper())
