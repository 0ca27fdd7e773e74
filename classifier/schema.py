"""Label schema: which heads the model has and which labels each head knows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_HEADS: dict[str, list[str]] = {
    # not_a_request: thanks, greetings, "works now": stored and classified, never answered or escalated
    "topic": ["account", "billing", "bug", "feature_request", "how_to", "outage", "other", "not_a_request"],
    "urgency": ["low", "medium", "high", "critical"],
    "sentiment": ["negative", "neutral", "positive"],
}
# What the product does with each default head: what stops working when the active model lacks it.
HEAD_USES: dict[str, str] = {
    "topic": "topic routing (TRIAGE_ROUTES) and the topic on cards",
    "urgency": "escalation (the :rotating_light: reaction and posts to TRIAGE_ESCALATION_CHANNEL)",
    "sentiment": "the sentiment on cards",
}


class SchemaError(ValueError):
    """A label schema that cannot be used."""


@dataclass
class LabelSchema:
    """Ordered heads, each with an ordered label list (the order fixes the output index of each label).

    ``allow_new_labels``: labels not listed here found in training data are appended instead of rejected.
    """

    heads: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_HEADS.items()}
    )
    allow_new_labels: bool = False

    def __post_init__(self) -> None:
        if not self.heads:
            raise SchemaError("the label schema has no heads")
        for head, labels in self.heads.items():
            if not head or not head.replace("_", "").isalnum():
                raise SchemaError(f"head name {head!r} must be letters, digits and underscores")
            if len(set(labels)) != len(labels):
                raise SchemaError(f"head {head!r} lists a label twice")
            if any(not isinstance(label, str) or not label.strip() for label in labels):
                raise SchemaError(f"head {head!r} has an empty label")

    def validate_trainable(self) -> None:
        """Every head needs at least two labels to be a classifier."""
        for head, labels in self.heads.items():
            if len(labels) < 2:
                raise SchemaError(f"head {head!r} has {len(labels)} label(s); a head needs at least 2")

    def index(self, head: str, label: str) -> int:
        return self.heads[head].index(label)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads, "allow_new_labels": self.allow_new_labels}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LabelSchema:
        heads = raw.get("heads")
        if not isinstance(heads, dict) or not all(isinstance(v, list) for v in heads.values()):
            raise SchemaError("schema needs 'heads': a mapping of head name to a list of labels")
        return cls(
            heads={str(k): [str(x) for x in v] for k, v in heads.items()},
            allow_new_labels=bool(raw.get("allow_new_labels", False)),
        )

    @classmethod
    def load(cls, path: Path) -> LabelSchema:
        """Read a schema from YAML or JSON."""
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SchemaError(f"{path}: cannot read the label schema: {exc}") from exc
        if not isinstance(raw, dict):
            raise SchemaError(f"{path}: the label schema must be a mapping with 'heads'")
        try:
            return cls.from_dict(raw)
        except SchemaError as exc:
            raise SchemaError(f"{path}: {exc}") from exc

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def schema_heads(schema: Mapping[str, Any]) -> list[str]:
    """The head names of a stored schema (``LabelSchema.to_dict()``, as in version.json)."""
    heads = schema.get("heads")
    return list(heads) if isinstance(heads, Mapping) else []


def lost_heads(current: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Heads of the ``current`` stored schema that the ``new`` one lacks, in the current order."""
    kept = set(schema_heads(new))
    return [head for head in schema_heads(current) if head not in kept]


def describe_lost_heads(heads: Iterable[str], uses: Mapping[str, str] = HEAD_USES) -> list[str]:
    """One line per head: what stops working without it."""
    return [
        f"without {head}: {uses.get(head, 'its labels on cards and in corrections')} stops working"
        for head in heads
    ]
