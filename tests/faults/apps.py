"""A worker app for fault tests that records every handler call in a local file, not in
Redis, so it keeps working while Redis refuses writes (maxmemory) or is gone.

Each call appends one line ``i deliveries pid ok|fail`` to ``$TEST_OUT`` (O_APPEND, one write
per line, so lines of several processes never interleave). Behaviour by environment:

TEST_OUT        the file                                              required
TEST_SLEEP_MS   the handler sleeps this long (async)                  default 0
TEST_FAIL_EVERY N: event i fails on delivery 1 when i % N == 0,       default off
                on delivery 2 too when i % (10 N) == 0, and on every
                delivery when i % (100 N) == 0
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

from orchestrator import Orchestrator

app = Orchestrator(mode="worker")
OUT = os.environ.get("TEST_OUT", "")
SLEEP_S = int(os.environ.get("TEST_SLEEP_MS", "0")) / 1000.0
FAIL_EVERY = int(os.environ.get("TEST_FAIL_EVERY", "0"))
_fd: int | None = None


def _write(line: str) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, line.encode())


def fails(i: int, delivery: int) -> bool:
    if not FAIL_EVERY:
        return False
    if i % (100 * FAIL_EVERY) == 0:
        return True
    if delivery == 1:
        return i % FAIL_EVERY == 0
    if delivery == 2:
        return i % (10 * FAIL_EVERY) == 0
    return False


async def record(event) -> None:
    if SLEEP_S:
        await asyncio.sleep(SLEEP_S)
    i = int(event.payload["i"])
    bad = fails(i, event.deliveries)
    _write(f"{i} {event.deliveries} {os.getpid()} {'fail' if bad else 'ok'}\n")
    if bad:
        raise ValueError(f"event {i} fails on delivery {event.deliveries}")


app.dispatcher.subscribe("job", record)


def whole_lines(path: Path) -> list[str]:
    """The lines of a file workers append to, without the one a worker may be writing right
    now (a reader can see a line half-written)."""
    return path.read_text().split("\n")[:-1] if path.exists() else []


def read_calls(path: Path) -> list[tuple[int, int, int, bool]]:
    """Every recorded call: (i, delivery, pid, ok)."""
    if not path.exists():
        return []
    out = []
    for line in whole_lines(path):
        i, delivery, pid, verdict = line.split()
        out.append((int(i), int(delivery), int(pid), verdict == "ok"))
    return out


def successes(path: Path) -> Counter:
    """Event number -> how many of its calls succeeded."""
    return Counter(i for i, _, _, ok in read_calls(path) if ok)
