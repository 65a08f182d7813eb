"""Helpers for tests that run real worker processes. Only ever signal pids started here."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker_env(base: dict[str, str], redis_url: str, namespace: str, **settings: object) -> dict[str, str]:
    env = dict(base)
    env["TOKIWA_REDIS_URL"] = redis_url
    env["TOKIWA_NAMESPACE"] = namespace
    for name, value in settings.items():
        env[name if name.startswith("TEST_") else f"TOKIWA_{name.upper()}"] = str(value)
    return env


def start_worker(env: dict[str, str], log_path: Path, *args: str,
                 app: str = "tests.integration.apps.counting:app") -> subprocess.Popen:
    """Start ``tokiwa-worker run`` as a real process, output to ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process by the caller's stop()
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "run", "--app", app, *args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Signal a process this test started and wait; SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
            proc.send_signal(sig)
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05,
               message: str = "condition") -> float:
    """Wait until ``predicate()`` holds; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0) -> None:
    """Await ``check()`` every 50 ms until it is true; AssertionError naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
