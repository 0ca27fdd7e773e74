"""How a model is trained: ``TrainConfig``, the one place each training setting and its default live.

Apart from ``classifier.train`` (which imports torch), so that the command line can show and take the
defaults without loading the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from classifier.data import DEFAULT_SPLIT_SALT

CLASS_WEIGHTINGS = ("none", "balanced")


@dataclass
class TrainConfig:
    base_model: str = ""  # local Hugging Face folder; empty: the packaged all-MiniLM-L6-v2
    init_from: str | None = None  # registry version to continue training from (warm start)
    # the best measured for the default base model (bench/accuracy.py: BANKING77 and TweetEval); "auto":
    # the shortest of 32/64/128/256/512 tokens that keeps 95% of the training texts whole
    max_length: int | Literal["auto"] = 64
    batch_size: int = 32
    learning_rate: float = 1e-4
    head_learning_rate: float | None = 1e-3  # None: same as learning_rate
    epochs: int = 5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    patience: int = 2  # epochs without validation macro-F1 gain before stopping; 0 disables early stopping
    seed: int = 42
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_salt: str = DEFAULT_SPLIT_SALT
    pooling: str = "mean"
    # "balanced": each class of a head weighs in the loss inversely to its count in the training split, so
    # a skewed sample (e.g. feedback, where only wrong predictions get corrected) does not skew the prior
    class_weighting: str = "none"
    dropout: float = 0.1
    max_steps: int | None = None  # cap on optimizer steps (smoke runs, tests)
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the run

    def validate(self) -> None:
        if self.max_length != "auto" and not (
            isinstance(self.max_length, int) and 3 <= self.max_length <= 512
        ):
            raise ValueError(f"max length must be auto or between 3 and 512, got {self.max_length!r}")
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning rate must be in (0, 1), got {self.learning_rate}")
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup ratio must be in [0, 1)")
        if self.weight_decay < 0 or self.patience < 0:
            raise ValueError("weight decay and patience must not be negative")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max steps must be at least 1")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(
                f"class weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, got {self.class_weighting!r}"
            )
