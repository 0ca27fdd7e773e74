"""The feedback loop on a tiny model, on SQLite and PostgreSQL: promotion, rejection, locking, crashes."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.retrain import (
    Acceptance,
    Retrainer,
    RunBusy,
    RunOptions,
    RunRequest,
    dataset_for_run,
    describe_dry_run,
    merge_feedback,
    run_lock,
    run_once,
    split_for_run,
    start_child,
)
from bot.storage import repository as repo
from bot.storage.database import create_db_engine, create_session_factory, upgrade_database
from bot.storage.models import (
    CorrectionSource,
    TrainingRun,
    TrainingStatus,
    TrainingTrigger,
    utcnow,
)
from classifier.data import Example, normalize, read_jsonl, split_examples
from classifier.promotion import Gate
from classifier.registry import Registry
from classifier.results import HeadPrediction
from classifier.schema import LabelSchema
from classifier.train import TrainConfig, train
from tests.support.model_fixtures import TOPIC_WORDS, learnable_rows

SCHEMA = LabelSchema(heads={"topic": ["billing", "bug", "outage"]})


def _examples(rows: list[dict[str, str]]) -> list[Example]:
    return [
        Example(text=r["text"], labels={"topic": r["topic"]}, source=f"base:{i}") for i, r in enumerate(rows)
    ]


@pytest.fixture
async def db(database_url: URL) -> AsyncIterator[tuple[AsyncEngine, async_sessionmaker[AsyncSession]]]:
    await upgrade_database(database_url)
    engine = create_db_engine(database_url)
    yield engine, create_session_factory(engine)
    await engine.dispose()


def _base_version(registry: Registry, tiny_bert: Path, steps: int | None, seed: int = 0) -> str:
    """v1: trained on the base rows; ``steps`` small = a weak model that feedback can improve."""
    config = TrainConfig(
        base_model=str(tiny_bert),
        epochs=4,
        learning_rate=2e-3,
        batch_size=16,
        max_length=24,
        max_steps=steps,
        patience=0,
        seed=seed,
    )
    return train(
        _examples(learnable_rows(120, seed=seed)), SCHEMA, config, registry, progress=False
    ).version.name


async def _store_feedback(sessions: async_sessionmaker[AsyncSession], rows: list[dict[str, str]]) -> None:
    async with sessions.begin() as session:
        for i, row in enumerate(rows):
            message, _ = await repo.store_message(
                session,
                team_id="T1",
                channel_id="C1",
                ts=f"1700000000.{i:06d}",
                user_id="U1",
                text=row["text"],
            )
            await repo.add_prediction(
                session, message.id, "v1", {"topic": HeadPrediction("billing", 0.5, {})}
            )
            await repo.add_correction(
                session,
                message.id,
                "topic",
                row["topic"],
                user_id="U2",
                source=CorrectionSource.REACTION,
                old_label="billing",
                reaction="bug",
            )


async def test_retrain_from_corrections_promotes_a_better_model(
    tiny_bert: Path, data_dir: Path, db: Any
) -> None:
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)  # barely trained
    await _store_feedback(sessions, learnable_rows(300, seed=5))
    events: list[dict[str, Any]] = []
    outcome = await run_once(
        sessions, engine, registry, trigger=TrainingTrigger.CLI, epochs=4, on_progress=events.append
    )
    assert outcome.status == TrainingStatus.PROMOTED, outcome.summary()
    assert registry.active_name() == "v2" and registry.get("v1").status == "retired"
    assert outcome.counts["feedback"] > 200 and outcome.counts["heldout_feedback"] > 0
    assert outcome.counts["accepted"] == 0  # every prediction was corrected (and is younger than a day)
    assert f"{outcome.counts['feedback']} from Slack feedback, 0 accepted predictions" in outcome.summary()
    assert outcome.deltas["topic"]["delta"] > 0
    assert events[0]["event"] == "dataset" and events[-1]["event"] == "done"
    assert any(e["event"] == "epoch" for e in events)
    async with sessions() as session:
        run = await repo.latest_training_run(session)
    assert run is not None and run.status == TrainingStatus.PROMOTED and run.candidate_version == "v2"
    # the held-out feedback is exactly the feedback the active version's split keeps out of training
    # (train() splits the run's rows the same way), so the candidate never trains on it
    recorded = read_jsonl(Path(registry.get("v2").path) / "dataset.jsonl")
    held_out = split_for_run(registry.get("v1"), recorded)["test"]
    assert sum(e.source.startswith("slack:") for e in held_out) == outcome.counts["heldout_feedback"]
    assert len(held_out) == outcome.counts["heldout"] == registry.get("v2").data["splits"]["test"]
    assert outcome.confusion_png and outcome.confusion_png.endswith("confusion_topic.png")  # checked to exist


async def test_gate_rejects_a_worse_candidate(tiny_bert: Path, data_dir: Path, db: Any) -> None:
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=None)  # a good model
    rng = random.Random(1)
    random_labels = [{**r, "topic": rng.choice(list(TOPIC_WORDS))} for r in learnable_rows(400, seed=9)]
    await _store_feedback(sessions, _outside_held_out(registry, random_labels))  # agents who label at random
    outcome = await run_once(sessions, engine, registry, trigger=TrainingTrigger.CLI, epochs=3)
    assert outcome.status == TrainingStatus.REJECTED, outcome.summary()
    assert registry.active_name() == "v1"
    assert registry.get("v2").status == "rejected" and registry.get("v2").reason


def _outside_held_out(registry: Registry, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The feedback rows a run would not hold out (dropping held-out ones until none is), so that agents
    who label at random are not also the judges: the held-out rows stay the base data's."""
    active = registry.active()
    base = read_jsonl(Path(active.path) / "dataset.jsonl")
    keep = rows
    while True:
        feedback = [repo.TrainingExample(i, r["text"], {"topic": r["topic"]}) for i, r in enumerate(keep)]
        held_out = {normalize(e.text) for e in split_for_run(active, merge_feedback(base, feedback))["test"]}
        if not any(normalize(r["text"]) in held_out for r in keep):
            return keep
        keep = [r for r in keep if normalize(r["text"]) not in held_out]


