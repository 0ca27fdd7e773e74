"""The "Triage this message" shortcut end to end over HTTP (``message_action`` → modal → labels), both DBs."""

from __future__ import annotations

from typing import Any

from bot import shortcut
from bot.storage.models import Correction, CorrectionKind, Message, MessageState, Prediction
from tests.test_bot import ADMIN, AGENT, CHANNEL, CUSTOMER, harness_factory  # noqa: F401

UNWATCHED = "C0ELSEWHERE"


def selects(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["element"]["action_id"]: b["element"] for b in view["blocks"] if b["type"] == "input"}


async def test_the_shortcut_labels_a_thread_reply_in_an_unwatched_channel(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory()
    parent = h.slack.message_event(UNWATCHED, CUSTOMER, "Our exports stopped working")
    assert (await h.slack.send_event(parent)).status == 200
    reply = h.slack.message_event(UNWATCHED, CUSTOMER, "Still broken, we lose data!", thread_ts=parent["ts"])
    assert (await h.slack.send_event(reply)).status == 200
    assert await h.count(Message) == 0  # not watched: the bot stored neither

    h.slack.add_user("U0PARTNER", "partner", team_id="T0OTHERORG")
    refused = await h.slack.send_message_action(
        shortcut.CALLBACK, UNWATCHED, reply["ts"], user_id="U0PARTNER"
    )
    assert refused.status == 200
    await h.slack.wait_for("chat.postEphemeral", predicate=lambda c: c.args["user"] == "U0PARTNER")
    response = await h.slack.send_message_action(shortcut.CALLBACK, UNWATCHED, reply["ts"], user_id=AGENT)
    assert response.status == 200 and response.elapsed < 3.0
    [opened] = await h.slack.wait_for("views.open", timeout=5)
    assert opened.args["view"]["callback_id"] == shortcut.CALLBACK and "submit" not in opened.args["view"]
    [filled] = await h.slack.wait_for("views.update", timeout=10)
    view = filled.args["view"]
    assert "Still broken, we lose data!" in str(view["blocks"]) and view["submit"]["text"] == "Save"
    menus = selects(view)
    assert set(menus) == {"label:topic", "label:urgency", "label:sentiment"}
    predicted = {a.removeprefix("label:"): m["initial_option"]["value"] for a, m in menus.items()}
    new_topic = "outage" if predicted["topic"] != "outage" else "billing"

    await h.slack.send_view_submission(
        {**{f"label:{h}": label for h, label in predicted.items()}, "label:topic": new_topic},
        view_id=filled.response["view"]["id"],
        user_id=AGENT,
    )

    async def labelled() -> list[Correction]:
        rows = await h.rows(Correction)
        return rows if len(rows) == 3 else []

    labels = {c.head: c for c in await h.eventually(labelled)}
    assert (labels["topic"].new_label, labels["topic"].kind) == (new_topic, CorrectionKind.CORRECTION)
    assert labels["urgency"].new_label == predicted["urgency"]
    assert labels["urgency"].kind == CorrectionKind.CONFIRMATION
    assert {c.user_id for c in labels.values()} == {AGENT}
    # nobody had labelled it: the label standing when the agent chose was the model's
    assert all(c.old_label == predicted[c.head] for c in labels.values())
    [message] = await h.rows(Message)
    assert (message.channel_id, message.ts, message.thread_ts) == (UNWATCHED, reply["ts"], parent["ts"])
    assert (message.text, message.user_id, message.state) == (
        reply["text"],
        CUSTOMER,
        MessageState.CLASSIFIED,
    )
    assert await h.count(Prediction) == 1
    assert h.slack.calls_to("chat.postMessage") == []  # nothing posted in a channel it does not watch
    assert len(h.slack.calls_to("views.open")) == 1  # the customer got no modal


async def test_the_shortcut_on_a_corrected_message_records_the_label_standing_then(
    harness_factory: Any,  # noqa: F811
) -> None:
    """``old_label`` is the label standing when a person labels (a colleague's here), wherever they do."""
    h = await harness_factory()
    event, _ = await h.post_customer_message("Export to CSV crashes the app every time")
    await h.reply_to(event["ts"])
    [prediction] = await h.eventually(lambda: h.rows(Prediction))
    model = {head: p.label for head, p in prediction.by_head().items()}
    emoji, colleagues = ("bug", "bug") if model["topic"] != "bug" else ("fire", "outage")
    await h.slack.send_event(h.slack.reaction_added_event(ADMIN, emoji, CHANNEL, event["ts"]))
    assert await h.eventually(lambda: h.count(Correction))

    await h.slack.send_message_action(shortcut.CALLBACK, CHANNEL, event["ts"], user_id=AGENT)
    [filled] = await h.slack.wait_for("views.update", timeout=10)
    chosen = {"label:topic": colleagues, "label:urgency": model["urgency"]}
    await h.slack.send_view_submission(chosen, view_id=filled.response["view"]["id"], user_id=AGENT)

    async def agents_labels() -> list[Correction]:
        rows = await h.rows(Correction, Correction.user_id == AGENT)
        return rows if len(rows) == 2 else []

    labels = {c.head: c for c in await h.eventually(agents_labels)}
    # agreeing with the colleague's label is a confirmation of it, not a change from the model's
    assert (labels["topic"].old_label, labels["topic"].kind) == (colleagues, CorrectionKind.CONFIRMATION)
    assert (labels["urgency"].old_label, labels["urgency"].kind) == (
        model["urgency"],
        CorrectionKind.CONFIRMATION,
    )
    assert await h.count(Prediction) == 1  # stored already: the shortcut adds no second prediction


def test_a_long_message_travels_in_the_modal_cut_to_slacks_limit() -> None:
    target = shortcut.Target("T1", "C1", "1.2", None, "U1", 'ü"' * 5000)
    encoded = target.metadata()
    assert len(encoded) <= shortcut.METADATA_LIMIT
    back = shortcut.Target.from_metadata(encoded)
    assert back is not None and back.channel_id == "C1" and target.text.startswith(back.text)
    assert len(back.text) > 500
    assert shortcut.Target.from_metadata("[1]") is None and shortcut.Target.from_metadata("{") is None
