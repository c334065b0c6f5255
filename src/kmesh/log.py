"""Structured logs: one logfmt line per event, quiet by default.

    time=2026-11-25T23:50:01Z level=info subsys=daemon msg="kmesh-daemon ready" listeners=2

Key/value pairs come from ``extra={"kv": {...}}``. journald keeps the lines as
they are when the daemon runs under systemd.
"""
from __future__ import annotations

import logging
import sys
import time

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}


def _quote(v) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' ="\n\t'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        subsys = record.name.split(".", 1)[1] if "." in record.name else record.name
        parts = [f"time={ts}", f"level={record.levelname.lower()}", f"subsys={subsys}",
                 f"msg={_quote(record.getMessage())}"]
        for k, v in (getattr(record, "kv", None) or {}).items():
            parts.append(f"{k}={_quote(v)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str = "info") -> None:
    root = logging.getLogger("kmesh")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(LogfmtFormatter())
        root.addHandler(h)
        root.propagate = False
    set_level(level)


def set_level(level: str) -> None:
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level '{level}'; use one of debug, info, warn, error")
    logging.getLogger("kmesh").setLevel(LEVELS[level.lower()])
    # libbpf's own chatter (object load details) only at debug.
    logging.getLogger("kmesh.libbpf").setLevel(
        logging.DEBUG if level.lower() == "debug" else logging.WARNING)