def test_gate_rules() -> None:
    def report(f1: float, recall: float, support: int = 20) -> dict[str, Any]:
        per_class = {"bug": {"recall": recall, "support": support}}
        return {"heads": {"topic": {"macro_f1": f1, "per_class": per_class}}}

    gate = Gate(tolerance=0.01, max_recall_drop=0.1)
    assert gate.decide(report(0.80, 0.8), report(0.75, 0.8)) == (True, [])
    ok, reasons = gate.decide(report(0.80, 0.6), report(0.75, 0.8))  # 4 rows lost at best
    assert ok, reasons  # ... is within chance (p = 1/16 > 0.05)
    ok, reasons = gate.decide(report(0.80, 0.5), report(0.75, 0.8))  # 6 rows lost
    assert not ok and "bug recall fell 0.30" in reasons[0] and "p=0.016" in reasons[0]
    ok, reasons = gate.decide(report(0.75, 0.8), report(0.75, 0.8))
    assert not ok and "not better" in reasons[0]
    ok, reasons = gate.decide(report(0.80, 0.0, support=4), report(0.75, 1.0, support=4))
    assert ok, "classes under min_support are not judged"


def test_gate_judges_a_class_drop_pairwise() -> None:
    """The same 13 held-out rows of a class, recall 0.85 → 0.69 or lower: noise if rows flipped both ways,
    a regression if the candidate only lost rows."""

    def report(f1: float, predicted: list[str]) -> dict[str, Any]:
        truth = ["bug"] * 13
        recall = sum(p == "bug" for p in predicted) / 13
        return {
            "heads": {
                "topic": {
                    "macro_f1": f1,
                    "per_class": {"bug": {"recall": recall, "support": 13}},
                    "rows": {"true": truth, "predicted": predicted},
                }
            }
        }

    incumbent = report(0.70, ["bug"] * 11 + ["other"] * 2)
    churn = report(0.75, ["other"] * 4 + ["bug"] * 9)  # 4 lost, 2 gained
    assert Gate().decide(churn, incumbent) == (True, [])
    worse = report(0.75, ["bug"] * 4 + ["other"] * 9)  # 7 lost, 0 gained
    ok, reasons = Gate().decide(worse, incumbent)
    assert not ok and reasons == [
        "topic=bug recall fell 0.54 (limit 0.10; 7 held-out rows lost, 0 gained, p=0.008)"
    ]
    assert Gate(recall_drop_alpha=0.001).decide(worse, incumbent)[0]


