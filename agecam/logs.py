"""Logging set-up: journald-friendly text or JSON lines, with secrets scrubbed from every record."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from typing import IO

from agecam.secrets import secret_free

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# syslog priorities journald reads from a "<N>" line prefix (SyslogLevelPrefix=yes, the default)
_SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

MAX_SECRETS = 256  # reloads with rotating secrets cannot grow the list without bound (the newest are kept)
_secrets: dict[str, None] = {}  # insertion-ordered set
_secrets_lock = threading.Lock()


def add_secret(value: str | None) -> None:
    """Register a literal (e.g. the preview token) that must never appear in a log line."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.pop(value, None)
            _secrets[value] = None
            while len(_secrets) > MAX_SECRETS:
                del _secrets[next(iter(_secrets))]


def scrub(text: str) -> str:
    """Text with URL credentials/tokens (via config.secret_free) and registered secrets replaced by ***."""
    text = _URL.sub(lambda m: secret_free(m.group(0)), text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        text = text.replace(s, "***")
    return text


class SecretFilter(logging.Filter):
    """Rewrites each record's message and exception text through scrub() before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw parts, still scrubbed
            message = f"{record.msg} {record.args}"
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


class JournalFormatter(logging.Formatter):
    """'<prio>logger [thread] message': journald adds the time and reads the priority prefix."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        body = f"{record.name} [{record.threadName}] {record.getMessage()}"
        if record.exc_text:
            body += "\n" + record.exc_text
        # journald splits on newlines; each continuation line keeps the priority
        return "\n".join(f"<{prio}>{line}" for line in body.splitlines() or [""])


class TextFormatter(logging.Formatter):
    """Timestamped text for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(threadName)s] %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (Unix s), level, logger, thread, msg, exc (when any)."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "thread": record.threadName, "msg": record.getMessage()}
        if record.exc_text:
            obj["exc"] = record.exc_text
        return json.dumps(obj, ensure_ascii=False)


def under_journald(stream: IO[str]) -> bool:
    """True when stream is the journal: $JOURNAL_STREAM names its device:inode (see systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    dev, _, ino = value.partition(":")
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger once (again on each call: the old agecam handler is replaced); returns the handler."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.set_name("agecam")
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif under_journald(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(SecretFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "agecam"]:
        root.removeHandler(old)
        old.close()  # a StreamHandler leaves its stream open
    root.addHandler(handler)
    root.setLevel(level)
    return handler
