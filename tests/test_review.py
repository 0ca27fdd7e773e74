"""The review queue: ranking and reasons on both databases, and `/triage review` end to end over HTTP."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import cards, review
from bot.settings import load_settings
from bot.storage import repository as repo
from bot.storage.models import Correction, CorrectionKind, CorrectionSource, Message, Prediction, utcnow
from classifier.results import HeadPrediction
from tests.test_bot import AGENT, CHANNEL, CUSTOMER, harness_factory  # noqa: F401

TOPICS = ["billing", "outage", "how_to", "not_a_request"]


def _head(scores: dict[str, float]) -> HeadPrediction:
    label = max(scores, key=lambda k: scores[k])
    return HeadPrediction(label=label, confidence=scores[label], scores=scores)


async def _stored(
    session: AsyncSession, n: int, text: str, topic: dict[str, float], minutes_ago: float = 10
) -> int:
    message, _ = await repo.store_message(
        session, team_id="T1", channel_id="C1", ts=f"1700000000.{n:06d}", user_id=CUSTOMER, text=text
    )
    await repo.add_prediction(session, message.id, "v1", {"topic": _head(topic)})
    await repo.mark_classified(session, message.id)
    message.received_at = utcnow() - timedelta(minutes=minutes_ago)
    return message.id


async def test_the_queue_ranks_by_uncertainty_collapses_near_duplicates_and_says_why(
    session_factory: async_sessionmaker[AsyncSession],
) -> None:
    settings = load_settings(
        _env_file=None, slack_bot_token="xoxb-1", slack_signing_secret="s", triage_unsure_below=0.6
    )
    sure = {"billing": 0.94, "outage": 0.02, "how_to": 0.02, "not_a_request": 0.02}
    tie = {"billing": 0.41, "outage": 0.39, "how_to": 0.1, "not_a_request": 0.1}
    unsure = {"billing": 0.55, "outage": 0.25, "how_to": 0.1, "not_a_request": 0.1}
    borderline = {"billing": 0.1, "outage": 0.05, "how_to": 0.02, "not_a_request": 0.83}
    async with session_factory.begin() as session:
        ids = {
            "sure": await _stored(session, 1, "Invoice 17 is wrong", sure),
            "tie": await _stored(session, 2, "Order 4411 is late!", tie),
            "tie twin": await _stored(session, 3, "order 4412 is late", tie, minutes_ago=20),
            "unsure": await _stored(session, 4, "Where do I change my card?", unsure),
            "borderline": await _stored(session, 5, "ok thanks, that works", borderline),
            "labelled": await _stored(session, 6, "The site is down", unsure),
            "disputed": await _stored(session, 7, "Refund for order 9", sure),
            "old": await _stored(session, 8, "Ancient question", tie, minutes_ago=60 * 24 * 30),
        }
        await repo.add_correction(session, ids["labelled"], "topic", "outage", user_id=AGENT, source="button")
        await repo.add_correction(
            session, ids["disputed"], "topic", "billing", user_id=AGENT, source="button"
        )
        await repo.add_correction(
            session, ids["disputed"], "topic", "how_to", user_id="U0OTHER", source="button"
        )
    queue = await review.ReviewQueue(settings, session_factory).current()
    order = [next(k for k, v in ids.items() if v == item.message.id) for item in queue.items]
    assert order == ["disputed", "tie", "unsure", "borderline"]
    reasons = {order[i]: item.reasons for i, item in enumerate(queue.items)}
    assert reasons["disputed"] == ["agents disagree on topic"]
    assert reasons["tie"] == ["unsure of topic (41%)"] and queue.items[1].similar == 1
    assert reasons["borderline"] == ["borderline not a request (83%)"]
    assert queue.items[0].labels == {"topic": "how_to"}  # the latest person's label is what shows

    # a class that people keep correcting is looked at even when the model is sure of it
    async with session_factory.begin() as session:
        for n in range(review.MIN_JUDGED):
            judged = await _stored(session, 100 + n, f"Bill question {n * 'x'}", sure)
            await repo.add_correction(session, judged, "topic", "how_to", user_id=AGENT, source="button")
    queue = await review.ReviewQueue(settings, session_factory).current()
    [weak] = [i for i in queue.items if i.message.id == ids["sure"]]
    assert weak.reasons == ["billing is often wrong lately (0% right)"]


async def test_review_command_confirm_and_fix_end_to_end(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory(triage_unsure_below=0.999)  # the tiny model is unsure of everything
    texts = ["Order 4411 is late!", "order 4412 is late", "The API returns 503 since noon"]
    for text in texts:
        await h.post_customer_message(text)

    async def classified() -> bool:
        return await h.count(Prediction) == len(texts)

    assert await h.eventually(classified)
    h.slack.add_user("U0PARTNER1", "partner", team_id="T0OTHERORG")
    refused = await h.slack.send_command("/triage", "review", user_id="U0PARTNER1", channel_id=CHANNEL)
    assert "support team" in refused.json()["text"]

    async def shown_queue(n: int) -> list[dict[str, Any]]:
        response = await h.slack.send_command("/triage", "review", user_id=AGENT, channel_id=CHANNEL)
        assert response.json()["response_type"] == "ephemeral"
        [*_, posted] = await h.slack.wait_for_response(
            count=n, predicate=lambda r: r.body.get("text") == "Review queue", timeout=8
        )
        assert posted.body["replace_original"] is True and posted.context["user_id"] == AGENT
        return list(posted.body["blocks"])

    shown = await shown_queue(1)
    items = [b for b in shown if b["type"] == "actions"]
    assert len(items) == 2  # the two late orders are one item
    assert "+1 similar" in str(shown)
    for block in items:
        assert [e["action_id"] for e in block["elements"]] == [review.CONFIRM_ACTION, cards.FIX_ACTION]
    first, second = (int(b["block_id"].removeprefix("review:")) for b in items)

    # a customer's Confirm (however they got the button) stores nothing
    await h.slack.send_block_actions(
        [{"action_id": review.CONFIRM_ACTION, "value": str(first), "block_id": f"review:{first}"}],
        user_id="U0PARTNER1",
        channel_id=CHANNEL,
        is_ephemeral=True,
        message_ts="1.0",
    )
    await h.slack.wait_for("chat.postEphemeral", predicate=lambda c: c.args["user"] == "U0PARTNER1")
    assert await h.count(Correction) == 0

    confirmed = await h.slack.send_block_actions(
        [{"action_id": review.CONFIRM_ACTION, "value": str(first), "block_id": f"review:{first}"}],
        user_id=AGENT,
        channel_id=CHANNEL,
        is_ephemeral=True,
        message_ts="1.0",
    )
    assert confirmed.status == 200
    [*_, refreshed] = await h.slack.wait_for_response(
        count=2, predicate=lambda r: r.body.get("text") == "Review queue", timeout=8
    )
    rows = await h.rows(Correction, Correction.message_id == first)
    assert {r.head for r in rows} == {"topic", "urgency", "sentiment"}
    assert all(
        (r.kind, r.source, r.user_id) == (CorrectionKind.CONFIRMATION, CorrectionSource.BUTTON, AGENT)
        for r in rows
    )
    assert f"review:{first}" not in str(refreshed.body["blocks"])
    assert "similar" not in str(refreshed.body["blocks"])  # the twin shows by itself now

    await h.slack.send_block_actions(
        [{"action_id": cards.FIX_ACTION, "value": str(second), "block_id": f"review:{second}"}],
        user_id=AGENT,
        channel_id=CHANNEL,
        is_ephemeral=True,
        message_ts="1.0",
    )
    [opened] = await h.slack.wait_for("views.open", timeout=5)
    assert opened.args["view"]["callback_id"] == cards.FIX_LABELS_CALLBACK
    assert opened.args["view"]["private_metadata"] == str(second)
    [topic] = [b for b in opened.args["view"]["blocks"] if b.get("block_id") == "head:topic"]
    new_topic = "outage" if topic["element"]["initial_option"]["value"] != "outage" else "billing"
    await h.slack.send_view_submission({"label:topic": new_topic}, user_id=AGENT)

    async def fixed() -> list[Correction]:
        return await h.rows(Correction, Correction.message_id == second)

    [fix] = await h.eventually(fixed)
    assert (fix.head, fix.new_label, fix.user_id, fix.kind) == ("topic", new_topic, AGENT, "correction")
    after = await shown_queue(3)
    assert f"review:{second}" not in str(after) and f"review:{first}" not in str(after)


def test_an_item_quotes_on_its_own_lines_and_names_heads_as_the_reply_does() -> None:
    """The quote starts a line (mid-line, "> " is a literal ">"), heads and reasons follow the reply's
    order (not the database's alphabetical one), and the headline counts in words."""
    message = Message(
        id=9, channel_id=CHANNEL, ts="1.2", text="Export fails\nsince noon", received_at=utcnow()
    )
    labels = {"sentiment": "negative", "topic": "bug", "urgency": "high"}
    item = review.ReviewItem(message, "v1", labels, ["unsure of topic (41%)"], 0.9)
    [section, _, _] = review.item_blocks(item)
    assert section["text"]["text"] == (
        f"In <#{CHANNEL}>:\n> Export fails\n> since noon\n"
        "Topic: *bug* · Urgency: *high* · Sentiment: *negative*"
    )
    assert review.queue_blocks(review.Queue([item]))[0]["text"]["text"] == (
        "*Review queue:* 1 message would teach the model most:"
    )
    many = review.queue_blocks(review.Queue([item] * 7))[0]["text"]["text"]
    assert many == "*Review queue:* 7 messages would teach the model most; the top 5:"
    settings = load_settings(_env_file=None, slack_bot_token="xoxb-1", slack_signing_secret="s")
    unsure = {h: _head({"a": 0.4, "b": 0.35, "c": 0.25}) for h in ("sentiment", "topic", "urgency")}
    prediction = Prediction(model_version="v1")
    candidate = repo.Candidate(message, prediction, {}, {})
    prediction.by_head = lambda: unsure  # type: ignore[method-assign]
    ranked = review.rank([candidate], settings, {})
    assert [r.split(" (")[0] for r in ranked[0].reasons] == [
        "unsure of topic",
        "unsure of urgency",
        "unsure of sentiment",
    ]
