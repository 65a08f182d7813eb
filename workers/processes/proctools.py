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

from orchestrator.proc import _proc_stat, pid_alive, process_start_ticks

__all__ = ["group_alive", "pid_alive", "process_start_ticks", "signal_group", "tail_file"]


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