def test_feedback_overrides_base_labels_and_old_feedback_is_reread() -> None:
    base = [
        Example("Refund please", {"topic": "billing"}, "a.csv:2"),
        Example("stale feedback", {"topic": "bug"}, "slack:7"),
    ]
    feedback = [repo.TrainingExample(message_id=9, text="refund  please", labels={"topic": "bug"})]
    merged = merge_feedback(base, feedback)
    assert [(e.text, e.labels, e.source) for e in merged] == [("Refund please", {"topic": "bug"}, "slack:9")]

    accepted = [
        repo.TrainingExample(message_id=9, text="refund please", labels={"urgency": "low"}),
        repo.TrainingExample(message_id=10, text="App crashes", labels={"topic": "bug", "urgency": "high"}),
        repo.TrainingExample(message_id=11, text="Site down", labels={"urgency": "critical"}),
    ]
    feedback.append(repo.TrainingExample(message_id=11, text="site down", labels={"topic": "outage"}))
    merged = merge_feedback(base, feedback, accepted)
    assert [(e.text, e.labels, e.source) for e in merged] == [
        ("Refund please", {"topic": "bug"}, "slack:9"),  # a curated base text takes no accepted label
        ("App crashes", {"topic": "bug", "urgency": "high"}, "slack:accepted:10"),
        ("Site down", {"urgency": "critical", "topic": "outage"}, "slack:11"),  # people fixed the topic
    ]
    # what nobody corrected trains but is never judged on; what people labeled is
    assert [e.train_only for e in merged] == [(), ("topic", "urgency"), ("urgency",)]


async def _retrain_process(
    database_url: URL, options: RunOptions | None = None
) -> asyncio.subprocess.Process:
    """``python -m bot.retrain`` as the bot starts it: its own process (in the ``data_dir`` fixture's data
    directory), progress as JSON lines."""
    url = database_url.render_as_string(hide_password=False)
    return await start_child(RunRequest(options or RunOptions(), TrainingTrigger.CLI, database_url=url))


async def test_one_run_at_a_time(tiny_bert: Path, data_dir: Path, db: Any) -> None:
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    await _store_feedback(sessions, learnable_rows(60, seed=5))
    results = await asyncio.gather(
        run_once(
            sessions, engine, registry, trigger=TrainingTrigger.COMMAND, requested_by="U0ADMIN", epochs=1
        ),
        run_once(sessions, engine, registry, trigger=TrainingTrigger.SCHEDULE, epochs=1),
        return_exceptions=True,
    )
    assert sum(isinstance(r, RunBusy) for r in results) == 1
    async with sessions() as session:
        runs = list((await session.scalars(select(TrainingRun))).all())
    assert len(runs) == 1


async def test_busy_answer_names_who_and_when(
    tiny_bert: Path, data_dir: Path, db: Any, database_url: URL
) -> None:
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    async with run_lock(engine):
        async with sessions.begin() as session:
            await repo.start_training_run(session, trigger=TrainingTrigger.COMMAND, requested_by="U0ADMIN")
        proc = await _retrain_process(database_url)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 3
    message = json.loads(out.decode().strip().splitlines()[-1])
    assert message["event"] == "busy" and "already running, started by <@U0ADMIN> at" in message["message"]


