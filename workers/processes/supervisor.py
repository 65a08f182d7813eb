"""Run P worker processes on one host and keep them running (``tokiwa-worker run --processes P``).

The supervisor owns one asyncio task per slot. A slot starts its child, waits for it to
exit, and restarts it after an exponential backoff: ``restart_backoff_s``, then twice that,
and so on up to ``max_backoff_s``; a child that ran ``stable_after_s`` or longer is
considered healthy and its next restart waits the base delay again. So a worker killed
by the OOM killer is back in ``restart_backoff_s``, while one that crashes at import does
not spin the CPU.

Shutdown: SIGTERM or SIGINT (Ctrl+C) asks every child to stop with one SIGTERM, waits up
to ``grace_period_s`` for them, SIGKILLs whatever is left and returns ``EXIT_OK``. A second
signal SIGKILLs the children at once and returns ``EXIT_FORCED``.

Each child runs in its own process group, so a signal sent to the supervisor's group (by
``tokiwa-worker stop``, systemd or a terminal) reaches the children once, through the
supervisor, and a worker never mistakes a duplicate SIGTERM for the "second signal, exit
now" one. On Linux each child also gets SIGTERM from the kernel if the supervisor dies
(``PR_SET_PDEATHSIG``), so even ``kill -9`` of the supervisor leaves no orphan running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from orchestrator.errors import InvalidArgumentError, StateError

EXIT_OK = 0
EXIT_FORCED = 130  # a second SIGTERM / SIGINT: children were SIGKILLed without a grace period
EXIT_ORPHANED = 70  # a child whose supervisor died while it was being started
_PR_SET_PDEATHSIG = 1
_SIG_DFL = 0

log = logging.getLogger("tokiwa.supervisor")


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn (Linux only) that makes the kernel SIGTERM the child when we die.

    Until it execs, the forked child still has our Python signal handlers, which would
    swallow that SIGTERM; so the child first restores the default actions (through libc,
    which works from any thread), then asks for the signal, then exits at once if we are
    already gone.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl, set_handler = libc.prctl, libc.signal
    except (OSError, AttributeError):
        return None
    set_handler.argtypes = [ctypes.c_int, ctypes.c_void_p]
    set_handler.restype = ctypes.c_void_p

    def preexec() -> None:  # runs in the forked child before exec: keep it tiny
        set_handler(signal.SIGTERM, _SIG_DFL)
        set_handler(signal.SIGINT, _SIG_DFL)
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
            os._exit(EXIT_ORPHANED)

    return preexec


def without_option(args: Sequence[str], name: str, short: str | None = None) -> list[str]:
    """``args`` minus option ``name`` (or ``short``) and its value, in any of click's
    spellings: ``--name V``, ``--name=V``, ``-s V``, ``-sV`` (a numeric ``V``)."""
    kept: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg == name or (short is not None and arg == short):
            skip_next = True
        elif arg.startswith(name + "=") or (short is not None and arg.startswith(short)
                                           and arg[len(short):].isdigit()):
            continue
        else:
            kept.append(arg)
    return kept


def child_run_argv(run_args: Sequence[str], *, python: str = sys.executable) -> list[str]:
    """The command line of one supervised worker: ``python -m workers.cli run`` with
    ``run_args`` minus ``--processes`` / ``-p`` and its value, so a child never supervises."""
    return [python, "-m", "workers.cli", "run", *without_option(run_args, "--processes", "-p")]


class Supervisor:
    """Keep ``processes`` children running; ``argv_factory(slot)`` gives slot's command line."""

    def __init__(
        self,
        argv_factory: Callable[[int], Sequence[str]],
        *,
        processes: int = 1,
        restart_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_after_s: float = 30.0,
        grace_period_s: float = 30.0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if processes < 1:
            raise InvalidArgumentError(f"processes must be >= 1, got {processes}")
        if restart_backoff_s < 0 or max_backoff_s < restart_backoff_s:
            raise InvalidArgumentError(
                f"need 0 <= restart_backoff_s <= max_backoff_s, got {restart_backoff_s} and {max_backoff_s}"
            )
        if grace_period_s < 0:
            raise InvalidArgumentError(f"grace_period_s must be >= 0, got {grace_period_s}")
        self.argv_factory = argv_factory
        self.processes = processes
        self.restart_backoff_s = restart_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_after_s = stable_after_s
        self.grace_period_s = grace_period_s
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._monotonic = monotonic
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._failure: BaseException | None = None
        self.restarts: dict[int, int] = {slot: 0 for slot in range(processes)}
        self.exit_codes: dict[int, list[int]] = {slot: [] for slot in range(processes)}

    # -- public

    @property
    def pids(self) -> dict[int, int]:
        """Slot -> pid of the running child (slots waiting for a restart are absent)."""
        return {slot: p.pid for slot, p in self._children.items() if p.returncode is None}

    def backoff_s(self, failures: int) -> float:
        """Delay before the restart after ``failures`` quick exits in a row (1 -> base delay)."""
        delay: float = self.restart_backoff_s * 2 ** max(0, failures - 1)
        return min(self.max_backoff_s, delay)

    def request_stop(self) -> None:
        """Ask :meth:`serve` to stop gracefully (safe from a signal handler)."""
        if self._stop is not None:
            self._stop.set()

    def run_sync(self) -> int:
        """Run until SIGTERM / SIGINT in a fresh event loop; return the exit code."""
        return asyncio.run(self.run())

    async def run(self) -> int:
        """Install SIGTERM / SIGINT handlers, serve until a signal, return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            await self.serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return EXIT_FORCED if self._signals > 1 else EXIT_OK

    async def serve(self) -> None:
        """Start every slot, wait for :meth:`request_stop`, then stop all children."""
        if self._stop is not None:
            raise StateError("this Supervisor is already running")
        self._stop = asyncio.Event()
        try:
            for slot in range(self.processes):
                task = asyncio.create_task(self._keep_running(slot, self._stop), name=f"supervisor-{slot}")
                self._tasks.add(task)
                task.add_done_callback(self._slot_done)
            await self._stop.wait()
        finally:
            self._stop.set()
            await self._shutdown()
        if self._failure is not None:
            raise StateError(f"supervisor stopped: a slot failed: {self._failure!r}") from self._failure

    # -- internals

    def _slot_done(self, task: asyncio.Task[None]) -> None:
        """A slot task ends only on stop, unless it failed (argv_factory raised ...): then stop all."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("supervisor: %s failed: %r; stopping every worker", task.get_name(), task.exception())
        self._failure = self._failure or task.exception()
        self.request_stop()

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("supervisor: stopping %d worker process(es)", len(self.pids))
            self.request_stop()
        else:
            log.warning("supervisor: second signal, killing worker processes now")
            self._signal_all(signal.SIGKILL)

    async def _keep_running(self, slot: int, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            started = self._monotonic()
            code = await self._run_child(slot)
            if stop.is_set():
                return
            self.exit_codes[slot].append(code)
            failures = 1 if self._monotonic() - started >= self.stable_after_s else failures + 1
            delay = self.backoff_s(failures)
            log.warning("supervisor: worker %d exited with code %s; restart in %.2fs", slot, code, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if not stop.is_set():
                self.restarts[slot] += 1

    async def _run_child(self, slot: int) -> int:
        argv = [str(a) for a in self.argv_factory(slot)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=self.env,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(os.getpid()),
            )
        except OSError as exc:
            log.error("supervisor: cannot start worker %d (%s): %s", slot, argv, exc)
            return -1
        self._children[slot] = proc
        log.info("supervisor: worker %d started, pid %d", slot, proc.pid)
        if self._stop is not None and self._stop.is_set():  # stop came while it was starting
            proc.send_signal(signal.SIGTERM)
        try:
            return await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise

    def _signal_all(self, sig: int) -> None:
        for proc in list(self._children.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _shutdown(self) -> None:
        """SIGTERM every child, wait the grace period, SIGKILL the rest, end the slot tasks."""
        self._signal_all(signal.SIGTERM)
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.grace_period_s)
            if pending:
                log.warning("supervisor: %d worker(s) outlived the grace period; killing", len(pending))
                self._signal_all(signal.SIGKILL)
                _, pending = await asyncio.wait(pending, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._children.clear()
