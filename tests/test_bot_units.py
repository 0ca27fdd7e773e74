"""Bot pieces without Slack: settings validation, the reaction map, Block Kit, the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import bot.triage as triage_module
from bot import shortcut
from bot.blocks import LabelView, ordered_heads, ordered_labels, reply_blocks, retrain_summary_text
from bot.reactions import DEFAULT_REACTIONS, ReactionMap
from bot.retrain import RunOutcome
from bot.settings import SettingsError, load_settings
from bot.storage.models import TrainingStatus
from classifier.schema import DEFAULT_HEADS

ROOT = Path(__file__).resolve().parents[1]
BASE = {"_env_file": None, "slack_bot_token": "xoxb-1-2", "slack_signing_secret": "s3cret"}


def test_settings_report_each_problem_on_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError) as err:
        load_settings(
            _env_file=None,
            slack_bot_token="xoxp-user-token",
            triage_channels="C0OK,general",
            port=70000,
            triage_routes="outage",
        )
    lines = str(err.value).splitlines()
    assert sorted(lines) == [
        "PORT: Input should be less than or equal to 65535",
        "SLACK_BOT_TOKEN: must be a bot token starting with xoxb-",
        "TRIAGE_CHANNELS: not Slack channel ids: general (expected ids like C0123ABCD)",
        "TRIAGE_ROUTES: route 'outage' must look like topic=C0123ABCD",
    ]
    assert "xoxp-user-token" not in str(err.value)  # secrets never echoed
    with pytest.raises(SettingsError, match="SLACK_SIGNING_SECRET is required in HTTP mode"):
        load_settings(_env_file=None, slack_bot_token="xoxb-1")


def test_settings_never_echo_a_urls_password() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(**BASE, classifier_url="htp://triage:pa55word@classifier:8080")
    assert str(err.value) == "CLASSIFIER_URL: must be an http(s) URL, got 'htp://***@classifier:8080'"
    with pytest.raises(SettingsError, match="CLASSIFIER_URL carries a user and password") as err:
        load_settings(**BASE, classifier_url="http://triage:pa55word@classifier", classifier_token="t" * 20)
    assert "pa55word" not in str(err.value)


def test_settings_parse_lists_routes_and_socket_mode() -> None:
    s = load_settings(
        **BASE,
        triage_channels="C0A, C0B",
        triage_admins="U0X",
        triage_routes="outage=C0OPS",
        slack_app_token="xapp-1",
        slack_api_url="http://127.0.0.1:9/api",
    )
    assert s.triage_channels == ["C0A", "C0B"] and s.is_admin("U0X") and not s.is_admin("U0Y")
    assert s.routes == {"outage": "C0OPS"} and s.socket_mode and s.slack_api_url.endswith("/api/")
    assert s.watches("C0A") and not s.watches("C0Z")
    assert "xoxb-1-2" not in repr(s)


def test_triage_agents_take_user_and_group_ids_only() -> None:
    s = load_settings(**BASE, triage_agents="U0LEAD, S0SUPPORT,W0GRID", triage_triage_agents="true")
    assert s.triage_agents == ["U0LEAD", "S0SUPPORT", "W0GRID"] and s.triage_triage_agents
    assert load_settings(**BASE).triage_agents == [] and not load_settings(**BASE).triage_triage_agents
    assert load_settings(**BASE, triage_allowed_bots="B0FORMS").triage_allowed_bots == ["B0FORMS"]
    with pytest.raises(SettingsError, match="TRIAGE_ALLOWED_BOTS: not Slack bot ids: U0BOT"):
        load_settings(**BASE, triage_allowed_bots="U0BOT")
    with pytest.raises(SettingsError) as err:
        load_settings(**BASE, triage_agents="U0LEAD,@support,C0CHAN")
    assert str(err.value) == (
        "TRIAGE_AGENTS: not Slack user or user-group ids: @support, C0CHAN "
        "(expected ids like U0123ABCD or S0123ABCD)"
    )


def test_not_a_request_threshold_is_a_confidence() -> None:
    assert load_settings(**BASE).triage_not_a_request_above == 0.8
    with pytest.raises(
        SettingsError, match="TRIAGE_NOT_A_REQUEST_ABOVE: Input should be less than or equal to 1"
    ):
        load_settings(**BASE, triage_not_a_request_above="1.5")


def test_backfill_hours_are_validated() -> None:
    assert load_settings(**BASE).triage_backfill_hours == 24
    assert load_settings(**BASE, triage_backfill_hours="0").triage_backfill_hours == 0  # no backfill
    with pytest.raises(
        SettingsError, match="TRIAGE_BACKFILL_HOURS: Input should be greater than or equal to 0"
    ):
        load_settings(**BASE, triage_backfill_hours="-1")


def test_default_reaction_map_covers_every_default_label() -> None:
    reactions = ReactionMap(DEFAULT_REACTIONS)
    covered = {(action.head, action.label) for action in reactions.actions.values()}
    for head, labels in DEFAULT_HEADS.items():
        for label in labels:
            assert (head, label) in covered
    assert reactions.get("dart").confirms  # type: ignore[union-attr]
    assert reactions.get("white_check_mark") is None and reactions.get("rotating_light") is None
    assert reactions.get("bug::skin-tone-2") == reactions.get("bug")
    with pytest.raises(ValueError, match="must be 'head=label' or 'confirm'"):
        ReactionMap({"tada": "party"})


def test_emoji_that_mean_something_else_are_no_corrections(tmp_path: Path) -> None:
    """:rotating_light: is the bot's own urgency marker and :white_check_mark: means "resolved" to support
    teams: a reactions file that maps either is refused at start-up, naming why."""
    for emoji, why in (("rotating_light", "the bot's own marker"), ("white_check_mark", "'resolved'")):
        path = tmp_path / f"{emoji}.yaml"
        path.write_text(f"{emoji}: urgency=critical\nbug: topic=bug\n")
        with pytest.raises(ValueError, match=f"reaction '{emoji}' cannot be a correction: it is .*{why}"):
            ReactionMap.load(path)
    path = tmp_path / "ok.yaml"
    path.write_text("red_circle: urgency=critical\nheavy_check_mark: confirm\n")
    assert ReactionMap.load(path).confirm_emoji() == "heavy_check_mark"


def test_the_reaction_hint_names_urgency_first() -> None:
    views = {
        "topic": LabelView("bug", confidence=0.9),
        "urgency": LabelView("high", confidence=0.9),
        "sentiment": LabelView("neutral", confidence=0.9),
    }
    blocks = reply_blocks(7, views, "v3", ReactionMap(DEFAULT_REACTIONS), {}, unsure_below=0.5)
    notes = blocks[1]["elements"][0]["text"]
    hint = notes[notes.index("React to correct") :]
    assert hint.startswith(
        "React to correct: :large_green_circle: low · :large_yellow_circle: medium · "
        ":large_orange_circle: high · :red_circle: critical · "
    )
    assert hint.endswith(":dart: all labels right") and "rotating_light" not in hint


def test_reply_blocks_mark_unsure_and_corrections() -> None:
    views = {
        "topic": LabelView("bug", confidence=0.93),
        "urgency": LabelView("high", confidence=0.41),
        "sentiment": LabelView("negative", predicted="neutral", by="U0AGENT"),
    }
    blocks = reply_blocks(7, views, "v3", ReactionMap(DEFAULT_REACTIONS), {}, unsure_below=0.5)
    text = blocks[0]["text"]["text"]
    assert "*Topic:* bug  `93%`" in text and "high  `41%`  :grey_question: _unsure_" in text
    assert "~neutral~ → *negative*  _corrected by <@U0AGENT>_" in text
    assert blocks[-1]["elements"][0]["value"] == "7"


def test_display_order_is_the_products_not_the_databases() -> None:
    assert ordered_heads(["sentiment", "extra", "topic", "urgency"]) == [
        "topic",
        "urgency",
        "sentiment",
        "extra",
    ]
    assert ordered_labels("urgency", ["critical", "high", "low", "medium"]) == [
        "low",
        "medium",
        "high",
        "critical",
    ]


def test_manifest_matches_what_the_bot_handles() -> None:
    manifest = yaml.safe_load((ROOT / "manifest.yaml").read_text())
    assert {c["command"] for c in manifest["features"]["slash_commands"]} == {"/classify", "/triage"}
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == {
        "message.channels",
        "message.groups",
        "reaction_added",
        "reaction_removed",
        "app_home_opened",
    }
    assert manifest["features"]["app_home"]["home_tab_enabled"]
    [triage_message] = manifest["features"]["shortcuts"]
    assert (triage_message["type"], triage_message["callback_id"]) == ("message", shortcut.CALLBACK)
    assert manifest["settings"]["interactivity"]["is_enabled"]
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"chat:write", "reactions:read", "reactions:write", "commands", "channels:history"} <= scopes
    assert "users:read" in scopes  # users.info tells agents from guests and other organizations
    # conversations.info (shared channels, membership) for public and private channels; team.info
    assert {"channels:read", "groups:read", "team:read"} <= scopes


def test_an_outage_that_flaps_logs_one_traceback_a_minute_and_a_line_every_ten_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(triage_module.time, "monotonic", lambda: clock[0])
    outage = triage_module.OutageLog()
    error = ConnectionError("connection refused")
    with caplog.at_level("WARNING", logger="bot.triage"):
        outage.failed("sweep", error)  # the traceback
        for i in range(500):  # a burst of refused deliveries: counted, not logged one by one
            outage.failed(f"message {i} not stored", error)
        clock[0] += 10
        outage.failed("answering message 3", error)  # ten seconds on: one line with the count
        outage.failed("answering message 4", error)
        outage.recovered()
        clock[0] += 5
        outage.failed("sweep", error)  # a dead pooled connection right after recovery: a line, no traceback
        outage.recovered()
        clock[0] += 60
        outage.failed("sweep", error)  # a new outage a minute later: its traceback
    lines = [r.getMessage() for r in caplog.records]
    assert len([r for r in caplog.records if r.exc_info]) == 2
    assert len(lines) == 6, lines
    assert lines[1].startswith("answering message 3: database unavailable or too slow (ConnectionError")
    assert lines[1].endswith("; 500 more failures since the last line")
    assert lines[2] == "database reachable again; 1 more failure since the last line"
    assert lines[3].startswith("sweep: ") and lines[4] == "database reachable again"


def test_a_run_summary_names_heads_as_replies_do_and_reads_as_a_sentence() -> None:
    delta = {
        "incumbent": 0.7,
        "candidate": 0.75,
        "delta": 0.05,
        "incumbent_accuracy": 0.8,
        "candidate_accuracy": 0.82,
    }
    outcome = RunOutcome(
        TrainingStatus.REJECTED,
        candidate="v2",
        incumbent="v1",
        reasons=["urgency macro-F1 fell"],
        deltas={"sentiment": delta, "topic": delta, "urgency": delta},
        counts={"train": 100, "feedback": 10, "heldout": 20, "heldout_feedback": 2},
    )
    lines = retrain_summary_text(outcome).splitlines()
    assert lines[0] == ":no_entry: *v2* rejected; v1 stays active"
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["• Topic", "• Urgency", "• Sentiment"]
    assert "judged on 20 held-out examples (2 from Slack)" in lines[4]
