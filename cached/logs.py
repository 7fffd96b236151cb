"""Logging set-up for the daemon: one handler on stderr, as text, JSON lines or journal lines.

Under systemd (``$JOURNAL_STREAM`` set) each line carries its syslog priority as a ``<N>`` prefix
so ``journalctl -p`` filters; the journal adds its own timestamp. Components only ever call
``logging.getLogger(__name__)``; this module is called once, by the daemon's entry point.
"""

from __future__ import annotations

import json
import logging
import os
import sys


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
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
