"""Structured logging for Fraisier: JSON lines, console progress, run context and redaction.

``configure_logging`` installs handlers on the ``fraisier`` logger only. Every handler it
installs carries two filters: ``ContextFilter`` copies the run context (``log_context``) into
each record, then ``RedactFilter`` formats the message, masks secrets in it, in the exception
text and in every extra field, and drops the exception object. Both formatters also redact
on their own, so a formatter used on another handler still masks secrets.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import logging
import logging.handlers
import os
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import IO, Any, TypeVar

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

from fraisier.errors import ConfigurationError
from fraisier.redact import redact
from fraisier.tracing import current_trace_ids

ROOT_LOGGER = "fraisier"
CONTEXT_FIELDS = ("run_id", "environment", "fraise", "host", "step", "attempt", "duration")
EVENTS = (
    "run_start",
    "host_start",
    "step_start",
    "step_end",
    "step_retry",
    "host_end",
    "rollback",
    "run_end",
)
FORMATS = ("auto", "console", "json")
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUP_COUNT = 5

ENV_LEVEL = "FRAISIER_LOG_LEVEL"
ENV_FORMAT = "FRAISIER_LOG_FORMAT"
ENV_FILE = "FRAISIER_LOG_FILE"

# Attributes that every LogRecord has; anything else on a record came from ``extra``, the
# run context or the redaction filter.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_REDACTED_FLAG = "_fraisier_redacted"
_INSTALLED_FLAG = "_fraisier_installed"

# The default is read-only; bind_context always sets a new dict and never mutates one.
_EMPTY_CONTEXT: Mapping[str, Any] = types.MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "fraisier_log_context", default=_EMPTY_CONTEXT
)

T = TypeVar("T")


# Run context ------------------------------------------------------------------------------


def current_context() -> dict[str, Any]:
    """Return a copy of the run context fields bound in the current thread or task."""
    return dict(_context.get())


def bind_context(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Merge ``fields`` into the run context and return the token that restores it.

    A field set to None is removed from the context.
    """
    for key in fields:
        if key in _RECORD_ATTRS or key.startswith("_"):
            raise ValueError(
                f"invalid log context field {key!r}: the name is a LogRecord attribute or "
                f"private; rename the field, for example to 'fraisier_{key.lstrip('_')}'"
            )
    merged = {**_context.get(), **fields}
    return _context.set({key: value for key, value in merged.items() if value is not None})


def reset_context(token: contextvars.Token[Mapping[str, Any]]) -> None:
    """Restore the run context that was current before ``bind_context`` returned ``token``."""
    _context.reset(token)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Bind ``fields`` for the duration of the block; nested blocks merge their fields."""
    token = bind_context(**fields)
    try:
        yield current_context()
    finally:
        reset_context(token)


def run_in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap ``fn`` so that each call runs in a copy of the context current at wrap time.

    Worker threads of a ``ThreadPoolExecutor`` start with an empty context, so a function
    submitted without this wrapper logs without the run context and opens spans without a
    parent.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        # A Context object can be entered by one thread at a time, so every call gets a copy.
        return captured.copy().run(fn, *args, **kwargs)

    return wrapper


def context_submit(
    executor: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> Future[T]:
    """Submit ``fn`` to ``executor`` so that it runs in a copy of the caller's context."""
    return executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)


# Filters ----------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Filter that copies the run context fields into each record it receives.

    When tracing is on and a span is current, ``trace_id`` and ``span_id`` are added too,
    so log lines can be joined with traces. Fields passed with ``extra`` win over both.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        for key, value in current_trace_ids().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


