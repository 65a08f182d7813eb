"""Detached worker instances on this host: the luhproc model, done carefully in Python.

Each instance lives in ``{state_dir}/workers/{slug}-{hash12}/``:

- ``pid``      the decimal process id, no newline (written atomically);
- ``out.log``  the instance's stdout, ``err.log`` its stderr (truncated at each start);
- ``cmd.json`` ``{"name", "argv", "started_at", "pid", "proc_start", "cwd"}``.

``slug`` is the name lower-cased with ``_`` turned into ``-`` (luhproc's shape) and ``hash12``
the first 12 characters of the base-36 form (digits, then lowercase letters) of the SHA-256 of
the exact name: stable across runs, Python versions and hosts, unlike luhproc's SipHash.

Where luhproc is loose, this module is strict (see docs/operations.md):

- really detached: a short-lived launcher starts it in a new session, stdin from /dev/null;
- "alive" = the pid exists, is no zombie and (Linux) has the start time recorded at launch:
  a recycled pid is never signalled; a stale ``pid`` file never blocks ``start``;
- ``stop``: SIGTERM to the process group, a grace period, SIGKILL, then the folder goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from orchestrator.errors import ConflictError, InvalidArgumentError, NotFoundError, StateError
from workers.processes.proctools import group_alive, pid_alive, process_start_ticks, signal_group, tail_file

PID_FILE = "pid"
OUT_LOG = "out.log"
ERR_LOG = "err.log"
CMD_FILE = "cmd.json"
WORKERS_DIR = "workers"
LOCKS_DIR = ".locks"
HASH_LEN = 12
_DIGITS36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Runs in a throwaway interpreter: starts the worker in its own session with its logs, prints
# its pid and exits, so the worker is re-parented and never becomes the caller's zombie.
_LAUNCHER = r"""
import json, subprocess, sys
spec = json.loads(sys.stdin.read())
with open(spec["out"], "wb") as out, open(spec["err"], "wb") as err:
    try:
        proc = subprocess.Popen(spec["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                cwd=spec["cwd"], start_new_session=True, close_fds=True)
    except OSError as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}")
        sys.exit(3)
sys.stdout.write(str(proc.pid))
"""


def validate_name(name: str) -> str:
    """Return ``name`` if it can name an instance, else raise InvalidArgumentError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgumentError(
            f"invalid worker name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def instance_hash(name: str) -> str:
    """First 12 base-36 characters of SHA-256(name) (zero-padded, so always 12)."""
    number = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest(), "big")
    digits = []
    while number:
        number, rest = divmod(number, 36)
        digits.append(_DIGITS36[rest])
    return "".join(reversed(digits)).rjust(50, "0")[:HASH_LEN]


def folder_name(name: str) -> str:
    """``{slug}-{hash12}``: ``My_Worker`` -> ``my-worker-<hash of 'My_Worker'>``."""
    validate_name(name)
    return f"{name.lower().replace('_', '-')}-{instance_hash(name)}"


# -- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One local instance as found on disk. ``pid`` is None when the pid file is bad."""

    name: str
    folder: Path
    pid: int | None
    alive: bool
    started_at: float | None = None  # wall clock (epoch seconds), for display only
    argv: tuple[str, ...] = ()
    proc_start: int | None = field(default=None, repr=False)

    @property
    def out_log(self) -> Path:
        return self.folder / OUT_LOG

    @property
    def err_log(self) -> Path:
        return self.folder / ERR_LOG

    def uptime_s(self, now: float) -> float | None:
        """Seconds since start while alive, else None."""
        if not self.alive or self.started_at is None:
            return None
        return max(0.0, now - self.started_at)

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "name": self.name,
            "pid": self.pid,
            "alive": self.alive,
            "status": "alive" if self.alive else "dead",
            "uptime_s": self.uptime_s(now),
            "started_at": self.started_at,
            "folder": str(self.folder),
            "argv": list(self.argv),
        }


@dataclass(frozen=True)
class StopResult:
    """What ``stop`` did: ``outcome`` is ``terminated`` (exited on SIGTERM), ``killed``
    (needed SIGKILL), ``stale`` (was not running; folder cleaned) or ``invalid_pid``
    (unreadable pid file; nothing signalled; folder cleaned)."""

    name: str
    pid: int | None
    outcome: str


