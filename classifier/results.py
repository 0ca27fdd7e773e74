"""What a classification returns, the input limits, the errors and the backend choices: shared by
engine, server, client and the bot's settings (so importing them needs no torch).

The engine (in-process) and the HTTP client return the same types and raise the same errors, so the bot
does not care which one it talks to. The HTTP API's bodies are pydantic models (``ClassifyRequest``,
``ClassifyResponse``, ``ModelList``, ``Activation``): the server and the client share one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

if TYPE_CHECKING:
    from classifier.registry import VersionInfo

Backend = Literal["auto", "torch", "onnx"]  # what runs the model (see classifier/onnx_backend.py)
Quantize = Literal["auto", "none", "int8"]  # onnx precision
# How a model is served unless told otherwise (EngineConfig), and so how the retraining gate judges it
# (promotion.Gate); here, not in engine.py, so the gate, the settings and the CLI load no torch
DEFAULT_BACKEND: Backend = "auto"  # onnx on the CPU, torch on CUDA
DEFAULT_QUANTIZE: Quantize = "auto"  # int8 where the version's held-out check passed, else fp32

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
    """A labeled training message like the classified text (why this label): its cosine similarity, and
    the training row's ``source`` (``slack:12`` for a Slack message: who may see or forget its text)."""

    text: str
    label: str
    similarity: float
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label, "similarity": self.similarity, "source": self.source}


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


def model_summary(info: VersionInfo, serving: str | None) -> ModelSummary:
    """A registry version as the API lists it; ``serving``: the version answering now."""
    return ModelSummary(
        name=info.name,
        status=info.status,
        created=info.created,
        base_model=info.base_model,
        parent=info.parent,
        reason=info.reason,
        metrics=info.metrics,
        schema=info.schema,
        serving=info.name == serving,
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


# ---- the HTTP API's bodies --------------------------------------------------------------------------
class ClassifyRequest(BaseModel):
    """``POST /v1/classify``'s body: ``{"texts": [...]}`` and optionally ``"neighbors": k`` (why this
    label), nothing else."""

    model_config = ConfigDict(extra="forbid")

    texts: Annotated[list[str], BeforeValidator(check_texts)]
    neighbors: Annotated[int, BeforeValidator(check_neighbors)] = 0

    @classmethod
    def parse(cls, body: Any) -> ClassifyRequest:
        """The request in a decoded JSON body; ``InvalidInput`` says what is wrong, naming the text."""
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise InvalidInput(_request_problem(exc)) from None


def _request_problem(exc: ValidationError) -> str:
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}; expected 'texts' and optionally 'neighbors'"
    error = errors[0]
    if error["type"] == "model_type":
        return 'the body must be a JSON object: {"texts": ["..."]}'
    if error["type"] == "missing":
        return f"missing 'texts': a list of 1 to {MAX_TEXTS} strings, each up to {MAX_CHARS} characters"
    return str(error.get("ctx", {}).get("error") or error["msg"])  # check_texts' message


class ClassifyResponse(BaseModel):
    """``POST /v1/classify``'s answer: heads per result, and parallel ``truncated`` and (only when asked
    for) ``neighbors`` lists."""

    model_version: str
    results: list[dict[str, HeadPrediction]]
    truncated: list[bool] | None = None  # None: a server from before it was reported
    neighbors: list[list[Neighbor]] | None = None

    @classmethod
    def of(cls, result: ClassifyResult) -> ClassifyResponse:
        asked = any(r.neighbors is not None for r in result.results)
        return cls(
            model_version=result.model_version,
            results=[r.heads for r in result.results],
            truncated=[r.truncated for r in result.results],
            neighbors=[r.neighbors or [] for r in result.results] if asked else None,
        )

    def body(self) -> dict[str, Any]:
        """The JSON body: ``neighbors`` only when asked for."""
        return self.model_dump(mode="json", exclude_none=True)

    def result(self) -> ClassifyResult:
        n = len(self.results)
        truncated = self.truncated or [False] * n
        neighbors: list[list[Neighbor] | None] = list(self.neighbors) if self.neighbors else [None] * n
        texts = zip(self.results, truncated, neighbors, strict=True)
        return ClassifyResult(self.model_version, [TextResult(h, cut, near) for h, cut, near in texts])


class ModelList(BaseModel):
    """``GET /v1/models``' answer: every registry version, the active one and the one serving now."""

    active: str | None
    serving: str | None
    versions: list[ModelSummary]


class Activation(BaseModel):
    """``POST /v1/models/{version}/activate``'s answer; ``lost_heads``: heads the previous version had and
    this one lacks."""

    active: str
    serving: str | None
    lost_heads: list[str]
