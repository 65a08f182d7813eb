"""The clock that schedulers, leases and leader election read. Tests pass an object with the
same three methods (``now``, ``monotonic``, ``sleep``) to control time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo


@dataclass
class SystemClock:
    """The real clock: wall time for cron slots, a monotonic clock for leases and deadlines,
    and ``asyncio.sleep``."""

    tz: tzinfo = UTC

    def now(self) -> datetime:
        return datetime.now(self.tz)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
