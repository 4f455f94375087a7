"""Tests for fraisier.logging: JSON and console formats, run context, redaction, log file."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fraisier import logging as flog
from fraisier.errors import CommandFailedError, ConfigurationError
from fraisier.redact import default_redactor, register_secret

PLANTED_SECRET = "planted-Secret-7731"
DB_URL = "postgresql://deploy:db-Pass-4410@127.0.0.1:5432/test"
COMMAND = "app migrate --password cmd-Pass-5512 && curl -H 'Authorization: Bearer tok-9x8y7z6w'"
LEAKS = (PLANTED_SECRET, "db-Pass-4410", "cmd-Pass-5512", "tok-9x8y7z6w")

log = logging.getLogger("fraisier.engine.test")


@pytest.fixture(autouse=True)
def clean_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (flog.ENV_LEVEL, flog.ENV_FORMAT, flog.ENV_FILE, "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    yield
    flog.reset_logging()


@pytest.fixture
def planted_secret() -> Iterator[str]:
    register_secret(PLANTED_SECRET)
    yield PLANTED_SECRET
    default_redactor.clear()


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def log_secrets() -> None:
    """Log the planted secrets through the message, arguments, extras and an exception."""
    log.info("connecting to %s", DB_URL)
    log.info("running " + COMMAND, extra={"command": COMMAND, "nested": {"url": DB_URL}})
    log.warning("secret %s in the message", PLANTED_SECRET)
    try:
        raise CommandFailedError(
            f"command failed: {COMMAND} with {PLANTED_SECRET}", command=COMMAND, exit_status=2
        )
    except CommandFailedError:
        log.exception("step failed for %s", DB_URL)


# JSON format -------------------------------------------------------------------------------


def test_json_line_fields() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    log.info("hello %s", "world", extra={"release_id": "r-1", "count": 3})

    (line,) = json_lines(stream)
    assert line["message"] == "hello world"
    assert line["level"] == "INFO"
    assert line["logger"] == "fraisier.engine.test"
    assert line["release_id"] == "r-1"
    assert line["count"] == 3
    assert list(line)[:4] == ["timestamp", "level", "logger", "message"]


def test_json_timestamp_utc_iso8601() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)
    before = dt.datetime.now(dt.timezone.utc)

    log.info("tick")

    (line,) = json_lines(stream)
    stamp = dt.datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0)
    assert line["timestamp"].endswith("+00:00")
    assert abs((stamp - before).total_seconds()) < 5


def test_json_non_ascii_readable() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    log.info("déploiement 漢字 🍓", extra={"host": "hôte-1"})

    raw = stream.getvalue()
    assert "déploiement 漢字 🍓" in raw
    assert "hôte-1" in raw
    assert "\\u" not in raw


def test_json_traceback_as_fields() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    try:
        raise ValueError("bad value 42")
    except ValueError:
        log.exception("step failed")

    (line,) = json_lines(stream)
    assert line["message"] == "step failed"
    assert line["exc_type"] == "ValueError"
    assert line["exc_message"] == "bad value 42"
    assert line["traceback"].startswith("Traceback (most recent call last):")
    assert line["traceback"].endswith("ValueError: bad value 42")
    assert "exc_info" not in line


def test_json_fraisier_error_code() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    try:
        raise ConfigurationError("bad inventory")
    except ConfigurationError:
        log.error("load failed", exc_info=True)

    (line,) = json_lines(stream)
    assert line["error_code"] == "configuration_error"
    assert line["exc_type"] == "ConfigurationError"


def test_json_unserialisable_extra() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    log.info("path", extra={"path": Path("/srv/app"), "when": dt.date(2026, 1, 2)})

    (line,) = json_lines(stream)
    assert line["path"] == "/srv/app"
    assert line["when"] == "2026-01-02"


def test_bad_format_arguments_do_not_raise() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    log.info("two %s %s", "only-one")

    (line,) = json_lines(stream)
    assert "two %s %s" in line["message"]
    assert "failed to format" in line["message"]


# Run context -------------------------------------------------------------------------------


def test_nested_context_merges_and_restores() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    with flog.log_context(run_id="r-1", environment="prod", fraise="api"):
        log.info("outer")
        with flog.log_context(host="web1", step="build", attempt=2):
            log.info("inner", extra={"duration": 0.5})
        log.info("outer again")
    log.info("outside")

    outer, inner, outer_again, outside = json_lines(stream)
    assert outer["run_id"] == "r-1"
    assert "host" not in outer
    assert inner["run_id"] == "r-1"
    assert inner["environment"] == "prod"
    assert inner["fraise"] == "api"
    assert inner["host"] == "web1"
    assert inner["step"] == "build"
    assert inner["attempt"] == 2
    assert inner["duration"] == 0.5
    assert "host" not in outer_again
    assert outer_again["fraise"] == "api"
    assert "run_id" not in outside


def test_context_none_removes_field() -> None:
    with flog.log_context(host="web1", step="build"), flog.log_context(step=None):
        assert flog.current_context() == {"host": "web1"}


def test_extra_overrides_context() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    with flog.log_context(host="web1"):
        log.info("other host", extra={"host": "web2"})

    (line,) = json_lines(stream)
    assert line["host"] == "web2"


def test_bind_and_reset_context() -> None:
    token = flog.bind_context(run_id="r-2")
    assert flog.current_context() == {"run_id": "r-2"}
    flog.reset_context(token)
    assert flog.current_context() == {}


def test_context_rejects_record_attribute() -> None:
    with pytest.raises(ValueError, match="'msg'"), flog.log_context(msg="x"):
        pass


def test_context_submit_reaches_threads() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    def work(host: str) -> str:
        with flog.log_context(host=host):
            log.info("on host")
        return threading.current_thread().name

    with flog.log_context(run_id="r-3", fraise="api"), ThreadPoolExecutor(2) as pool:
        futures = [flog.context_submit(pool, work, host) for host in ("web1", "web2", "web3")]
        thread_names = {f.result() for f in futures}

    lines = json_lines(stream)
    assert threading.current_thread().name not in thread_names
    assert sorted(line["host"] for line in lines) == ["web1", "web2", "web3"]
    assert all(line["run_id"] == "r-3" for line in lines)
    assert all(line["fraise"] == "api" for line in lines)


def test_plain_submit_loses_context() -> None:
    """Show that a plain submit loses the context, which is why the helpers exist."""
    with flog.log_context(run_id="r-4"), ThreadPoolExecutor(1) as pool:
        seen = pool.submit(flog.current_context).result()
    assert seen == {}


def test_run_in_context_wrapper() -> None:
    with flog.log_context(run_id="r-5", environment="staging"):
        wrapped = flog.run_in_context(flog.current_context)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: wrapped(), range(4)))
    assert results == [{"run_id": "r-5", "environment": "staging"}] * 4


def test_thread_context_does_not_leak_back() -> None:
    with ThreadPoolExecutor(1) as pool:
        flog.context_submit(pool, flog.bind_context, host="web9").result()
        seen = pool.submit(flog.current_context).result()
    assert flog.current_context() == {}
    assert seen == {}


# Console format ----------------------------------------------------------------------------

CONSOLE_LINE = re.compile(
    r"^\d\d:\d\d:\d\d (?P<level>\S+)\s+(?P<host>\S+)\s+(?P<step>\S+)\s+(?P<body>.*)$"
)


def test_console_plain_line() -> None:
    stream = io.StringIO()
    flog.configure_logging("DEBUG", fmt="console", stream=stream)

    with flog.log_context(host="h2", step="build"):
        log.warning("disk at %d%%", 91)
    log.debug("no host")

    first, second = stream.getvalue().splitlines()
    match = CONSOLE_LINE.match(first)
    assert match is not None
    assert match["level"] == "WARN"
    assert match["host"] == "h2"
    assert match["step"] == "build"
    assert match["body"] == "disk at 91%"
    assert re.match(r"^\d\d:\d\d:\d\d DEBUG -\s+-\s+no host$", second)


def test_console_progress_events() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="console", stream=stream)

    with flog.log_context(run_id="r-6", environment="prod", fraise="api"):
        log.info("run started", extra={"event": "run_start"})
        with flog.log_context(host="h2"):
            log.info("host started", extra={"event": "host_start"})
            with flog.log_context(step="build"):
                log.info("step started", extra={"event": "step_start"})
                log.warning("exit 1", extra={"event": "step_retry", "attempt": 2, "delay": 1.5})
                log.info("done", extra={"event": "step_end", "status": "ok", "duration": 0.42})
            log.warning(
                "health check failed",
                extra={
                    "event": "rollback",
                    "from_release": "r2",
                    "to_release": "r1",
                    "reason": "health",
                },
            )
            log.info("host done", extra={"event": "host_end", "status": "ok", "duration": 3})
        log.error("run failed", extra={"event": "run_end", "status": "failed", "duration": 75})

    bodies = [line[9:] for line in stream.getvalue().splitlines()]
    assert bodies == [
        "INFO  -     -            run r-6 start prod/api",
        "INFO  h2    -            start",
        "INFO  h2    build        start",
        "WARN  h2    build        retry  attempt 2 in 1.50s: exit 1",
        "INFO  h2    build        ok     0.42s",
        "WARN  h2    -            rollback r2 -> r1 (health)",
        "INFO  h2    -            ok     3.00s",
        "ERROR -     -            run r-6 failed 1m15s  run failed",
    ]


def test_console_columns_widen() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="console", stream=stream)

    log.info("a", extra={"host": "web-server-01", "step": "s"})
    log.info("b", extra={"host": "h1", "step": "s"})

    second = stream.getvalue().splitlines()[1]
    assert second[9:].startswith("INFO  h1            s")


def test_console_traceback_appended() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="console", stream=stream)

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")

    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"


def test_console_no_colour_off_terminal() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="console", stream=stream)

    log.error("bad", extra={"event": "step_end", "status": "failed", "duration": 1})

    assert "\x1b[" not in stream.getvalue()


def read_pty(master: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode()


@pytest.fixture
def terminal() -> Iterator[tuple[int, io.TextIOWrapper]]:
    master, slave = os.openpty()
    os.set_blocking(master, False)
    stream = os.fdopen(slave, "w", buffering=1, encoding="utf-8")
    yield master, stream
    stream.close()
    os.close(master)


def test_auto_format_terminal_colour(terminal: tuple[int, io.TextIOWrapper]) -> None:
    master, stream = terminal
    flog.configure_logging("INFO", stream=stream)

    log.error("bad", extra={"event": "step_end", "status": "failed", "duration": 1})

    output = read_pty(master)
    assert "\x1b[31m" in output
    assert "failed" in output
    assert not output.lstrip().startswith("{")


def test_no_color_disables_colour(
    terminal: tuple[int, io.TextIOWrapper], monkeypatch: pytest.MonkeyPatch
) -> None:
    master, stream = terminal
    monkeypatch.setenv("NO_COLOR", "1")
    flog.configure_logging("INFO", stream=stream)

    log.error("bad", extra={"event": "step_end", "status": "failed", "duration": 1})

    output = read_pty(master)
    assert "failed" in output
    assert "\x1b[" not in output


# Configuration -----------------------------------------------------------------------------


def test_auto_format_json_off_terminal() -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", stream=stream)

    log.info("piped")

    assert json_lines(stream)[0]["message"] == "piped"


def test_format_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(flog.ENV_FORMAT, "console")
    stream = io.StringIO()
    flog.configure_logging("INFO", stream=stream)

    log.info("people")

    assert CONSOLE_LINE.match(stream.getvalue().splitlines()[0])


def test_explicit_format_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(flog.ENV_FORMAT, "console")
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    log.info("machine")

    assert json_lines(stream)[0]["message"] == "machine"


def test_level_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(flog.ENV_LEVEL, "warning")
    stream = io.StringIO()
    flog.configure_logging(fmt="json", stream=stream)

    log.info("hidden")
    log.warning("shown")

    assert [line["message"] for line in json_lines(stream)] == ["shown"]


def test_level_default_info() -> None:
    stream = io.StringIO()
    flog.configure_logging(fmt="json", stream=stream)

    log.debug("hidden")
    log.info("shown")

    assert [line["message"] for line in json_lines(stream)] == ["shown"]


@pytest.mark.parametrize(("value", "expected"), [("debug", 10), ("WARN", 30), ("25", 25), (40, 40)])
def test_parse_level(value: str | int, expected: int) -> None:
    assert flog.parse_level(value) == expected


def test_invalid_level_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(flog.ENV_LEVEL, "loud")
    with pytest.raises(ConfigurationError, match=r"'loud'.*FRAISIER_LOG_LEVEL"):
        flog.configure_logging(stream=io.StringIO())


def test_invalid_format_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="'xml'"):
        flog.configure_logging(fmt="xml", stream=io.StringIO())
    monkeypatch.setenv(flog.ENV_FORMAT, "yaml")
    with pytest.raises(ConfigurationError, match="FRAISIER_LOG_FORMAT='yaml'"):
        flog.configure_logging(stream=io.StringIO())


def test_configure_twice_replaces_handlers() -> None:
    first = io.StringIO()
    second = io.StringIO()
    foreign = logging.NullHandler()
    logger = logging.getLogger("fraisier")
    logger.addHandler(foreign)
    try:
        flog.configure_logging("INFO", fmt="json", stream=first)
        flog.configure_logging("INFO", fmt="json", stream=second)
        log.info("once")
        assert first.getvalue() == ""
        assert len(json_lines(second)) == 1
        assert foreign in logger.handlers
        assert logger.propagate is False
        assert logging.getLogger().level == logging.WARNING
    finally:
        logger.removeHandler(foreign)


def test_reset_restores_defaults() -> None:
    flog.configure_logging("DEBUG", fmt="json", stream=io.StringIO())
    flog.reset_logging()
    logger = logging.getLogger("fraisier")
    assert logger.propagate is True
    assert logger.level == logging.NOTSET
    assert not [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]


def test_log_file_json_and_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flog, "LOG_FILE_MAX_BYTES", 2000)
    path = tmp_path / "logs" / "fraisier.log"
    flog.configure_logging("INFO", fmt="console", stream=io.StringIO(), log_file=path)

    for number in range(100):
        log.info("line %03d with some padding to fill the file", number)
    flog.reset_logging()

    files = sorted(p.name for p in path.parent.iterdir())
    assert files == [
        "fraisier.log",
        "fraisier.log.1",
        "fraisier.log.2",
        "fraisier.log.3",
        "fraisier.log.4",
        "fraisier.log.5",
    ]
    assert path.stat().st_size <= 2000
    last = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert last[-1]["message"] == "line 099 with some padding to fill the file"


def test_log_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.log"
    monkeypatch.setenv(flog.ENV_FILE, str(path))
    flog.configure_logging("INFO", fmt="console", stream=io.StringIO())

    log.info("to file")
    flog.reset_logging()

    (line,) = [json.loads(raw) for raw in path.read_text(encoding="utf-8").splitlines()]
    assert line["message"] == "to file"


def test_log_file_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigurationError, match=r"cannot open log file .*file/sub/f\.log"):
        flog.configure_logging(stream=io.StringIO(), log_file=blocker / "sub" / "f.log")


# Redaction --------------------------------------------------------------------------------


def assert_no_leak(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaked"


def test_secrets_absent_from_json(planted_secret: str) -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="json", stream=stream)

    with flog.log_context(run_id="r-7", step=f"step {planted_secret}"):
        log_secrets()

    raw = stream.getvalue()
    assert_no_leak(raw)
    lines = json_lines(stream)
    assert lines[0]["message"] == "connecting to postgresql://deploy:***@127.0.0.1:5432/test"
    assert lines[1]["nested"] == {"url": "postgresql://deploy:***@127.0.0.1:5432/test"}
    assert lines[1]["command"].startswith("app migrate --password ***")
    assert lines[0]["step"] == "step ***"
    assert "***" in lines[3]["exc_message"]
    assert "***" in lines[3]["traceback"]


def test_secrets_absent_from_console(planted_secret: str) -> None:
    stream = io.StringIO()
    flog.configure_logging("INFO", fmt="console", stream=stream)

    log_secrets()

    output = stream.getvalue()
    assert_no_leak(output)
    assert "Traceback (most recent call last):" in output


def test_secrets_absent_from_log_file(planted_secret: str, tmp_path: Path) -> None:
    path = tmp_path / "fraisier.log"
    flog.configure_logging("INFO", fmt="console", stream=io.StringIO(), log_file=path)

    log_secrets()
    flog.reset_logging()

    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 4
    assert_no_leak(text)


def test_caplog_sees_redacted_records(
    planted_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    flog.configure_logging("INFO", fmt="json", stream=io.StringIO(), propagate=True)

    with caplog.at_level(logging.INFO):
        log_secrets()

    assert len(caplog.records) == 4
    assert_no_leak(caplog.text)
    assert caplog.records[3].exc_info is None
    assert caplog.records[3].exc_type == "CommandFailedError"


def test_attach_filters_on_foreign_handler(
    planted_secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    flog.attach_filters(caplog.handler)
    flog.attach_filters(caplog.handler)
    assert len(caplog.handler.filters) == 2

    with caplog.at_level(logging.INFO), flog.log_context(host="web1"):
        log_secrets()

    assert_no_leak(caplog.text)
    assert caplog.records[0].host == "web1"


def test_formatter_redacts_without_filter(planted_secret: str) -> None:
    record = logging.LogRecord(
        "fraisier.x", logging.INFO, __file__, 1, "value %s", (planted_secret,), None
    )
    assert planted_secret not in flog.JsonFormatter().format(record)
    record = logging.LogRecord(
        "fraisier.x", logging.INFO, __file__, 1, "value %s", (planted_secret,), None
    )
    assert planted_secret not in flog.ConsoleFormatter().format(record)


def test_add_log_file_yields_to_installed_file(tmp_path: Path) -> None:
    first = tmp_path / "flag.jsonl"
    second = tmp_path / "inventory.jsonl"
    flog.configure_logging(level="INFO", fmt="json", log_file=first, stream=io.StringIO())
    try:
        assert flog.add_log_file(second) is False
        logging.getLogger("fraisier.test").info("to the flag's file")
    finally:
        flog.reset_logging()
    assert "to the flag's file" in first.read_text(encoding="utf-8")
    assert not second.exists()

    flog.configure_logging(level="INFO", fmt="json", stream=io.StringIO())
    try:
        assert flog.add_log_file(second) is True
        logging.getLogger("fraisier.test").info("to the inventory's file")
    finally:
        flog.reset_logging()
    line = json.loads(second.read_text(encoding="utf-8").splitlines()[-1])
    assert line["message"] == "to the inventory's file"