async def test_killed_run_leaves_active_model_and_next_run_proceeds(
    tiny_bert: Path, data_dir: Path, db: Any, database_url: URL
) -> None:
    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    await _store_feedback(sessions, learnable_rows(800, seed=5))  # enough work to be killed mid-training
    retrainer = Retrainer(sessions, engine, post=_nowhere)  # the bot's side: /triage retrain, the schedule
    assert await retrainer.busy_message() is None
    proc = await _retrain_process(database_url, RunOptions(epochs=50))
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
    assert json.loads(line)["event"] == "dataset"  # the run holds the lock and its 'running' row exists
    assert "already running, started by cli" in (await retrainer.busy_message() or "")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert registry.active_name() == "v1" and registry.names() == ["v1"]
    # the row still says 'running', but nothing holds the lock: not busy
    async with sessions() as session:
        stale = await repo.latest_training_run(session)
    assert stale is not None and stale.status == TrainingStatus.RUNNING
    assert await retrainer.busy_message() is None
    await _store_feedback_more(sessions)
    outcome = await run_once(sessions, engine, registry, trigger=TrainingTrigger.CLI, epochs=1)
    assert outcome.status in (TrainingStatus.PROMOTED, TrainingStatus.REJECTED)
    assert not list(registry.root.glob(".staging-*"))  # the killed run's leftovers are gone
    async with sessions() as session:
        runs = list((await session.scalars(select(TrainingRun).order_by(TrainingRun.id))).all())
    assert runs[0].status == TrainingStatus.FAILED and "abandoned" in (runs[0].error or "")


async def _nowhere(channel: str, text: str, thread_ts: str | None) -> str | None:
    return None