class ProcessManager:
    """Start, list, stop and read the logs of detached instances under ``state_dir/workers``.

    ``monotonic`` / ``sleep`` / ``wall`` are injectable for tests; ``poll_interval_s`` is how
    often ``stop`` and ``follow`` look again.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
        poll_interval_s: float = 0.05,
    ) -> None:
        self.root = Path(state_dir) / WORKERS_DIR
        self._monotonic = monotonic
        self._sleep = sleep
        self._wall = wall
        self.poll_interval_s = poll_interval_s

    # -- paths and locking

    def folder(self, name: str) -> Path:
        return self.root / folder_name(name)

    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[Path]:
        """Hold the folder's lock, so two starts / stops of one instance never interleave."""
        locks = self.root / LOCKS_DIR
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{folder.name}.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield folder
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # -- reading state

    def _read(self, folder: Path) -> Instance:
        meta: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((folder / CMD_FILE).read_text(encoding="utf-8"))
        pid: int | None
        try:
            pid = int((folder / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            pid = None
        proc_start = meta.get("proc_start") if meta.get("pid") == pid else None
        return Instance(
            name=str(meta.get("name") or folder.name),
            folder=folder,
            pid=pid,
            alive=pid is not None and pid_alive(pid, proc_start),
            started_at=meta.get("started_at"),
            argv=tuple(meta.get("argv") or ()),
            proc_start=proc_start,
        )

    def get(self, name: str) -> Instance:
        """The instance called ``name``; NotFoundError if it has no folder."""
        folder = self.folder(name)
        if not folder.is_dir():
            raise NotFoundError(f"no local worker named {name!r} (looked in {self.root})")
        return self._read(folder)

    def instances(self) -> list[Instance]:
        """Every local instance, alive or dead, sorted by name."""
        if not self.root.is_dir():
            return []
        found = [self._read(p) for p in self.root.iterdir() if p.is_dir() and p.name != LOCKS_DIR]
        return sorted(found, key=lambda inst: inst.name)

    # -- start

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Instance:
        """Start ``argv`` detached as instance ``name`` and return it.

        ConflictError if an instance of that name is alive; a dead one's folder is reused.
        StateError if the command cannot be executed (the folder is then removed).
        """
        argv = [str(a) for a in argv]
        if not argv:
            raise InvalidArgumentError("cannot start a worker with an empty command")
        with self._locked(self.folder(name)) as folder:
            if folder.is_dir():
                current = self._read(folder)
                if current.alive:
                    raise ConflictError(f"worker {name!r} is already running (pid {current.pid})")
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            started_at = self._wall()
            pid = self._launch(folder, argv, env, cwd)
            meta = {
                "name": name,
                "argv": argv,
                "started_at": started_at,
                "pid": pid,
                "proc_start": process_start_ticks(pid),
                "cwd": str(Path(cwd) if cwd else Path.cwd()),
            }
            _write_atomic(folder / CMD_FILE, json.dumps(meta, indent=2))
            _write_atomic(folder / PID_FILE, str(pid))
            return self._read(folder)

    def _launch(self, folder: Path, argv: list[str], env: Mapping[str, str] | None,
                cwd: str | os.PathLike[str] | None) -> int:
        spec = {
            "argv": argv,
            "out": str(folder / OUT_LOG),
            "err": str(folder / ERR_LOG),
            "cwd": str(cwd) if cwd else None,
        }
        launcher = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _LAUNCHER],
            input=json.dumps(spec).encode(),
            capture_output=True,
            env=dict(env) if env is not None else None,
            timeout=30,
            check=False,
        )
        out = launcher.stdout.decode().strip()
        if launcher.returncode != 0 or not out.isdigit():
            shutil.rmtree(folder, ignore_errors=True)
            reason = launcher.stderr.decode(errors="replace").strip() or f"code {launcher.returncode}"
            raise StateError(f"cannot start worker with command {argv!r}: {reason}")
        return int(out)

    # -- stop

    def stop(self, name: str, *, grace_s: float = 10.0, kill_wait_s: float = 5.0) -> StopResult:
        """SIGTERM the instance's process group, wait ``grace_s``, then SIGKILL; remove its folder.

        A dead instance (stale pid file) or one with an unreadable pid file is only cleaned.
        NotFoundError if there is no such instance.
        """
        results = self._stop_folders([self.folder(name)], grace_s, kill_wait_s)
        if not results:
            raise NotFoundError(f"no local worker named {name!r} (looked in {self.root})")
        return results[0]

    def stop_all(self, *, grace_s: float = 10.0, kill_wait_s: float = 5.0) -> list[StopResult]:
        """Stop every local instance at once: one SIGTERM each, one shared grace period."""
        return self._stop_folders([inst.folder for inst in self.instances()], grace_s, kill_wait_s)

    def _stop_folders(self, folders: list[Path], grace_s: float, kill_wait_s: float) -> list[StopResult]:
        with contextlib.ExitStack() as stack:
            found = [self._read(f) for f in folders if stack.enter_context(self._locked(f)).is_dir()]
            running = [inst for inst in found if inst.alive and inst.pid is not None]
            for inst in running:
                signal_group(cast(int, inst.pid), signal.SIGTERM)
            survivors = self._wait_gone(running, grace_s)
            for inst in survivors:
                signal_group(cast(int, inst.pid), signal.SIGKILL)  # survivors of running: pids set
            unkillable = self._wait_gone(survivors, kill_wait_s)
            results = [_outcome(inst, survivors, unkillable) for inst in found]
            for inst in found:
                if inst not in unkillable:
                    shutil.rmtree(inst.folder, ignore_errors=True)
        if unkillable:
            pids = ", ".join(str(inst.pid) for inst in unkillable)
            raise StateError(f"worker process(es) {pids} survived SIGKILL for {kill_wait_s}s")
        return results

    def _wait_gone(self, instances: list[Instance], timeout_s: float) -> list[Instance]:
        """Wait until each leader and every member of its group are gone; return the rest."""
        deadline = self._monotonic() + timeout_s
        while True:
            left = [i for i in instances  # those of running: pids set
                    if pid_alive(cast(int, i.pid), i.proc_start) or group_alive(cast(int, i.pid))]
            if not left or self._monotonic() >= deadline:
                return left
            self._sleep(self.poll_interval_s)

    # -- logs

    def log_path(self, name: str, *, err: bool = False) -> Path:
        """Path of ``name``'s out.log (err.log with ``err``); NotFoundError if it has none."""
        inst = self.get(name)
        path = inst.err_log if err else inst.out_log
        if not path.is_file():
            raise NotFoundError(f"worker {name!r} has no {path.name} (in {inst.folder})")
        return path

    def tail(self, name: str, lines: int = 10, *, err: bool = False) -> list[str]:
        """The last ``lines`` lines of the instance's out.log (err.log with ``err``)."""
        if lines < 0:
            raise InvalidArgumentError(f"lines must be >= 0, got {lines}")
        return tail_file(self.log_path(name, err=err), lines)

    def follow(
        self,
        name: str,
        *,
        lines: int = 10,
        err: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Yield the last ``lines`` lines, then each new line as it is written.

        Ends when ``should_stop()`` is true, or when the instance is no longer alive and
        everything it wrote has been read.
        """
        yield from self.tail(name, lines, err=err)
        path = self.log_path(name, err=err)
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            yield from self._follow_handle(name, handle, should_stop)

    def _follow_handle(self, name: str, handle: IO[bytes], should_stop: Callable[[], bool] | None) -> Iterator[str]:
        pending = b""
        while True:
            chunk = handle.read(65536)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    yield raw.decode("utf-8", errors="replace")
                continue
            if should_stop is not None and should_stop():
                return
            if not self._is_running(name):
                if pending:
                    yield pending.decode("utf-8", errors="replace")
                return
            self._sleep(self.poll_interval_s)

    def _is_running(self, name: str) -> bool:
        folder = self.folder(name)
        return folder.is_dir() and self._read(folder).alive


def _outcome(inst: Instance, survivors: list[Instance], unkillable: list[Instance]) -> StopResult:
    if inst.pid is None:
        outcome = "invalid_pid"
    elif not inst.alive:
        outcome = "stale"
    elif inst in unkillable:
        outcome = "unkillable"
    else:
        outcome = "killed" if inst in survivors else "terminated"
    return StopResult(name=inst.name, pid=inst.pid, outcome=outcome)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
