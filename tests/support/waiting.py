"""Wait for a signal, never for a fixed time: the one polling helper the tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 30.0) -> bool:
    """Poll `check` until it holds (True) or `within_s` passes (False)."""
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
