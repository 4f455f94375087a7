"""Tests for fraisier.redact: pattern table, registered secrets and container walking."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import pytest

from fraisier.records import AuditEvent, RunRecord
from fraisier.redact import MASK, Redactor, is_secret_key

# (input, expected output) for text that contains a secret.
MASKED_CASES = [
    ("postgresql://deploy:hunter2@db.local:5432/app", "postgresql://deploy:***@db.local:5432/app"),
    ("mysql+pymysql://root:p@ss@127.0.0.1/test", "mysql+pymysql://root:***@127.0.0.1/test"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("http://push:hunter2@127.0.0.1:9091/metrics", "http://push:***@127.0.0.1:9091/metrics"),
    (
        "git clone https://x-access-token:hunter2@git.example.test/o/r.git",
        "git clone https://x-access-token:***@git.example.test/o/r.git",
    ),
    (
        "git clone https://ghp_abcdefghijklmnopqrstuvwxyz0123@git.example.test/o/r.git",
        "git clone https://***@git.example.test/o/r.git",
    ),
    ("app migrate --password hunter2 --user bob", "app migrate --password *** --user bob"),
    ("app migrate --password=hunter2", "app migrate --password=***"),
    ("app --db-password 'two words' --x", "app --db-password '***' --x"),
    ("PGPASSWORD=hunter2 psql -h 127.0.0.1", "PGPASSWORD=*** psql -h 127.0.0.1"),
    ("export API_KEY='abc def'", "export API_KEY='***'"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "AWS_SECRET_ACCESS_KEY=***"),
    ('{"password": "hunter2", "user": "bob"}', '{"password": "***", "user": "bob"}'),
    ("{'token': 'abc123'}", "{'token': '***'}"),
    ("token: abc123", "token: ***"),
    ("https://h/cb?access_token=abc123", "https://h/cb?access_token=***"),
    (
        'curl -H "Authorization: Bearer eyJhbGciOi.abc.def" https://h',
        'curl -H "Authorization: Bearer ***" https://h',
    ),
    ("Authorization: Basic dXNlcjpodW50ZXIy", "Authorization: Basic ***"),
    ("sent bearer abcdefgh12345678", "sent bearer ***"),
    ("mysql -uroot -phunter2 test", "mysql -uroot -p*** test"),
    ("mysqldump -u root -phunter2 app", "mysqldump -u root -p*** app"),
    ("sshpass -p hunter2 ssh deploy@h", "sshpass -p *** ssh deploy@h"),
    ("curl -u admin:hunter2 http://h", "curl -u admin:*** http://h"),
    ("key AKIAABCDEFGHIJKLMNOP used", "key *** used"),
    ("glpat-abcdefghijklmnopqrstu", MASK),
    (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA\n-----END OPENSSH PRIVATE KEY-----\nnext",
        "***\nnext",
    ),
]

# Text that must come back unchanged.
UNTOUCHED_CASES = [
    "ordinary words stay as they are",
    "the password reset page returned 200",
    "release 20240101-120000 switched on web1",
    "ssh://git@git.example.test/o/r.git",
    "deploy@web1:/srv/app/current",
    "https://git.example.test/o/r.git",
    "password_file=/etc/app/db.pw",
    "POSTGRES_PASSWORD_FILE=/run/secrets/pg",
    "app --password-file /etc/app/db.pw",
    "token_path: /var/lib/app/token",
    "mysql -u root -h 127.0.0.1 test",
    "",
]


@pytest.mark.parametrize(("text", "expected"), MASKED_CASES)
def test_pattern_masks_secret(text: str, expected: str) -> None:
    assert Redactor().redact(text) == expected


@pytest.mark.parametrize("text", UNTOUCHED_CASES)
def test_pattern_leaves_text_untouched(text: str) -> None:
    assert Redactor().redact(text) == text


def test_redaction_is_idempotent() -> None:
    redactor = Redactor()
    for text, _ in MASKED_CASES:
        once = redactor.redact(text)
        assert redactor.redact(once) == once


def test_registered_secret_masked_anywhere() -> None:
    redactor = Redactor()
    redactor.add_secret("planted-Secret-91")
    assert redactor.redact("x planted-Secret-91y") == "x ***y"
    assert redactor.redact("planted-Secret-9") == "planted-Secret-9"


def test_registered_secret_url_encoded_form() -> None:
    redactor = Redactor()
    redactor.add_secret("p@ss/word 1")
    assert redactor.redact("u=p%40ss%2Fword%201") == "u=***"
    assert redactor.redact("q=p%40ss%2Fword+1") == "q=***"


def test_registered_multiline_secret_lines() -> None:
    redactor = Redactor()
    key = "-----BEGIN KEY-----\nAAAAB3NzaC1yc2EAAAADAQABAAAB\nshort\n-----END KEY-----"
    redactor.add_secret(key)
    assert redactor.redact("line AAAAB3NzaC1yc2EAAAADAQABAAAB") == "line ***"
    assert redactor.redact("short") == "short"


def test_registered_longest_secret_first() -> None:
    redactor = Redactor()
    redactor.add_secret("abcd")
    redactor.add_secret("abcdefgh")
    assert redactor.redact("abcdefgh") == MASK


def test_short_secret_rejected_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    redactor = Redactor()
    # The handler sits on the module logger, so the test works whatever propagation is set.
    module_logger = logging.getLogger("fraisier.redact")
    module_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="fraisier.redact"):
            redactor.add_secret("abc")
            redactor.add_secret("abc")
            redactor.add_secret("xy")
    finally:
        module_logger.removeHandler(caplog.handler)

    assert redactor.redact("abc") == "abc"
    # The handler may see a record twice (on the module logger and through propagation).
    warnings = {id(r): r.getMessage() for r in caplog.records}.values()
    assert sum("3 characters" in message for message in warnings) == 1
    assert sum("2 characters" in message for message in warnings) == 1
    assert "abc" not in caplog.text


def test_clear_forgets_registered_secrets() -> None:
    redactor = Redactor()
    redactor.add_secret("planted-secret")
    redactor.clear()
    assert redactor.redact("planted-secret") == "planted-secret"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("password", True),
        ("DB_PASSWORD", True),
        ("--api-key", True),
        ("client_secret", True),
        ("credentials", True),
        ("password_file", False),
        ("token_path", False),
        ("host", False),
        ("user", False),
        (3, False),
    ],
)
def test_is_secret_key(key: object, expected: bool) -> None:
    assert is_secret_key(key) is expected


def test_dict_values_under_secret_keys_masked() -> None:
    redactor = Redactor()
    config = {
        "database": {"url": "postgresql://u:pw1234@h/db", "password": "plain", "port": 5432},
        "api_token": 123456,
        "password_file": "/etc/pw",
        "credentials": {"user": "bob", "key": "k-1234", "enabled": True, "expires": None},
        "hosts": ["web1", "--token abc123"],
    }
    assert redactor.redact(config) == {
        "database": {"url": "postgresql://u:***@h/db", "password": MASK, "port": 5432},
        "api_token": MASK,
        "password_file": "/etc/pw",
        "credentials": {"user": MASK, "key": MASK, "enabled": True, "expires": None},
        "hosts": ["web1", "--token ***"],
    }


def test_input_not_modified() -> None:
    redactor = Redactor()
    config = {"password": "plain", "nested": ["--token abc123"]}
    redactor.redact(config)
    assert config == {"password": "plain", "nested": ["--token abc123"]}


def test_tuple_and_set_types_kept() -> None:
    redactor = Redactor()
    assert redactor.redact(("--token abc123", 1)) == ("--token ***", 1)
    assert redactor.redact({"PASSWORD=x1"}) == {"PASSWORD=***"}


def test_dataclass_records_redacted() -> None:
    redactor = Redactor()
    at = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    run = RunRecord(
        run_id="r1",
        environment="prod",
        fraise="api",
        task="deploy",
        started_at=at,
        git_ref="https://u:hunter2@git.example.test/o/r.git",
        error_message="psql failed: PGPASSWORD=hunter2",
    )
    masked = redactor.redact(run)
    assert isinstance(masked, RunRecord)
    assert masked.git_ref == "https://u:***@git.example.test/o/r.git"
    assert masked.error_message == "psql failed: PGPASSWORD=***"
    assert masked.started_at == at
    assert run.git_ref == "https://u:hunter2@git.example.test/o/r.git"

    event = AuditEvent(run_id="r1", kind="switched", at=at, detail={"secret": "x1x1"})
    assert dataclasses.asdict(redactor.redact(event))["detail"] == {"secret": MASK}


def test_other_values_returned_unchanged() -> None:
    redactor = Redactor()
    marker = object()
    assert redactor.redact(None) is None
    assert redactor.redact(42) == 42
    assert redactor.redact(marker) is marker
