"""One redaction function for logs, audit events, run records and metric labels.

``redact`` masks three kinds of secrets:

* values registered with ``register_secret`` (inventory values marked secret), including
  their URL-encoded form and, for multi-line values such as private keys, each long line;
* secrets found by pattern. These are the password in ``scheme://user:password@host`` and
  the value of ``KEY=value``, ``key: value`` and ``--key value`` where the key names a secret
  (password, secret, token, API key, access key, private key, credentials). Also masked are
  the credentials after ``Authorization: Bearer|Basic|Token`` and ``Bearer``, the password
  in ``mysql -pPASSWORD``, ``sshpass -p PASSWORD`` and ``curl -u user:password``,
  well-known token formats (GitHub, GitLab, Slack, AWS access key ids) and PEM private keys;
* in dicts, every value under a key that names a secret, whatever the value looks like.

Keys that name a file, path or directory (``password_file``, ``--token-path``,
``POSTGRES_PASSWORD_FILE``) keep their value, because a path is not the secret and
operators need it to debug a missing file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shlex
import threading
import urllib.parse
from typing import Any

logger = logging.getLogger("fraisier.redact")

MASK = "***"
# Shorter registered values would mask ordinary words and numbers all over the output.
MIN_SECRET_LENGTH = 4
# Lines of a multi-line secret (a private key) that are at least this long are masked alone,
# so a key printed one line at a time is masked too.
_MIN_SECRET_LINE_LENGTH = 16

_SECRET_WORD = (
    r"(?:password|passwd|passphrase|secret|token|api[_-]?key|apikey|access[_-]?key"
    r"|private[_-]?key|credentials?)"
)
_SECRET_NAME = rf"[A-Za-z0-9_.-]*{_SECRET_WORD}[A-Za-z0-9_.-]*"
_IS_SECRET_KEY = re.compile(rf"(?i)-{{0,2}}{_SECRET_NAME}")
# A key that names where a secret is stored, not the secret itself.
_LOCATION_SUFFIX = re.compile(r"(?i)[_.-](?:file|path|dir|directory)$")

_VALUE = r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)"

# user:password@ in any URL (database, Pushgateway, git remote). The password runs to the last
# "@" before the path, so a raw "@" inside a password does not leak the rest of it.
_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<pw>[^/?#\s'\"]+)@"
)
# KEY=value, key: value, "key": "value".
_ASSIGNMENT = re.compile(
    rf"(?i)(?P<key>{_SECRET_NAME})(?P<quote>[\"']?)(?P<sep>\s*[=:]\s*){_VALUE}"
)
# --key value and -key value; a value that starts with "-" is the next option.
_FLAG = re.compile(rf"(?i)(?<![\w-])(?P<key>--?{_SECRET_NAME})(?P<sep>\s+)(?!-){_VALUE}")
_AUTHORIZATION = re.compile(r"(?i)(authorization\s*[:=]\s*(?:bearer|basic|token)\s+)[^\s'\",]+")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_MYSQL_OPTION = re.compile(r"(?i)(\bmysql\w*\b[^\n]*?\s-p)(?=[^\s-])\S+")
_SSHPASS_OPTION = re.compile(r"(?i)(\bsshpass\b[^\n]*?\s-p\s*)(?=[^\s-])\S+")
_CURL_USER = re.compile(r"(?i)(\bcurl\b[^\n]*?\s(?:-u|--user)\s*['\"]?[^:\s'\"]+:)[^\s'\"]+")
_KNOWN_TOKEN = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})\b"
)
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)


def is_secret_key(key: object) -> bool:
    """Return whether a dict key or option name names a secret value."""
    if not isinstance(key, str):
        return False
    return bool(_IS_SECRET_KEY.fullmatch(key)) and not _LOCATION_SUFFIX.search(key)


def _mask_assignment(match: re.Match[str]) -> str:
    # A value that starts with the mask was masked by an earlier pattern, such as the password
    # in "https://user-token:***@host", and the rest of it is not secret.
    if _LOCATION_SUFFIX.search(match["key"]) or match["value"].startswith(MASK):
        return match.group(0)
    return f"{match['key']}{match['quote']}{match['sep']}{_mask_keeping_quotes(match['value'])}"


def _mask_flag(match: re.Match[str]) -> str:
    if _LOCATION_SUFFIX.search(match["key"]) or match["value"].startswith(MASK):
        return match.group(0)
    return f"{match['key']}{match['sep']}{_mask_keeping_quotes(match['value'])}"


def _mask_keeping_quotes(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return f"{value[0]}{MASK}{value[0]}"
    return MASK


class Redactor:
    """Registered secret values and secret patterns, masked in strings and containers."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        # Digests of the too-short secrets already warned about, so each is warned about once.
        self._short_warned: set[str] = set()

    def add_secret(self, value: str | None) -> None:
        """Register ``value`` and its encoded forms so that later redactions mask them."""
        if not value:
            return
        if not isinstance(value, str):
            value = str(value)
        if len(value) < MIN_SECRET_LENGTH:
            digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
            if digest in self._short_warned:
                return
            self._short_warned.add(digest)
            # The value itself must not be logged, only the fact and the limit.
            logger.warning(
                "a secret of %d characters is not masked in output: secrets shorter than %d "
                "characters would mask ordinary text; use a longer secret",
                len(value),
                MIN_SECRET_LENGTH,
            )
            return

        # The shell-quoted form is what a command shows after {{ }} templating.
        candidates = {
            value,
            shlex.quote(value),
            urllib.parse.quote(value, safe=""),
            urllib.parse.quote_plus(value),
        }
        if "\n" in value:
            candidates.update(
                line.strip()
                for line in value.splitlines()
                if len(line.strip()) >= _MIN_SECRET_LINE_LENGTH
            )
        with self._lock:
            new = candidates - self._secrets
            if new:
                self._secrets.update(new)
                self._pattern = None

    def clear(self) -> None:
        """Forget every registered secret; the patterns stay active."""
        with self._lock:
            self._secrets.clear()
            self._pattern = None

    def _secret_pattern(self) -> re.Pattern[str] | None:
        with self._lock:
            if self._pattern is None and self._secrets:
                # Longest first, so a secret that contains another one is masked whole.
                ordered = sorted(self._secrets, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(s) for s in ordered))
            return self._pattern

    def redact(self, value: Any) -> Any:
        """Return a copy of ``value`` with secrets masked.

        Strings are scanned; dicts, lists, tuples, sets and dataclass instances are walked,
        and every value under a secret-named dict key is masked. Other values (numbers,
        None, bytes) are returned unchanged.
        """
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, dict):
            return {key: self._redact_item(key, item) for key, item in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return type(value)(self.redact(item) for item in value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {
                field.name: self._redact_item(field.name, getattr(value, field.name))
                for field in dataclasses.fields(value)
                if field.init
            }
            return dataclasses.replace(value, **changes)
        return value

    def _redact_item(self, key: object, item: Any) -> Any:
        if is_secret_key(key):
            return _mask_all(item)
        return self.redact(item)

    def redact_text(self, text: str) -> str:
        """Return ``text`` with registered secrets and secret patterns masked."""
        if not text:
            return text
        pattern = self._secret_pattern()
        if pattern is not None:
            text = pattern.sub(MASK, text)
        text = _PEM_PRIVATE_KEY.sub(MASK, text)
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        text = _AUTHORIZATION.sub(lambda m: m.group(1) + MASK, text)
        text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
        text = _MYSQL_OPTION.sub(lambda m: m.group(1) + MASK, text)
        text = _SSHPASS_OPTION.sub(lambda m: m.group(1) + MASK, text)
        text = _CURL_USER.sub(lambda m: m.group(1) + MASK, text)
        text = _KNOWN_TOKEN.sub(MASK, text)
        text = _ASSIGNMENT.sub(_mask_assignment, text)
        return _FLAG.sub(_mask_flag, text)


def _mask_all(value: Any) -> Any:
    """Mask every string and number in ``value``; keep None, booleans and the structure."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, dict):
        return {key: _mask_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_mask_all(item) for item in value)
    return MASK


default_redactor = Redactor()


def redact(value: Any) -> Any:
    """Mask secrets in ``value`` with the process-wide redactor."""
    return default_redactor.redact(value)


def register_secret(value: str | None) -> None:
    """Register a secret value so that every later redaction masks it."""
    default_redactor.add_secret(value)