async def _store_feedback_more(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as session:
        message, _ = await repo.store_message(
            session, team_id="T1", channel_id="C9", ts="1.1", user_id="U1", text="refund invoice again please"
        )
        await repo.add_correction(
            session, message.id, "topic", "billing", user_id="U2", source=CorrectionSource.BUTTON
        )


async def test_predictions_nobody_corrected_become_training_labels(
    tiny_bert: Path, data_dir: Path, db: Any
) -> None:
    """What people let stand for the review window is a label for the heads they did not fix: newest
    messages first, only the latest prediction, never a forgotten person's text, never in the held-out
    (test-split) rows, and never over a human label."""
    _, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    now = utcnow()
    day_ago, hour_ago = now - timedelta(hours=30), now - timedelta(hours=1)
    texts = [f"my card payment {i} failed twice today" for i in range(40)]
    train_texts, test_text = texts[:5], texts[5]

    def both(label: str, confidence: float = 0.9) -> dict[str, HeadPrediction]:
        return {"topic": HeadPrediction(label, confidence, {}), "urgency": HeadPrediction("low", 0.8, {})}

    async with sessions.begin() as session:
        ids = {}
        for i, text in enumerate([*train_texts[:5], test_text]):
            message, _ = await repo.store_message(
                session, team_id="T1", channel_id="C1", ts=f"1700000001.{i:06d}", user_id="U1", text=text
            )
            ids[text] = message.id
            await repo.add_prediction(session, message.id, "v1", both("bug"), now=day_ago)
        a, b, c, d, e = train_texts[:5]
        await repo.add_prediction(session, ids[b], "v2", both("outage"), now=day_ago + timedelta(hours=1))
        await repo.add_correction(
            session,
            ids[c],
            "topic",
            "billing",
            user_id="U2",
            source=CorrectionSource.BUTTON,
            old_label="bug",
            now=hour_ago,
        )
        await repo.add_prediction(session, ids[d], "v2", both("outage"), now=hour_ago)  # too recent
        fresh, _ = await repo.store_message(
            session, team_id="T1", channel_id="C1", ts="1700000002.000001", user_id="U9", text=e + " again"
        )
        await repo.add_prediction(session, fresh.id, "v1", both("bug"), now=day_ago)
        await repo.forget_user(session, "U9")

    async with sessions() as session:
        rows = await repo.export_accepted_predictions(
            session,
            until=now,
            predicted_before=now - timedelta(hours=24),
            heads=["topic", "urgency"],
            limit=100,
        )
        newest_two = await repo.export_accepted_predictions(
            session, until=now, predicted_before=now, heads=["topic"], limit=2
        )
    got = {r.text: r.labels for r in rows}
    assert got[a] == {"topic": "bug", "urgency": "low"}
    assert got[b] == {"topic": "outage", "urgency": "low"}  # the latest prediction
    assert got[c] == {"urgency": "low"}  # people fixed the topic: theirs is the only topic label
    assert d not in got  # its latest prediction is still inside the review window
    assert e + " again" not in got  # forgotten
    assert [r.message_id for r in newest_two] == sorted(r.message_id for r in newest_two)
    assert {r.text for r in newest_two} == {e, test_text}

    # in a run: accepted labels train, human ones win, and nothing accepted reaches the held-out rows
    active, examples, _ = await dataset_for_run(sessions, registry, now, Acceptance(after_hours=24))
    by_text = {ex.text: ex for ex in examples}
    assert by_text[a].labels == {"topic": "bug"} and by_text[a].source.startswith("slack:accepted:")
    assert by_text[a].train_only == ("topic",) and by_text[test_text].train_only == ("topic",)
    assert by_text[c].labels == {"topic": "billing"} and by_text[c].source == f"slack:{ids[c]}"
    splits = split_for_run(active, examples)
    assert {e.text for e in examples if e.train_only} <= {e.text for e in splits["train"]}
    assert not any(e.source.startswith("slack:accepted:") for e in splits["validation"] + splits["test"])
    _, off, _ = await dataset_for_run(sessions, registry, now, Acceptance(max_rows=0))
    assert not any(ex.source.startswith("slack:accepted:") for ex in off)


async def test_dry_run_describes_the_dataset_and_trains_nothing(
    tiny_bert: Path, data_dir: Path, db: Any
) -> None:
    _, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    rows = learnable_rows(40, seed=3)
    await _store_feedback(sessions, rows)
    silent = [f"the dashboard {i} will not load" for i in range(3)]
    async with sessions.begin() as session:
        for i, text in enumerate(silent):
            message, _ = await repo.store_message(
                session, team_id="T1", channel_id="C2", ts=f"1700000003.{i:06d}", user_id="U1", text=text
            )
            await repo.add_prediction(session, message.id, "v1", {"topic": HeadPrediction("bug", 0.9, {})})
    text = await describe_dry_run(sessions, registry, Acceptance(after_hours=0))
    _, examples, _ = await dataset_for_run(sessions, registry, utcnow(), Acceptance(after_hours=0))
    held_out = sum(e.source.startswith("slack:") for e in split_examples(examples, heads=["topic"])["test"])
    assert held_out > 0
    assert f"{len(rows)} with labels from Slack ({held_out} of them held out for judging)" in text
    assert "3 with predictions nobody corrected" in text
    assert "New since the last run: 40 corrections, 0 confirmations." in text
    assert "topic (from Slack):" in text
    assert [v.name for v in registry.list()] == ["v1"]  # nothing trained


# --- forgetting reaches every copy ----------------------------------------------------------------------
SECRET = "Zq7secret"


def _files_holding(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (the SQLite file and its WAL included)."""
    raw = needle.encode()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and raw in p.read_bytes())


async def _rows_holding(sessions: async_sessionmaker[AsyncSession], needle: str) -> list[str]:
    """Every table row (of the application's tables) that holds ``needle`` in any column."""
    from bot.storage.models import Base

    found = []
    async with sessions() as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(table.select())).all():
                if needle in repr(tuple(row)):
                    found.append(f"{table.name}: {row}")
    return found


@pytest.mark.parametrize("removal", ["forget", "purge", "retention"])
async def test_removed_texts_leave_every_file_and_table(
    tiny_bert: Path, data_dir: Path, tmp_path: Path, database_url: URL, db: Any, removal: str
) -> None:
    import typer
    from typer.testing import CliRunner

    from bot.scheduler import housekeeping
    from bot.settings import load_settings
    from bot.storage.cli import register

    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    await _store_feedback(sessions, learnable_rows(60, seed=5))
    # the same words under three labels: some of them are surely predicted wrong, so they reach the
    # wrong_predictions.csv reports as well as dataset.jsonl; the stratified split holds some of them out
    chosen = [f"{SECRET} invoice crash down number {i}" for i in range(24)]
    old = utcnow() - timedelta(days=40)
    async with sessions.begin() as session:
        for i, text in enumerate(chosen):
            message, _ = await repo.store_message(
                session,
                team_id="T1",
                channel_id="C9",
                ts=f"1700000009.{i:06d}",
                user_id="U777",
                text=text,
                received_at=old if removal != "forget" else None,
            )
            await repo.add_correction(
                session,
                message.id,
                "topic",
                ["billing", "bug", "outage"][i % 3],
                user_id="U2",
                source=CorrectionSource.BUTTON,
            )
    outcome = await run_once(sessions, engine, registry, trigger=TrainingTrigger.CLI, epochs=1)
    assert outcome.candidate == "v2", outcome.summary()
    held = _files_holding(tmp_path, SECRET)
    assert "data/models/v2/dataset.jsonl" in held
    assert any(name.endswith("wrong_predictions.csv") for name in held), held

    if removal == "retention":  # the bot's hourly housekeeping with TRIAGE_RETENTION_DAYS=30
        settings = load_settings(
            _env_file=None, slack_bot_token="xoxb-1", slack_signing_secret="s", triage_retention_days=30
        )
        await housekeeping(settings, engine, sessions)
    else:
        app, data = typer.Typer(), typer.Typer()
        register(app, data_app=data)
        app.add_typer(data, name="data")
        url = ["--database-url", database_url.render_as_string(hide_password=False)]
        command = ["forget", "--user", "U777", "--yes"] if removal == "forget" else ["purge", "--days", "30"]
        result = await asyncio.to_thread(CliRunner().invoke, app, ["data", *command, *url])
        assert result.exit_code == 0, result.output
        assert f"erased {len(chosen)} row(s) from model versions" in result.output, result.output

    assert _files_holding(tmp_path, SECRET) == []
    assert await _rows_holding(sessions, SECRET) == []
    # the rest of the version is intact, and it says what was taken out of the data it was trained on
    kept = read_jsonl(Path(registry.get("v2").path) / "dataset.jsonl")
    assert len(kept) > 100 and all("C9" not in e.text for e in kept)
    assert registry.get("v2").data["erased_rows"] == len(chosen)
    async with sessions() as session:
        assert len(await repo.export_training_set(session, until=utcnow())) == 60  # U1's rows stay


GATE_ENV = {
    "TRIAGE_GATE_TOLERANCE": "0.03",
    "TRIAGE_GATE_MAX_RECALL_DROP": "0.2",
    "TRIAGE_GATE_RECALL_DROP_ALPHA": "0.01",
    "TRIAGE_RETRAIN_ACCEPT_AFTER_HOURS": "6",
    "TRIAGE_RETRAIN_MAX_ACCEPTED": "50",
    "TRIAGE_RETRAIN_EPOCHS": "2",
    "CLASSIFIER_BACKEND": "torch",
}


def test_triage_retrain_and_the_bot_build_the_same_gate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from bot.cli import app
    from bot.settings import load_settings

    for name, value in GATE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path))
    started: list[RunRequest] = []

    async def record(run: RunRequest, emit: Any, *, slack: bool) -> int:
        started.append(run)
        return 0

    monkeypatch.setattr("bot.retrain.start_run", record)
    result = CliRunner().invoke(app, ["retrain"])
    assert result.exit_code == 0, result.output
    (run,) = started
    bot = load_settings(slack_bot_token="xoxb-1", slack_signing_secret="s").run_options()
    assert (
        run.options
        == bot
        == RunOptions(
            gate=Gate(tolerance=0.03, max_recall_drop=0.2, recall_drop_alpha=0.01, backend="torch"),
            acceptance=Acceptance(after_hours=6, max_rows=50),
            epochs=2,
        )
    )
    assert run.trigger == TrainingTrigger.CLI
    # an option given on the command line wins over its variable
    assert CliRunner().invoke(app, ["retrain", "--epochs", "5"]).exit_code == 0
    assert started[-1].options.epochs == 5


