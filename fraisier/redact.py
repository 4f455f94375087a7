"""One redaction function for logs, audit events, run records and metric labels."""

from __future__ import annotations

import re
import threading
from typing import Any

MASK = "***"
_MIN_SECRET_LENGTH = 4

# user:password@ in any URL (database, Pushgateway, git remote).
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
# KEY=value, --key=value and --key value where the key names a secret.
_SECRET_NAME = r"[A-Za-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)[A-Za-z0-9_.-]*"
_ASSIGNMENT = re.compile(rf"(?i)(?P<key>{_SECRET_NAME})(?P<sep>\s*[=:]\s*|\s+)(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)")
_BEARER = re.compile(r"(?i)(authorization:\s*(?:bearer|basic|token)\s+)[^\s'\"]+")


class Redactor:
    """Replaces registered secret values and secret-looking patterns with a mask."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add_secret(self, value: str | None) -> None:
        if not value or len(value) < _MIN_SECRET_LENGTH:
            return
        with self._lock:
            if value not in self._secrets:
                self._secrets.add(value)
                self._pattern = None

    def _secret_pattern(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._secrets:
                ordered = sorted(self._secrets, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(s) for s in ordered))
            return self._pattern

    def redact(self, value: Any) -> Any:
        """Return ``value`` with secrets masked; dicts, lists and tuples are walked."""
        if isinstance(value, str):
            return self._redact_text(value)
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.redact(v) for v in value)
        return value

    def _redact_text(self, text: str) -> str:
        pattern = self._secret_pattern()
        if pattern is not None:
            text = pattern.sub(MASK, text)
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
        return _ASSIGNMENT.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)


default_redactor = Redactor()


def redact(value: Any) -> Any:
    """Mask secrets in ``value`` with the process-wide redactor."""
    return default_redactor.redact(value)


def register_secret(value: str | None) -> None:
    """Register a secret value so that every later redaction masks it."""
    default_redactor.add_secret(value)
