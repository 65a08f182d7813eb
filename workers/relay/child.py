"""One child process of the relay: spawn, read its output, feed its stdin, stop it.

A child is started without a shell, in its own session and process group
(``start_new_session=True``), with ``PR_SET_PDEATHSIG = SIGKILL`` set between fork and exec
so the kernel kills it if the relay's process dies, even by ``kill -9``. (The parent-death
signal is not inherited by the child's own children; those are reached by the process-group
signals of a normal shutdown.)

Delivery into the child goes through a bounded queue and one writer task: when a slow child
stops reading, its pipe fills, the writer waits, the queue fills, and further messages are
counted in :attr:`ChildProcess.overflow` instead of stalling the relay for everyone else.
Lossless topics use :meth:`ChildProcess.deliver_wait` instead, which waits for room.

Output goes the other way: after each chunk it has read, a reader asks the relay's ``pace``
hook whether to wait (a lossless topic's messages are queued for Redis faster than Redis takes
them); while it waits, the child's pipe fills and the child blocks in its own write. Once the
child has exited its readers stop waiting: what is left in its pipes is finite (a pipe
buffer), and it is read to the end, so a child that wrote a burst and exited loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import RelayError
from workers.relay.config import TaskConfig
from workers.relay.protocol import Output, OutputParser

log = logging.getLogger("tokiwa.relay")

#: longest output line read from a child; a longer one is dropped and counted as malformed.
MAX_LINE_BYTES = 1 << 20
#: bytes read from a child's stdout/stderr per read.
READ_CHUNK = 1 << 16
#: after a child exits, how long its stdout/stderr readers may still drain late output (upstream: 500 ms).
DRAIN_AFTER_EXIT_S = 0.5
#: messages written to a child's stdin in one go (one drain) at most.
WRITE_BATCH = 256

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal, shutdown still kills the group
    _prctl = None

OutputHandler = Callable[["ChildProcess", Output, str], None]
PaceHook = Callable[["ChildProcess"], "Awaitable[Any] | None"]


@dataclass(frozen=True, slots=True)
class TaskExit:
    """What ``on_task_exit`` receives when a child process ends (or could not start).

    ``code`` is the exit code, negative when a signal killed it (``-9`` = SIGKILL), None
    when the process never started (``error`` says why).
    """

    task: str
    task_id: str
    pid: int | None
    code: int | None
    failed: bool
    restarting: bool
    restart_in_s: float | None
    restarts: int
    host: str
    relay_id: str
    error: str | None = None
    function_of: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.code is None:
            return f"task {self.task} failed to start: {self.error}"
        if self.code < 0:
            try:
                how = f"was killed by {signal.Signals(-self.code).name}"
            except ValueError:
                how = f"was killed by signal {-self.code}"
        else:
            how = f"exited with code {self.code}"
        return f"task {self.task} (pid {self.pid}) {how}"



def new_task_id() -> str:
    """A UUIDv7 (time-ordered, as Miclow's ``MICLOW_TASK_ID``); uuid.uuid7 when Python has it."""
    maker = getattr(uuid, "uuid7", None)
    if maker is not None:
        return str(maker())
    ms = time.time_ns() // 1_000_000 & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def _death_signal_preexec(parent_pid: int) -> Callable[[], None]:
    """preexec_fn for the child: SIGKILL me when my parent dies (and if it already has, exit)."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


def resolve_command(command: str, cwd: Path | None, env: dict[str, str]) -> str:
    """The executable to run: a path (relative to ``cwd``) or a name found on ``PATH``.

    Raises :class:`RelayError` when there is none, so the task is reported as failed to start.
    """
    if os.sep in command:
        path = Path(command) if Path(command).is_absolute() else (cwd or Path.cwd()) / command
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise RelayError(f"command not found or not executable: {command}")
    found = shutil.which(command, path=env.get("PATH", os.defpath))
    if found is None:
        raise RelayError(f"command not found on PATH: {command}")
    return found


class ChildProcess:
    """One running instance of a task (or of a function)."""

    def __init__(
        self,
        spec: TaskConfig,
        on_output: OutputHandler,
        *,
        extra_env: dict[str, str] | None = None,
        function_of: str | None = None,
        pace: PaceHook | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.task_name
        self.framing = spec.stdin_framing
        self.task_id = new_task_id()
        #: the caller's task name when this is a function instance
        self.function_of = function_of
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(spec.queue_max)
        self.overflow = 0
        self.delivered = 0
        self.malformed = 0
        self.undelivered_at_exit = 0
        self.pid: int | None = None
        self.returncode: int | None = None
        self.started_at = 0.0
        self._on_output = on_output
        self._pace = pace
        self._gone = asyncio.Event()  # set once the process has exited and its I/O ended
        self._exited = asyncio.Event()  # set once the process has exited (readers stop pacing)
        self._extra_env = dict(extra_env or {})
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None

    # -- start ---------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.spec.environment_vars)
        env.update(self._extra_env)
        env["MICLOW_TASK_ID"] = self.task_id
        return env

    async def start(self) -> None:
        """Spawn the process and its reader/writer tasks. Raises :class:`RelayError` when the
        command cannot be found or started."""
        env = self._env()
        cwd = self.spec.working_directory
        exe = resolve_command(self.spec.command, cwd, env)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                exe, *self.spec.args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=str(cwd) if cwd else None, env=env,
                start_new_session=True, preexec_fn=_death_signal_preexec(os.getpid()),
            )
        except OSError as exc:
            raise RelayError(f"cannot start task {self.name!r}: {exc}") from exc
        self.pid = self._proc.pid
        self.started_at = time.time()
        assert self._proc.stdout and self._proc.stderr  # noqa: S101 - PIPE was asked for
        self._readers = [
            asyncio.create_task(self._read(self._proc.stdout, self.spec.stdout_topic, "stdout")),
            asyncio.create_task(self._read(self._proc.stderr, self.spec.stderr_topic, "stderr")),
        ]
        self._writer = asyncio.create_task(self._write())

    # -- output --------------------------------------------------------------------------
    async def _read(self, stream: asyncio.StreamReader, plain_topic: str, which: str) -> None:
        """Split the stream into lines and hand each to the parser. Reads in chunks (one
        await per burst, not per line); a line longer than MAX_LINE_BYTES is dropped whole
        and reported once."""
        parser, emit, pace = OutputParser(plain_topic, dialect=self.spec.protocol), self._on_output, self._pace
        buf, dropping = bytearray(), False
        try:
            while chunk := await stream.read(READ_CHUNK):
                buf += chunk
                start = 0
                while (end := buf.find(b"\n", start)) >= 0:
                    if dropping:
                        dropping = False
                    else:
                        out = parser.feed(buf[start:end + 1].decode("utf-8", errors="replace"))
                        if out is not None:
                            emit(self, out, which)
                    start = end + 1
                del buf[:start]
                if len(buf) > MAX_LINE_BYTES:
                    if not dropping:
                        emit(self, Output("plain", plain_topic, "", f"line longer than {MAX_LINE_BYTES} bytes dropped"), which)
                    buf.clear()
                    dropping = True
                if pace is not None and not self._exited.is_set() and (wait := pace(self)) is not None:
                    await self._until_exit(wait)
            if buf and not dropping:  # a last line without a newline
                out = parser.feed(buf.decode("utf-8", errors="replace"))
                if out is not None:
                    emit(self, out, which)
        finally:
            out = parser.finish()
            if out is not None:
                emit(self, out, which)

    async def _until_exit(self, wait: Awaitable[Any]) -> None:
        """Await ``wait``, but no longer than the process lives."""
        waiter = asyncio.ensure_future(wait)
        if self._exited.is_set():
            waiter.cancel()
            return
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait((waiter, exited), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (waiter, exited):
                if not fut.done():
                    fut.cancel()

    # -- input ---------------------------------------------------------------------------
    def deliver(self, data: bytes) -> bool:
        """Queue ``data`` for the child's stdin; False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.overflow += 1
            if self.overflow == 1 or self.overflow % 1000 == 0:
                log.warning("relay: task %s is not reading its stdin; %d message(s) overflowed",
                            self.name, self.overflow)
            return False
        return True

    async def deliver_wait(self, data: bytes) -> bool:
        """Queue ``data`` for the child's stdin, waiting while its queue is full (lossless
        topics); False when the child exits first."""
        if self.queue.full():
            put = asyncio.ensure_future(self.queue.put(data))
            gone = asyncio.ensure_future(self._gone.wait())
            try:
                await asyncio.wait((put, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not put.done():
                    put.cancel()
            if not put.done() or put.cancelled():
                return False
            return True
        if self._gone.is_set():
            return False
        self.queue.put_nowait(data)
        return True

    async def _write(self) -> None:
        assert self._proc and self._proc.stdin  # noqa: S101
        stdin, queue = self._proc.stdin, self.queue
        try:
            while True:
                chunk = [await queue.get()]
                while len(chunk) < WRITE_BATCH and not queue.empty():
                    chunk.append(queue.get_nowait())
                stdin.write(b"".join(chunk) if len(chunk) > 1 else chunk[0])
                await stdin.drain()
                self.delivered += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("relay: stdin of task %s closed", self.name)

    # -- exit and stop -------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def wait(self) -> int:
        """Wait for the process to exit, let its readers drain late output (≤ 0.5 s), stop
        the writer, and return the exit code (negative: killed by that signal)."""
        assert self._proc is not None  # noqa: S101
        code = await self._proc.wait()
        self.returncode = code
        self._exited.set()
        await self._finish_io()
        return code

    async def _finish_io(self) -> None:
        """End the reader and writer tasks of an exited process (idempotent)."""
        _, pending = await asyncio.wait(self._readers, timeout=DRAIN_AFTER_EXIT_S) if self._readers else (set(), set())
        for task in pending:
            task.cancel()
        if self._writer is not None:
            self._writer.cancel()
        await asyncio.gather(*self._readers, *(t for t in [self._writer] if t), return_exceptions=True)
        self.undelivered_at_exit = self.queue.qsize()
        self._gone.set()

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (it leads its own group)."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM to the process group, wait ``grace_s``, then SIGKILL the group."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), grace_s)
            except TimeoutError:
                log.warning("relay: task %s ignored SIGTERM for %.1fs; sending SIGKILL", self.name, grace_s)
        # also reaches grandchildren left in the group after the leader exited
        self.signal_group(signal.SIGKILL)
        self.returncode = await self._proc.wait()
        self._exited.set()
        await self._finish_io()

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name, "id": self.task_id, "pid": self.pid, "alive": self.alive,
            "exit_code": self.returncode, "queue": self.queue.qsize(), "queue_max": self.spec.queue_max,
            "overflow": self.overflow, "delivered": self.delivered, "malformed": self.malformed,
            "framing": self.framing, "function_of": self.function_of,
        }
