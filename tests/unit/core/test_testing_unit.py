"""orchestrator.testing and orchestrator.pytest_plugin without a Redis: argument checks, and a
plugin that imports nothing of tokiwa (pytest loads it in every project where tokiwa is
installed) and still imports without pytest-asyncio."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator import Orchestrator
from orchestrator.errors import InvalidArgumentError, StateError
from orchestrator.testing import TokiwaTestApp


def test_the_plugin_loads_nothing_of_tokiwa():
    code = ("import sys, orchestrator.pytest_plugin\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('orchestrator.') and m != 'orchestrator.pytest_plugin')\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_without_pytest_asyncio_the_async_fixtures_fail_saying_so(monkeypatch):
    from orchestrator import pytest_plugin

    monkeypatch.setitem(sys.modules, "pytest_asyncio", None)  # import fails

    async def tokiwa_thing(tokiwa_backend):
        raise AssertionError("not run")

    assert pytest_plugin._async_fixture(tokiwa_thing) is not None  # a fixture all the same
    with pytest.raises(pytest.fail.Exception, match="tokiwa_thing needs pytest-asyncio"):
        pytest_plugin._needs_pytest_asyncio(tokiwa_thing)("redis")


def test_bad_arguments_are_refused():
    app = Orchestrator()
    with pytest.raises(InvalidArgumentError, match="backend"):
        TokiwaTestApp(app, backend="memory")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="redis_url"):
        TokiwaTestApp(app, backend="fakeredis", redis_url="redis://127.0.0.1:1/0")


async def test_a_test_app_that_is_not_started_says_so():
    t = TokiwaTestApp(Orchestrator(), backend="fakeredis")
    with pytest.raises(StateError, match="not started"):
        await t.drain()
    await t.stop()  # nothing to stop


async def test_drain_times_out_naming_the_groups():
    app = Orchestrator()

    async def slow(event):
        import asyncio

        await asyncio.sleep(5)

    app.dispatcher.subscribe("slow", slow, name="slow")
    async with TokiwaTestApp(app, backend="fakeredis", settings={"grace_period_s": 0}) as t:
        await app.publish("slow")
        with pytest.raises(TimeoutError):
            await t.drain(timeout=0.3)
