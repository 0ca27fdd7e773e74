"""Shared pytest fixtures for classifier tests (loaded as a plugin from pyproject's addopts)."""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tiny_model import make_tiny_bert

TOPIC_WORDS = {
    "billing": ["invoice", "charged", "refund", "payment", "vat"],
    "bug": ["crash", "broken", "error", "glitch", "freezes"],
    "outage": ["down", "unreachable", "503", "offline", "timeouts"],
}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with the packaged MiniLM tokenizer, shared by the whole test session."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh TRIAGE_DATA_DIR for one test."""
    path = tmp_path / "data"
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(path))
    yield path


def write_csv(path: Path, rows: list[dict[str, str]], fieldnames: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def learnable_rows(n: int = 150, seed: int = 0) -> list[dict[str, str]]:
    """Rows whose topic is given away by a keyword and sentiment by a word, so a few steps can learn them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(list(TOPIC_WORDS))
        sentiment = rng.choice(["negative", "positive"])
        mood = "awful terrible" if sentiment == "negative" else "great thanks"
        text = f"{rng.choice(TOPIC_WORDS[topic])} {rng.choice(TOPIC_WORDS[topic])} {mood} ticket {i}"
        rows.append(
            {
                "text": text,
                "topic": topic,
                "urgency": "critical" if topic == "outage" else "low",
                "sentiment": sentiment,
            }
        )
    return rows