def test_a_malformed_gate_setting_stops_triage_retrain_with_its_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from bot.cli import app

    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TRIAGE_GATE_MAX_RECALL_DROP", "a lot")
    result = CliRunner().invoke(app, ["retrain"])
    assert result.exit_code == 2
    assert "error: TRIAGE_GATE_MAX_RECALL_DROP: Input should be a valid number" in result.output
    assert not list(tmp_path.glob("models/*"))  # nothing ran


@pytest.mark.parametrize("backend", ["sqlite"])  # the bot's own child process (no worker on SQLite)
async def test_the_bot_relays_a_runs_progress_and_summary_to_slack(
    tiny_bert: Path, data_dir: Path, db: Any
) -> None:
    """Through the bot's Slack output to the stand-in: progress in one thread of the asking channel, the
    summary and the candidate's confusion matrix there and in the summary channel."""
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.slack_output import SlackOutput
    from tests.support.slack_standin import SlackStandIn

    engine, sessions = db
    registry = Registry(data_dir / "models")
    _base_version(registry, tiny_bert, steps=1)
    await _store_feedback(sessions, learnable_rows(60, seed=5))
    async with SlackStandIn() as slack:
        for channel in ("C0ASK", "C0SUMMARY"):
            slack.add_channel(channel)
        output = SlackOutput(AsyncWebClient(token=slack.bot_token, base_url=slack.api_url))
        retrainer = Retrainer(
            sessions,
            engine,
            post=output.post_text,
            upload=output.upload,
            summary_channel="C0SUMMARY",
            options=RunOptions(epochs=1),
        )
        await retrainer.request(requested_by="U0ADMIN", notify_channel="C0ASK")
        assert retrainer.relay is not None
        await asyncio.wait_for(retrainer.relay, timeout=300)
        asked = slack.messages_in("C0ASK")
        summary = slack.messages_in("C0SUMMARY")
        uploads = [f for f in slack.files.values() if f.completed]
    first, *progress, last = asked
    assert first["text"].startswith(":hourglass_flowing_sand: Retraining from v1:")
    assert [m["text"][:31] for m in progress] == ["epoch 1/1: validation macro-F1 "]
    assert all(m.get("thread_ts") == first["ts"] for m in progress)  # one thread per run
    assert last["text"].startswith((":rocket: *v2* promoted", ":no_entry: *v2* rejected"))
    assert "thread_ts" not in last  # the summary stands in the channel
    assert [m["text"] for m in summary] == [last["text"]]
    assert sorted(f.channel_id or "" for f in uploads) == ["C0ASK", "C0SUMMARY"]
    assert all(f.content and f.content.startswith(b"\x89PNG") for f in uploads)


