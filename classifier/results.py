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

MAX_TEXTS = 256  # texts per classify call
MAX_CHARS = 20_000  # characters per text; longer Slack messages do not exist (the limit is 40k bytes)


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
class TextResult:
    """All heads' predictions for one text; ``truncated``: the text was cut at the model's max length."""

    heads: dict[str, HeadPrediction]
    truncated: bool = False


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


# ---- the HTTP API's bodies --------------------------------------------------------------------------
class ClassifyRequest(BaseModel):
    """``POST /v1/classify``'s body: ``{"texts": [...]}``, nothing else."""

    model_config = ConfigDict(extra="forbid")

    texts: Annotated[list[str], BeforeValidator(check_texts)]

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
        return f"unknown field(s): {', '.join(unknown)}; expected only 'texts'"
    error = errors[0]
    if error["type"] == "model_type":
        return 'the body must be a JSON object: {"texts": ["..."]}'
    if error["type"] == "missing":
        return f"missing 'texts': a list of 1 to {MAX_TEXTS} strings, each up to {MAX_CHARS} characters"
    return str(error.get("ctx", {}).get("error") or error["msg"])  # check_texts' message


class ClassifyResponse(BaseModel):
    """``POST /v1/classify``'s answer: heads per result, and a parallel ``truncated`` list."""

    model_version: str
    results: list[dict[str, HeadPrediction]]
    truncated: list[bool] | None = None  # None: a server from before it was reported

    @classmethod
    def of(cls, result: ClassifyResult) -> ClassifyResponse:
        return cls(
            model_version=result.model_version,
            results=[r.heads for r in result.results],
            truncated=[r.truncated for r in result.results],
        )

    def result(self) -> ClassifyResult:
        truncated = self.truncated or [False] * len(self.results)
        texts = zip(self.results, truncated, strict=True)
        return ClassifyResult(self.model_version, [TextResult(heads, cut) for heads, cut in texts])


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
