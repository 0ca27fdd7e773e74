"""What a classification returns, the input limits, the errors and the backend choices: shared by
engine, server, client and the bot's settings (so importing them needs no torch).

The engine (in-process) and the HTTP client return the same types and raise the same errors, so the bot
does not care which one it talks to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["auto", "torch", "onnx"]  # what runs the model (see classifier/onnx_backend.py)
Quantize = Literal["auto", "none", "int8"]  # onnx precision

MAX_TEXTS = 256  # texts per classify call
MAX_CHARS = 20_000  # characters per text; longer Slack messages do not exist (the limit is 40k bytes)
MAX_NEIGHBORS = 10  # similar training messages one call may ask for per text (why this label)
# confidence under which a label is shown as unsure (TRIAGE_UNSURE_BELOW); `triage evaluate` reports the
# accuracy on each side of it
UNSURE_BELOW = 0.5


@dataclass(frozen=True)
class HeadPrediction:
    """One head's answer for one text: the label, its probability, and the probability of every label."""

    label: str
    confidence: float
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "confidence": self.confidence, "scores": self.scores}


class ClassifierError(Exception):
    """A classification that cannot be done; see the subclasses."""


class InvalidInput(ClassifierError, ValueError):
    """The texts break the limits (empty list, too many, too long, not strings, not encodable as UTF-8).
    Retrying will not help."""


class ClassifierUnavailable(ClassifierError):
    """The classifier cannot answer now (overloaded, not loaded, unreachable); the bot keeps the message
    as pending and classifies it later."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Neighbor:
    """A labeled training message like the classified text (why this label): its cosine similarity."""

    text: str
    label: str
    similarity: float

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label, "similarity": self.similarity}


@dataclass(frozen=True)
class TextResult:
    """All heads' predictions for one text; ``truncated``: the text was cut at the model's max length.
    ``neighbors``: when asked for, the most similar training messages of the predicted first-head
    (topic) label, most similar first (empty when the version saved none)."""

    heads: dict[str, HeadPrediction]
    truncated: bool = False
    neighbors: list[Neighbor] | None = None


@dataclass(frozen=True)
class ClassifyResult:
    """Results in input order, all produced by one model version."""

    model_version: str
    results: list[TextResult]

    def to_dict(self) -> dict[str, Any]:
        """The HTTP response body: heads per result, and parallel ``truncated`` and (when asked for)
        ``neighbors`` lists."""
        body: dict[str, Any] = {
            "model_version": self.model_version,
            "results": [{head: p.to_dict() for head, p in r.heads.items()} for r in self.results],
            "truncated": [r.truncated for r in self.results],
        }
        if any(r.neighbors is not None for r in self.results):
            body["neighbors"] = [[n.to_dict() for n in r.neighbors or []] for r in self.results]
        return body

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClassifyResult:
        results = raw["results"]
        truncated = raw.get("truncated") or [False] * len(results)
        neighbors = raw.get("neighbors") or [None] * len(results)
        return cls(
            model_version=str(raw["model_version"]),
            results=[
                TextResult(
                    heads={
                        head: HeadPrediction(
                            label=str(p["label"]),
                            confidence=float(p["confidence"]),
                            scores={str(k): float(v) for k, v in p["scores"].items()},
                        )
                        for head, p in r.items()
                    },
                    truncated=bool(t),
                    neighbors=None
                    if near is None
                    else [Neighbor(str(n["text"]), str(n["label"]), float(n["similarity"])) for n in near],
                )
                for r, t, near in zip(results, truncated, neighbors, strict=True)
            ],
        )


@dataclass(frozen=True)
class ModelSummary:
    """One registry version as the API lists it; ``serving``: this classifier answers with it now."""

    name: str
    status: str
    created: str = ""
    base_model: str = ""
    parent: str | None = None
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    schema: dict[str, Any] = field(default_factory=dict)
    serving: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "created": self.created,
            "base_model": self.base_model,
            "parent": self.parent,
            "reason": self.reason,
            "metrics": self.metrics,
            "schema": self.schema,
            "serving": self.serving,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSummary:
        return cls(
            name=str(raw["name"]),
            status=str(raw.get("status", "")),
            created=str(raw.get("created", "")),
            base_model=str(raw.get("base_model", "")),
            parent=raw.get("parent"),
            reason=str(raw.get("reason", "")),
            metrics=dict(raw.get("metrics") or {}),
            schema=dict(raw.get("schema") or {}),
            serving=bool(raw.get("serving", False)),
        )


def check_texts(texts: Any) -> list[str]:
    """Validate a classify input (the same rules in-process and over HTTP); returns it as a list."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidInput("'texts' must be a list of strings")
    if not texts:
        raise InvalidInput("'texts' is empty: send 1 to 256 texts")
    if len(texts) > MAX_TEXTS:
        raise InvalidInput(f"'texts' has {len(texts)} items: send at most {MAX_TEXTS} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(f"texts[{i}] is {type(text).__name__}, not a string")
        if len(text) > MAX_CHARS:
            raise InvalidInput(f"texts[{i}] has {len(text)} characters: the limit is {MAX_CHARS}")
        try:  # JSON's \ud800 escape gives a lone surrogate: no tokenizer (or database) takes it
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(
                f"texts[{i}] cannot be encoded as UTF-8: lone surrogate U+{ord(text[exc.start]):04X} "
                f"at character {exc.start}"
            ) from None
    return list(texts)


def check_neighbors(value: Any) -> int:
    """Validate how many similar training messages a classify call asks for per text (0: none)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NEIGHBORS:
        raise InvalidInput(f"'neighbors' must be a whole number from 0 to {MAX_NEIGHBORS}, got {value!r}")
    return value
