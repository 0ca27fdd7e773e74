"""One way to retry: exponential back-off, capped, with jitter, honouring a server's Retry-After."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries (``None``: until one succeeds), waiting ``backoff_s`` doubling up to
    ``max_backoff_s`` between them. With ``jitter`` a wait is 50-100 % of that, so clients that failed
    together retry apart; a failure's ``retry_after_s`` (a server's Retry-After) is honoured up to
    ``max_backoff_s``."""

    attempts: int | None = 4
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    jitter: bool = True

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """The wait after failed try number ``attempt`` (0: the first)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        if self.jitter:
            delay *= 0.5 + random.random() / 2
        if retry_after_s:
            delay = max(delay, min(retry_after_s, self.max_backoff_s))
        return delay

    async def call(
        self,
        attempt: Callable[[], Awaitable[T]],
        retry_on: type[Exception] | tuple[type[Exception], ...],
        before_wait: Callable[[Exception, float], None] | None = None,
    ) -> T:
        """What ``attempt()`` returns. A ``retry_on`` failure is tried again after the back-off
        (``before_wait(failure, delay)`` is told first); when no try is left, the last failure is raised."""
        failed = 0
        while True:
            try:
                return await attempt()
            except retry_on as exc:
                failed += 1
                if self.attempts is not None and failed >= self.attempts:
                    raise
                delay = self.delay(failed - 1, getattr(exc, "retry_after_s", None))
                if before_wait is not None:
                    before_wait(exc, delay)
                await asyncio.sleep(delay)
