"""Which emoji reaction means which correction.

One emoji sets one head to one label (``bug`` → topic=bug); ``dart`` confirms every predicted label. The
map can be replaced by a YAML file (``TRIAGE_REACTIONS_FILE``)::

    red_circle: urgency=critical
    moneybag: topic=billing
    dart: confirm

No emoji collides with what people or the bot already mean by it: ``rotating_light`` is the bot's own
marker on urgent messages (its reaction must not read as a correction), and ``white_check_mark`` is what
support teams put on a resolved request; a map that gives either a meaning is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

CONFIRM = "confirm"
URGENT_MARKER = "rotating_light"  # the bot's reaction on an urgent message
# emoji that already mean something else in a support channel: never a correction
RESERVED: dict[str, str] = {
    URGENT_MARKER: "the bot's own marker on urgent messages",
    "white_check_mark": "what support teams use for 'resolved'",
}

DEFAULT_REACTIONS: dict[str, str] = {
    # urgency first, as the reply's hint lists it; then one per remaining default label
    "red_circle": "urgency=critical",
    "large_orange_circle": "urgency=high",
    "large_yellow_circle": "urgency=medium",
    "large_green_circle": "urgency=low",
    "bug": "topic=bug",
    "rage": "sentiment=negative",
    "dart": CONFIRM,
    "neutral_face": "sentiment=neutral",
    "smile": "sentiment=positive",
    "bust_in_silhouette": "topic=account",
    "moneybag": "topic=billing",
    "bulb": "topic=feature_request",
    "question": "topic=how_to",
    "fire": "topic=outage",
    "shrug": "topic=other",
    "mute": "topic=not_a_request",
}


@dataclass(frozen=True)
class ReactionAction:
    """``head``/``label`` set; both ``None`` for a confirmation of all predicted labels."""

    head: str | None = None
    label: str | None = None

    @property
    def confirms(self) -> bool:
        return self.head is None


class ReactionMap:
    def __init__(self, mapping: dict[str, str]):
        self.actions: dict[str, ReactionAction] = {}
        for emoji, meaning in mapping.items():
            name = str(emoji).strip(":")
            if name in RESERVED:
                raise ValueError(f"reaction {name!r} cannot be a correction: it is {RESERVED[name]}")
            if str(meaning).strip() == CONFIRM:
                self.actions[name] = ReactionAction()
                continue
            head, sep, label = str(meaning).partition("=")
            if not sep or not head.strip() or not label.strip():
                raise ValueError(f"reaction {name!r}: {meaning!r} must be 'head=label' or 'confirm'")
            self.actions[name] = ReactionAction(head.strip(), label.strip())

    @classmethod
    def load(cls, path: Path | None) -> ReactionMap:
        if path is None:
            return cls(DEFAULT_REACTIONS)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"TRIAGE_REACTIONS_FILE {path}: {exc}") from exc
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"TRIAGE_REACTIONS_FILE {path}: expected a mapping of emoji to 'head=label'")
        return cls({str(k): str(v) for k, v in raw.items()})

    def get(self, reaction: str) -> ReactionAction | None:
        # skin tones arrive as "thumbsup::skin-tone-2"; the base emoji decides
        return self.actions.get(reaction.split("::", 1)[0])

    def confirm_emoji(self) -> str | None:
        return next((e for e, a in self.actions.items() if a.confirms), None)