async def test_triage_retrain_without_a_model_fails_in_one_line(
    db: Any, database_url: URL, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from bot.cli import app

    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    # the command runs its own event loop: off this test's
    result = await asyncio.to_thread(CliRunner().invoke, app, ["retrain", "--dry-run"])
    assert result.exit_code == 2  # the README's "bad input or configuration"
    assert result.output.splitlines()[-1] == (
        f"error: no active model in {tmp_path / 'models'}: train one with `triage train`"
    )
    assert "Traceback" not in result.output


async def test_triage_audit_lists_who_asked_for_a_retrain(db: Any, database_url: URL) -> None:
    from typer.testing import CliRunner

    from bot.cli import app

    _, sessions = db
    async with sessions.begin() as session:
        await repo.add_audit_entry(
            session, user_id="U0AGENT", action="retrain", allowed=False, reason="not admin"
        )
        await repo.add_audit_entry(
            session, user_id="U0ADMIN", action="rollback", args={"version": "v1"}, allowed=True
        )
    url = ["--database-url", database_url.render_as_string(hide_password=False)]
    # the command runs its own event loop: off this test's
    listed = await asyncio.to_thread(CliRunner().invoke, app, ["audit", *url])
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.output.splitlines() if " UTC  " in line]
    assert lines[0].endswith('U0ADMIN  rollback {"version": "v1"}  allowed')  # newest first
    assert lines[1].endswith("U0AGENT  retrain {}  refused (not admin)")
    only = await asyncio.to_thread(CliRunner().invoke, app, ["audit", "--user", "U0AGENT", "--json", *url])
    (row,) = [json.loads(line) for line in only.output.splitlines() if line.startswith("{")]
    assert (row["user_id"], row["action"], row["allowed"]) == ("U0AGENT", "retrain", False)
