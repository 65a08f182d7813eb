"""Run external commands safely: an argv list without a shell by default.

``exec_command(["git", "status"])`` never goes through a shell, so a parameter that contains
``; rm -rf ~`` is just an argument. Shell syntax (pipes, globs, ``&&``) needs the explicit
``exec_shell(cmd, allow_shell=True)``; without the flag it raises ShellNotAllowedError, as
tokiwa's ``execAsync`` does.

Each helper has an async twin (``exec_command_async`` / ``exec_shell_async``) for async
handlers. Failures are :class:`~orchestrator.errors.CommandError` carrying ``argv``,
``exit_code``, ``stdout`` and ``stderr``. A command that outlives ``timeout`` is killed with
its whole process group (it runs in a new session), so no grandchild survives it; the same
happens when the awaiting task is cancelled.

``env`` is added to (and overrides) the current environment rather than replacing it: a
command almost always needs ``PATH`` and ``HOME``. Output is decoded as UTF-8 with
replacement characters for invalid bytes. What the OS cannot pass to a process, a NUL byte
in an argument or in the environment and a variable name holding ``=``, is an
InvalidArgumentError naming the item, raised before anything starts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import CommandError, InvalidArgumentError, ShellNotAllowedError

SHELL = "/bin/sh"
_STDERR_IN_MESSAGE = 2000  # characters of stderr quoted in an error message
_WAIT_SLICE_S = 0.1  # a sync exec_command returns to Python this often while it waits


@dataclass(frozen=True)
class ExecResult:
    """What a finished command did."""

    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float = field(default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "stdout": self.stdout, "stderr": self.stderr}


def check_argv(argv: Any) -> list[str]:
    """A non-empty list of strings (or paths); a plain string is refused with a hint."""
    if isinstance(argv, (str, bytes)):
        raise InvalidArgumentError(
            f"argv must be a list such as ['ls', '-l'], not the string {argv!r}; "
            "for shell syntax use exec_shell(cmd, allow_shell=True)"
        )
    if not isinstance(argv, Sequence) or not argv:
        raise InvalidArgumentError(f"argv must be a non-empty list of strings, got {argv!r}")
    out = []
    for i, arg in enumerate(argv):
        if not isinstance(arg, (str, os.PathLike)):
            raise InvalidArgumentError(f"argv[{i}] must be a string, got {type(arg).__name__} {arg!r}")
        text = os.fspath(arg)
        if ("\x00" if isinstance(text, str) else b"\x00") in text:
            raise InvalidArgumentError(f"argv[{i}] {text!r} contains a NUL byte, which no command argument can hold")
        out.append(text)
    return out


def _check_options(timeout: float | None, ok_codes: Iterable[int]) -> tuple[int, ...]:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    codes = tuple(ok_codes)
    if not codes or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise InvalidArgumentError(f"ok_codes must be a non-empty list of integers, got {ok_codes!r}")
    return codes


def _environment(env: Mapping[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return None
    merged = dict(os.environ)
    for key, value in env.items():
        name, text = str(key), str(value)
        if not name or "=" in name or "\x00" in name:
            raise InvalidArgumentError(f"environment variable name {name!r} must be non-empty, without '=' or NUL")
        if "\x00" in text:
            raise InvalidArgumentError(f"environment variable {name} contains a NUL byte, which no "
                                       "environment value can hold")
        merged[name] = text
    return merged


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def _finish(argv: list[str], code: int, out: bytes, err: bytes, started: float, ok: tuple[int, ...]) -> ExecResult:
    result = ExecResult(argv, code, _decode(out), _decode(err), time.monotonic() - started)
    if code not in ok:
        tail = result.stderr.strip()[-_STDERR_IN_MESSAGE:]
        raise CommandError(
            f"command {argv!r} exited with code {code}" + (f": {tail}" if tail else ""),
            argv=argv,
            exit_code=code,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return result


def _not_started(argv: list[str], exc: OSError) -> CommandError:
    return CommandError(f"command {argv!r} could not start: {exc.strerror or exc}", argv=argv)


def _timed_out(argv: list[str], timeout: float, out: bytes | None, err: bytes | None) -> CommandError:
    return CommandError(
        f"command {argv!r} timed out after {timeout:g}s and was killed",
        argv=argv,
        stdout=_decode(out),
        stderr=_decode(err),
        timed_out=True,
    )


def _prepare(argv: Sequence[str], cwd: str | os.PathLike[str] | None, env: Mapping[str, str] | None,
             timeout: float | None, ok_codes: Iterable[int], input: bytes | str | None,  # noqa: A002
             ) -> tuple[list[str], tuple[int, ...], bytes | None, dict[str, Any]]:
    """What both twins check and start with: the argv, the ok exit codes, the stdin bytes and
    the process options (own session, so a kill reaches the command's whole group)."""
    args = check_argv(argv)
    codes = _check_options(timeout, ok_codes)
    data = input.encode() if isinstance(input, str) else input
    options = {"cwd": cwd, "env": _environment(env), "stdin": subprocess.PIPE if data is not None else subprocess.DEVNULL,
               "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "start_new_session": True}
    return args, codes, data, options


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _communicate(proc: subprocess.Popen[bytes], data: bytes | None, deadline: float | None) -> tuple[bytes, bytes]:
    """``proc.communicate`` in slices of at most :data:`_WAIT_SLICE_S`, so that the calling
    thread is back in Python code several times a second: a sync node interrupted while it
    waits (:mod:`orchestrator.workflow.threads`) stops and kills the command at once instead
    of when the command ends. TimeoutExpired once ``deadline`` (monotonic) has passed."""
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        wait = _WAIT_SLICE_S if left is None else max(0.0, min(left, _WAIT_SLICE_S))
        try:
            return proc.communicate(data, timeout=wait)
        except subprocess.TimeoutExpired:
            if left is not None and left <= _WAIT_SLICE_S:
                raise
        data = None  # the input is sent once; later calls go on with what is left of it


def exec_command(
    argv: Sequence[str],
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ok_codes: Iterable[int] = (0,),
    *,
    input: bytes | str | None = None,
) -> ExecResult:
    """Run ``argv`` without a shell and wait for it; CommandError unless its exit code is ok."""
    args, codes, data, options = _prepare(argv, cwd, env, timeout, ok_codes, input)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(args, **options)
    except OSError as exc:
        raise _not_started(args, exc) from exc
    try:
        out, err = _communicate(proc, data, None if timeout is None else started + timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        raise _timed_out(args, timeout or 0, out, err) from exc
    except BaseException:  # KeyboardInterrupt, NodeInterrupted and friends: never leave the child behind
        _kill_group(proc.pid)
        proc.wait()
        raise
    return _finish(args, proc.returncode, out, err, started, codes)


def exec_shell(
    cmd: str,
    allow_shell: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ok_codes: Iterable[int] = (0,),
    *,
    input: bytes | str | None = None,
) -> ExecResult:
    """Run ``cmd`` with ``/bin/sh -c``; refused unless ``allow_shell=True``."""
    return exec_command(_shell_argv(cmd, allow_shell), cwd, env, timeout, ok_codes, input=input)


def _shell_argv(cmd: Any, allow_shell: bool) -> list[str]:
    if allow_shell is not True:
        raise ShellNotAllowedError(
            "running a shell command needs allow_shell=True (shell syntax can inject commands); "
            "prefer exec_command([...]) with an argv list"
        )
    if not isinstance(cmd, str) or not cmd.strip():
        raise InvalidArgumentError(f"a shell command must be a non-empty string, got {cmd!r}")
    return [SHELL, "-c", cmd]


async def exec_command_async(
    argv: Sequence[str],
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ok_codes: Iterable[int] = (0,),
    *,
    input: bytes | str | None = None,
) -> ExecResult:
    """Async twin of :func:`exec_command`; cancelling the caller kills the command's group."""
    args, codes, data, options = _prepare(argv, cwd, env, timeout, ok_codes, input)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(*args, **options)
    except OSError as exc:
        raise _not_started(args, exc) from exc
    communicate = asyncio.ensure_future(proc.communicate(data))
    try:
        out, err = await asyncio.wait_for(asyncio.shield(communicate), timeout)
    except TimeoutError as exc:
        _kill_group(proc.pid)
        out, err = await communicate
        raise _timed_out(args, timeout or 0, out, err) from exc
    except BaseException:  # CancelledError included: kill, reap, re-raise
        _kill_group(proc.pid)
        communicate.cancel()
        await asyncio.shield(proc.wait())
        raise
    return _finish(args, proc.returncode if proc.returncode is not None else -1, out, err, started, codes)


async def exec_shell_async(
    cmd: str,
    allow_shell: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ok_codes: Iterable[int] = (0,),
    *,
    input: bytes | str | None = None,
) -> ExecResult:
    """Async twin of :func:`exec_shell`."""
    return await exec_command_async(_shell_argv(cmd, allow_shell), cwd, env, timeout, ok_codes, input=input)
