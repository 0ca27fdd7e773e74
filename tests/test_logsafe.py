"""Strings made safe to log: escaped control characters, URLs without credentials."""

from __future__ import annotations

import pytest

from classifier.logsafe import escape_controls, redact_url


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("/x\n2026-12-01 INFO forged", "/x\\n2026-12-01 INFO forged"),
        ("a\rb\tc\x1b[2Jd\x7f", "a\\rb\\tc\\x1b[2Jd\\x7f"),
        ("nel\x85 ls\u2028 ps\u2029", "nel\\x85 ls\\u2028 ps\\u2029"),
        ("lone \ud800 surrogate", "lone \\ud800 surrogate"),
        ("ünïcödé 🙂 stays", "ünïcödé 🙂 stays"),
    ],
)
def test_escape_controls_leaves_one_printable_line(raw: str, shown: str) -> None:
    assert escape_controls(raw) == shown
    assert escape_controls(raw).splitlines() == [shown]
    escape_controls(raw).encode("utf-8")  # writable to any UTF-8 log stream


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pass@classifier:8080/v1", "http://***@classifier:8080/v1"),
        ("https://token@host", "https://***@host"),
        ("http://user:p@ss@host/x", "http://***@host/x"),  # an unencoded "@" in the password
        ("user:pass@host:8080", "***@host:8080"),  # no scheme
        ("http://host:8080/a@b?c=d@e", "http://host:8080/a@b?c=d@e"),  # "@" after the authority only
        ("http://classifier:8080", "http://classifier:8080"),
    ],
)
def test_redact_url_removes_user_and_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
