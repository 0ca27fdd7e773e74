"""App Home end to end over HTTP against the stand-in (``app_home_opened`` → ``views.publish``), both DBs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot import home, review
from bot.blocks import CONFIRM_MEANING, LabelView, reply_blocks
from bot.reactions import DEFAULT_REACTIONS, ReactionMap
from bot.retrain import run_lock
from bot.storage import repository as repo
from bot.storage.models import (
    AuditEntry,
    Correction,
    CorrectionKind,
    Prediction,
    TrainingRun,
    TrainingStatus,
    TrainingTrigger,
)
from classifier.registry import Registry
from tests.support.slack_standin import ApiCall
from tests.support.tiny_model import make_tiny_version
from tests.test_bot import ADMIN, AGENT, CHANNEL, harness_factory  # noqa: F401
from tests.test_retrain import _base_version


async def opened_home(h: Any, user: str, count: int = 1) -> ApiCall:
    response = await h.slack.send_event(h.slack.app_home_opened_event(user))
    assert response.status == 200
    published = await h.slack.wait_for(
        "views.publish", predicate=lambda c: c.args["user_id"] == user, count=count, timeout=10
    )
    assert published[-1].ok, published[-1].response
    return published[-1]


def shown(call: ApiCall) -> str:
    return str(call.args["view"]["blocks"])


async def classified(h: Any, n: int) -> None:
    async def done() -> bool:
        return await h.count(Prediction) >= n

    assert await h.eventually(done)


async def test_an_agents_home_shows_their_labels_the_queue_and_the_reactions(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory(triage_unsure_below=0.999)  # the tiny model is unsure of everything
    labelled, _ = await h.post_customer_message("We were charged twice for March")
    await h.post_customer_message("How do I export my data?")
    await classified(h, 2)
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "moneybag", CHANNEL, labelled["ts"]))

    async def labelled_by_agent() -> list[Correction]:
        return await h.rows(Correction)

    assert await h.eventually(labelled_by_agent)
    page = shown(await opened_home(h, AGENT))
    async with h.sessions() as session:
        [label] = await repo.recent_corrections(session, AGENT)
    assert home.correction_line(label) in page  # as recorded: when, where, head, old → new, how
    assert "(by :moneybag:)" in home.correction_line(label)
    assert "Review queue:* 1 message would" in page and "How do I export my data?" in page
    assert ":moneybag: Topic → billing" in page and ":dart: all labels right" in page
    assert "Model (admins)" not in page and home.RETRAIN_ACTION not in page

    # Confirm on the Home tab stores the labels and republishes it, the queue now empty
    view = h.slack.home_views[AGENT]
    [item] = [b for b in view["blocks"] if b.get("block_id", "").startswith("review:")]
    response = await h.slack.send_block_actions(
        [{"action_id": review.CONFIRM_ACTION}], user_id=AGENT, view_id=view["id"]
    )
    assert response.status == 200
    [_, again] = await h.slack.wait_for(
        "views.publish", predicate=lambda c: c.args["user_id"] == AGENT, count=2, timeout=10
    )
    assert "nothing waits for a look" in shown(again)
    message_id = int(item["block_id"].removeprefix("review:"))
    confirmed = await h.rows(Correction, Correction.message_id == message_id)
    assert {c.kind for c in confirmed} == {CorrectionKind.CONFIRMATION} and len(confirmed) == 3


async def test_an_admins_home_shows_the_model_and_retrains_and_rolls_back(
    harness_factory: Any,  # noqa: F811
    tiny_bert: Path,
    data_dir: Path,
) -> None:
    _base_version(Registry(data_dir / "models"), tiny_bert, steps=2)  # v1, active, with its dataset
    make_tiny_version(Registry(data_dir / "models"), tiny_bert, activate=False)  # v2
    h = await harness_factory(with_model=False)
    event, _ = await h.post_customer_message("The dashboard is down for everyone")
    await classified(h, 1)
    await h.slack.send_event(h.slack.reaction_added_event(AGENT, "fire", CHANNEL, event["ts"]))
    [label] = await h.eventually(lambda: h.rows(Correction))
    right = int(label.kind == CorrectionKind.CONFIRMATION)  # :fire: on what the model called an outage

    page = shown(await opened_home(h, ADMIN))
    assert "Model (admins)" in page and "*Model:* v1" in page
    assert f"• last 7 days: Topic {right:.0%} ({right}/1)" in page
    assert "Correction rate, last 7 days:*" in page and "*Last runs*\\nnone yet" in page
    controls = next(b for b in h.slack.home_views[ADMIN]["blocks"] if b.get("block_id") == "home_admin")
    rollback = next(e for e in controls["elements"] if e["action_id"] == home.ROLLBACK_ACTION)
    assert [o["value"] for o in rollback["options"]] == ["v2"]

    # Retrain: the modal opens at once, then shows the dry run's summary with a Start button
    view_id = h.slack.home_views[ADMIN]["id"]
    await h.slack.send_block_actions([{"action_id": home.RETRAIN_ACTION}], user_id=ADMIN, view_id=view_id)
    [opened] = await h.slack.wait_for("views.open", timeout=5)
    assert "Looking at the feedback" in str(opened.args["view"]) and "submit" not in opened.args["view"]
    [summary] = await h.slack.wait_for("views.update", timeout=20)
    assert "*Dry run* (active model v1)" in str(summary.args["view"])
    assert summary.args["view"]["submit"]["text"] == "Start"
    async with h.sessions.begin() as session:
        await repo.start_training_run(session, trigger=TrainingTrigger.SCHEDULE)
    async with run_lock(h.engine):  # one is running elsewhere: Start is answered, nothing is started
        await h.slack.send_view_submission(user_id=ADMIN)
        [_, after] = await h.slack.wait_for(
            "views.publish", predicate=lambda c: c.args["user_id"] == ADMIN, count=2, timeout=10
        )
    assert "Retraining is already running" in shown(after)
    assert h.bot.retrainer.process is None
    assert [(e.user_id, e.action) for e in await h.rows(AuditEntry)] == [(ADMIN, "retrain")]

    # an agent's click on an admin control does nothing
    await h.slack.send_block_actions(
        [{"action_id": home.ROLLBACK_ACTION, "value": "v2"}], user_id=AGENT, view_id=view_id
    )
    await h.slack.send_block_actions(
        [{"action_id": home.ROLLBACK_ACTION, "value": "v2"}], user_id=ADMIN, view_id=view_id
    )
    [*_, rolled] = await h.slack.wait_for(
        "views.publish", predicate=lambda c: c.args["user_id"] == ADMIN, count=3, timeout=15
    )
    assert "v2 is now the active model" in shown(rolled) and "*Model:* v2" in shown(rolled)
    assert [e.user_id for e in await h.rows(AuditEntry, AuditEntry.action == "rollback")] == [ADMIN]


def test_the_cheat_sheet_reads_as_the_reply_does_and_runs_say_how_they_started() -> None:
    """Heads in the reply's order, labels in menu order (low → critical), the confirm emoji last and named
    as the reply's hint names it; a run line says UTC and who started it in words."""
    lines = home.cheat_sheet(ReactionMap(DEFAULT_REACTIONS)).splitlines()
    heads = [line.split(" ", 1)[1].split(" →")[0] for line in lines[:-1]]
    assert heads == sorted(heads, key=["Topic", "Urgency", "Sentiment"].index)
    urgency = [line for line in lines if "Urgency →" in line]
    assert [u.rsplit(" ", 1)[1] for u in urgency] == ["low", "medium", "high", "critical"]
    assert lines[-1] == f":dart: {CONFIRM_MEANING}"
    hint = reply_blocks(1, {"topic": LabelView("bug", 0.9)}, "v1", ReactionMap(DEFAULT_REACTIONS), {})
    assert hint[1]["elements"][0]["text"].endswith(f":dart: {CONFIRM_MEANING}")
    run = TrainingRun(
        trigger=TrainingTrigger.COMMAND,
        status=TrainingStatus.FAILED,
        started_at=datetime(2026, 12, 1, 4, 22, tzinfo=UTC),
        error="boom",
    )
    assert home.run_line(run) == "• 2026-12-01 04:22 UTC, asked in Slack: failed: boom"