class RedactFilter(logging.Filter):
    """Filter that masks secrets in the message, exception text and extra fields of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> None:
    """Mask secrets in ``record`` in place; a second call on the same record does nothing.

    The message is %-formatted first, so ``record.msg`` contains the redacted text and
    ``record.args`` is empty. An exception becomes the fields ``exc_type``, ``exc_message``
    and ``traceback`` plus a redacted ``exc_text``, and ``exc_info`` is cleared so that no
    formatter can render the original exception text.
    """
    if record.__dict__.get(_REDACTED_FLAG):
        return

    if isinstance(record.msg, dict):
        record.msg = redact(record.msg)
    else:
        record.msg = redact(_format_message(record))
    record.args = ()

    if record.exc_info and record.exc_info[0] is not None:
        exc_type, exc, tb = record.exc_info
        record.exc_type = exc_type.__name__
        record.exc_message = redact(str(exc))
        code = getattr(exc, "code", None)
        if isinstance(code, str) and "error_code" not in record.__dict__:
            record.error_code = code
        record.traceback = redact("".join(traceback.format_exception(exc_type, exc, tb)).rstrip())
        record.exc_text = record.traceback
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)

    for key, value in list(record.__dict__.items()):
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            record.__dict__[key] = redact(value)
    record.__dict__[_REDACTED_FLAG] = True


def _format_message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except (TypeError, ValueError, KeyError) as exc:
        # A broken format string must not turn a log call into a failed deployment.
        return f"{record.msg!s} (log arguments {record.args!r} failed to format: {exc})"


def attach_filters(handler: logging.Handler) -> logging.Handler:
    """Add the context and redaction filters to ``handler``, once, and return it.

    Use it on handlers that Fraisier does not install, such as pytest's ``caplog.handler``.
    """
    kinds = {type(existing) for existing in handler.filters}
    if ContextFilter not in kinds:
        handler.addFilter(ContextFilter())
    if RedactFilter not in kinds:
        handler.addFilter(RedactFilter())
    return handler


# Formatters -------------------------------------------------------------------------------


def _utc_timestamp(created: float) -> str:
    return dt.datetime.fromtimestamp(created, tz=dt.timezone.utc).isoformat(timespec="microseconds")


class JsonFormatter(_BaseJsonFormatter):
    """Formatter that writes one JSON object per record, with secrets masked.

    Field order: ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the run
    context fields, the exception fields, then every other extra field.
    """

    def __init__(self) -> None:
        super().__init__(json_ensure_ascii=False)

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record)
        return super().format(record)

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        log_data["timestamp"] = _utc_timestamp(record.created)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        for key in CONTEXT_FIELDS:
            if record.__dict__.get(key) is not None:
                log_data[key] = record.__dict__[key]
        for key in ("exc_type", "exc_message", "traceback"):
            if key in record.__dict__:
                log_data[key] = record.__dict__[key]
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in log_data:
                log_data[key] = value
        # The base class puts the exception text under "exc_info"; "traceback" has it already.
        for key, value in message_dict.items():
            if key != "exc_info" and key not in log_data:
                log_data[key] = value


_LEVEL_LABELS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRIT",
}
_ANSI = {
    "DEBUG": "\x1b[2m",
    "WARN": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRIT": "\x1b[1;31m",
    "ok": "\x1b[32m",
    "failed": "\x1b[31m",
    "retry": "\x1b[33m",
}
_ANSI_RESET = "\x1b[0m"
_OK_STATUSES = ("ok", "success")
_FAILED_STATUSES = ("failed", "timeout", "unreachable", "rolled_back", "interrupted")


class ConsoleFormatter(logging.Formatter):
    """Formatter for people: ``HH:MM:SS LEVEL host step message``, times in local time.

    Records with an ``event`` extra field (``step_end`` and the other progress events) are
    rendered as short progress lines. Colour codes are added only when ``color`` is true;
    the records themselves never contain them.
    """

    def __init__(self, color: bool = False, host_width: int = 5, step_width: int = 12) -> None:
        super().__init__()
        self.color = color
        # The columns widen to the longest host and step seen so far and never shrink.
        self.host_width = host_width
        self.step_width = step_width

    def format(self, record: logging.LogRecord) -> str:
        redact_record(record)
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = _LEVEL_LABELS.get(record.levelno, record.levelname[:5])
        host = str(record.__dict__.get("host") or "-")
        step = str(record.__dict__.get("step") or "-")
        self.host_width = max(self.host_width, len(host))
        self.step_width = max(self.step_width, len(step))

        event = record.__dict__.get("event")
        body = self._event_body(record, event) if event in EVENTS else record.getMessage()
        line = (
            f"{clock} {self._paint(f'{level:<5}', level)} "
            f"{host:<{self.host_width}} {step:<{self.step_width}} {body}"
        )
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{record.stack_info}"
        return line.rstrip()

    def _event_body(self, record: logging.LogRecord, event: str) -> str:
        fields = record.__dict__
        status = str(fields.get("status") or "")
        duration = _format_duration(fields.get("duration"))
        message = record.getMessage()
        # The engine's message repeats the event for INFO; warnings and errors keep it.
        detail = f"  {message}" if message and record.levelno >= logging.WARNING else ""

        if event in ("step_start", "host_start"):
            return "start"
        if event in ("step_end", "host_end"):
            return f"{self._paint(f'{status:<6}', status)} {duration}".rstrip() + detail
        if event == "step_retry":
            attempt = fields.get("attempt")
            delay = fields.get("delay")
            text = "retry  attempt" + (f" {attempt}" if attempt is not None else "")
            if isinstance(delay, (int, float)):
                text += f" in {_format_duration(delay)}"
            return self._paint(text, "retry") + (f": {message}" if message else "")
        if event == "rollback":
            source = fields.get("from_release") or "?"
            target = fields.get("to_release") or "?"
            reason = fields.get("reason")
            text = f"rollback {source} -> {target}" + (f" ({reason})" if reason else "")
            return self._paint(text, "retry")
        if event == "run_start":
            where = "/".join(str(fields[k]) for k in ("environment", "fraise") if fields.get(k))
            return f"run {fields.get('run_id') or '?'} start {where}".rstrip()
        # run_end
        text = f"run {fields.get('run_id') or '?'} {self._paint(status or 'end', status)}"
        return f"{text} {duration}".rstrip() + detail

    def _paint(self, text: str, key: str) -> str:
        code = _colour_code(key.strip())
        if not self.color or code is None:
            return text
        return f"{code}{text}{_ANSI_RESET}"


def _colour_code(key: str) -> str | None:
    if key in _OK_STATUSES:
        return _ANSI["ok"]
    if key in _FAILED_STATUSES:
        return _ANSI["failed"]
    return _ANSI.get(key)


def _format_duration(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    if value < 60:
        return f"{value:.2f}s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes}m{seconds:02d}s"


# Configuration ----------------------------------------------------------------------------


def parse_level(value: str | int | None) -> int:
    """Return the numeric level for a name (DEBUG, info, WARN) or number; None means INFO."""
    if value is None or value == "":
        return logging.INFO
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    if isinstance(level, int):
        return level
    raise ConfigurationError(
        f"invalid log level {value!r}; use DEBUG, INFO, WARNING, ERROR, CRITICAL or a number "
        f"(argument or {ENV_LEVEL})"
    )


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except ValueError:  # a closed stream
        return False


def _resolve_format(fmt: str, stream: IO[str]) -> str:
    if fmt not in FORMATS:
        raise ConfigurationError(f"invalid log format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    from_env = os.environ.get(ENV_FORMAT, "").strip().lower()
    if from_env:
        if from_env not in FORMATS:
            raise ConfigurationError(
                f"invalid {ENV_FORMAT}={from_env!r}; use one of {', '.join(FORMATS)}"
            )
        if from_env != "auto":
            return from_env
    return "console" if _is_terminal(stream) else "json"


def _open_log_file(path: Path) -> logging.Handler:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return logging.handlers.RotatingFileHandler(
            path,
            maxBytes=LOG_FILE_MAX_BYTES,
            backupCount=LOG_FILE_BACKUP_COUNT,
            encoding="utf-8",
        )
    except OSError as exc:
        raise ConfigurationError(
            f"cannot open log file {path}: {exc.strerror or exc}; choose a writable path "
            f"(argument or {ENV_FILE})"
        ) from exc


def _remove_installed_handlers(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        if getattr(handler, _INSTALLED_FLAG, False):
            logger.removeHandler(handler)
            # StreamHandler.close leaves the stream open; RotatingFileHandler closes its file.
            handler.close()


def configure_logging(
    level: str | int | None = None,
    fmt: str = "auto",
    log_file: str | Path | None = None,
    stream: IO[str] | None = None,
    propagate: bool = False,
) -> str:
    """Install the console or JSON handler and the optional JSON log file on ``fraisier``.

    Returns the format of the stream handler, ``console`` or ``json``.

    ``level`` falls back to ``FRAISIER_LOG_LEVEL``, then INFO. With ``fmt="auto"``,
    ``FRAISIER_LOG_FORMAT`` decides when set, else the format is console when ``stream``
    (default ``sys.stderr``) is a terminal and JSON otherwise. ``log_file`` falls back to
    ``FRAISIER_LOG_FILE``. A second call replaces the handlers of the first; other handlers
    on the logger stay. ``propagate`` is False so that records are not printed twice by
    root handlers; pass True to let pytest's ``caplog`` see them, already redacted.
    """
    resolved_level = parse_level(level if level is not None else os.environ.get(ENV_LEVEL))
    target = stream if stream is not None else sys.stderr
    resolved_format = _resolve_format(fmt, target)
    if log_file is None and os.environ.get(ENV_FILE):
        log_file = os.environ[ENV_FILE]

    logger = logging.getLogger(ROOT_LOGGER)
    _remove_installed_handlers(logger)

    handlers: list[logging.Handler] = []
    stream_handler = logging.StreamHandler(target)
    if resolved_format == "json":
        stream_handler.setFormatter(JsonFormatter())
    else:
        color = _is_terminal(target) and "NO_COLOR" not in os.environ
        stream_handler.setFormatter(ConsoleFormatter(color=color))
    handlers.append(stream_handler)
    if log_file:
        file_handler = _open_log_file(Path(log_file))
        file_handler.setFormatter(JsonFormatter())
        handlers.append(file_handler)

    for handler in handlers:
        attach_filters(handler)
        setattr(handler, _INSTALLED_FLAG, True)
        logger.addHandler(handler)
    logger.setLevel(resolved_level)
    logger.propagate = propagate
    return resolved_format


def add_log_file(path: str | Path) -> bool:
    """Add the rotating JSON log file ``path`` unless a log file is already installed.

    Serves ``settings.log_file`` of an inventory, which is read after logging is configured;
    a ``--log-file`` flag or ``FRAISIER_LOG_FILE`` wins over it. Returns whether it was added.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in logger.handlers:
        if getattr(handler, _INSTALLED_FLAG, False) and isinstance(handler, logging.FileHandler):
            return False
    handler = _open_log_file(Path(path))
    handler.setFormatter(JsonFormatter())
    attach_filters(handler)
    setattr(handler, _INSTALLED_FLAG, True)
    logger.addHandler(handler)
    return True


def reset_logging() -> None:
    """Remove the handlers ``configure_logging`` installed and restore the logger defaults."""
    logger = logging.getLogger(ROOT_LOGGER)
    _remove_installed_handlers(logger)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
