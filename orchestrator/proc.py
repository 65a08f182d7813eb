"""Is a process alive, and still the same process: the pid checks that the embedded
redis-server (``orchestrator.broker.embedded``) and the worker process manager
(``workers.processes``) share.

Linux ``/proc`` is used when present (it tells zombies apart and gives each process's start
time, so a recycled pid is never mistaken for ours); other POSIX systems fall back to
``kill(pid, 0)``.
"""

from __future__ import annotations

import os
from pathlib import Path


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of ``pid``, or None if unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no such process, or no /proc on this system
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` since boot (clock ticks), or None where /proc is absent."""
    stat = _proc_stat(pid)
    return stat[2] if stat else None


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """True if ``pid`` runs, is no zombie and (when known) started at ``proc_start``."""
    if pid <= 0:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, _, start = stat
        return state not in ("Z", "X") and (proc_start is None or start == proc_start)
    if Path("/proc/self/stat").exists():
        return False  # /proc works and has no entry for pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
