"""Small process helpers for procman and the supervisor: is a pid alive (and still the same
process), is a process group empty, signal a group safely, tail a log file.

Linux ``/proc`` is used when present (it tells zombies apart and gives each process's start
time, so a recycled pid is never mistaken for ours); other POSIX systems fall back to
``kill(pid, 0)``.
"""

from __future__ import annotations

import contextlib
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


def group_alive(pgid: int) -> bool:
    """True while some non-zombie process is in process group ``pgid``."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[1] == pgid and stat[0] not in ("Z", "X"):
                return True
    return False


def signal_group(pid: int, sig: int) -> None:
    """Signal ``pid``'s process group when it leads one (never our own group), else ``pid``."""
    try:
        if os.getpgid(pid) == pid and pid != os.getpgrp():
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # the leader is gone; members of its group may remain


def tail_file(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (read from the end, so big logs are cheap)."""
    if lines == 0:
        return []
    block = 8192
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= lines:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    text = data.decode("utf-8", errors="replace")
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")[-lines:] if text else []
