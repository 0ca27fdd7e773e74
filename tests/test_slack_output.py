"""One place for Slack output: every Web API write goes through ``bot.slack_output``."""

from __future__ import annotations

import re
from pathlib import Path

BOT = Path(__file__).resolve().parent.parent / "bot"
# slack_sdk's methods that write to Slack (posts, edits, deletions, reactions, views, uploads)
WRITES = re.compile(r"\.(chat_\w+|reactions_(add|remove)|views_\w+|files_\w+)\(")


def test_no_web_api_write_outside_the_output_module() -> None:
    offenders = [
        f"{path.relative_to(BOT.parent)}:{number}: {line.strip()}"
        for path in sorted(BOT.rglob("*.py"))
        if path.name != "slack_output.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if WRITES.search(line)
    ]
    assert offenders == []
