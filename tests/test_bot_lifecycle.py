"""Agents and customers, and the whole life of a message, end to end over real HTTP on both databases.

The stand-in's default user (``U0CUSTOMER``) belongs to another organization: a customer. Users it makes
up on first use (``U0AGENT``) are full members of the bot's workspace: agents.
"""

from __future__ import annotations

from typing import Any

from bot.storage.models import Correction, Message, MessageState, Prediction, SlackEvent
from tests.test_bot import AGENT, CHANNEL, CUSTOMER, harness_factory  # noqa: F401


async def test_a_customers_reaction_stores_nothing_and_an_agents_stores_a_correction(
    harness_factory: Any,  # noqa: F811
) -> None:
    h = await harness_factory()
    event, _ = await h.post_customer_message("Export to CSV crashes the app every time")
    reply = await h.reply_to(event["ts"])
    assert await h.eventually(lambda: h.count(Prediction))
    events_before = await h.count(SlackEvent)
    for ts in (event["ts"], reply.response["ts"]):  # on the message and on the bot's reply
        response = await h.slack.send_event(h.slack.reaction_added_event(CUSTOMER, "bug", CHANNEL, ts))
        assert response.status == 200  # acknowledged: not an error
    assert await h.count(Correction) == 0 and await h.count(SlackEvent) == events_before
    assert not h.slack.calls_to("chat.update")
    response = await h.slack.send_event(h.slack.reaction_added_event(AGENT, "bug", CHANNEL, event["ts"]))
    assert response.status == 200
    [correction] = await h.rows(Correction)
    assert (correction.user_id, correction.head, correction.new_label) == (AGENT, "topic", "bug")
    await h.slack.wait_for("chat.update", timeout=5)


async def test_agents_messages_are_not_triaged_unless_asked(harness_factory: Any) -> None:  # noqa: F811
    h = await harness_factory()
    agent_said = h.slack.message_event(CHANNEL, AGENT, "We are looking into it, hang on")
    assert (await h.slack.send_event(agent_said)).status == 200
    assert await h.eventually(lambda: h.count(Message, Message.state == MessageState.SKIPPED))
    [message] = await h.rows(Message)
    assert (message.text, message.last_error) == (None, "written by an agent")
    customer, _ = await h.post_customer_message("The dashboard is blank since this morning")
    await h.reply_to(customer["ts"])
    assert {c.args.get("thread_ts") for c in h.slack.calls_to("chat.postMessage")} == {customer["ts"]}

    h2 = await harness_factory(triage_triage_agents=True)
    agent_asks = h2.slack.message_event(CHANNEL, AGENT, "Does the export work for anyone?")
    await h2.slack.send_event(agent_asks)
    await h2.reply_to(agent_asks["ts"])


async def test_triage_agents_names_users_and_user_groups(harness_factory: Any) -> None:  # noqa: F811
    """With TRIAGE_AGENTS set, agents are exactly those people and the groups' members (looked up with
    usergroups.users.list): a workspace member outside them is a customer, whose labels do not count."""
    member, lead, groupie = "U0MEMBER", "U0LEAD", "U0GROUPIE"
    h = await harness_factory(
        triage_agents="U0LEAD,S0SUPPORT", prepare=lambda slack: slack.add_usergroup("S0SUPPORT", [groupie])
    )
    [lookup] = h.slack.calls_to("usergroups.users.list")
    assert lookup.args["usergroup"] == "S0SUPPORT" and lookup.response["users"] == [groupie]
    asked = h.slack.message_event(CHANNEL, member, "How do I export all invoices?")
    await h.slack.send_event(asked)
    await h.reply_to(asked["ts"])  # a member of the workspace, but not an agent: triaged
    assert await h.eventually(lambda: h.count(Prediction))
    for user in (member, lead, groupie):
        await h.slack.send_event(h.slack.reaction_added_event(user, "bug", CHANNEL, asked["ts"]))
    assert sorted(c.user_id for c in await h.rows(Correction)) == [groupie, lead]
    assert len(h.slack.calls_to("usergroups.users.list")) == 1  # cached
