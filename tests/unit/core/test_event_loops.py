"""The CLIs' event loop choice: auto / asyncio / uvloop, from --loop or TOKIWA_LOOP."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.cli import exitcodes, loops
from orchestrator.cli.producer import run_async
from orchestrator.errors import ConfigError


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(loops.LOOP_ENV, raising=False)


@pytest.mark.parametrize("installed, expected", [(True, "uvloop"), (False, "asyncio")])
def test_auto_picks_uvloop_exactly_when_it_is_installed(no_env, monkeypatch, installed, expected):
    monkeypatch.setattr(loops, "uvloop_installed", lambda: installed)
    assert loops.resolve_loop("auto") == expected
    assert loops.resolve_loop() == expected  # auto is the default


def test_asyncio_is_kept_even_when_uvloop_is_installed(no_env, monkeypatch):
    monkeypatch.setattr(loops, "uvloop_installed", lambda: True)
    assert loops.resolve_loop("asyncio") == "asyncio"
    assert loops.loop_runner("asyncio") is asyncio.run


def test_the_environment_names_the_loop_when_no_flag_does(monkeypatch):
    monkeypatch.setattr(loops, "uvloop_installed", lambda: True)
    monkeypatch.setenv(loops.LOOP_ENV, "ASYNCIO ")
    assert loops.resolve_loop() == "asyncio"
    assert loops.resolve_loop("uvloop") == "uvloop"  # the flag wins


def test_an_unknown_loop_is_a_config_error_naming_the_choices(no_env):
    with pytest.raises(ConfigError, match="auto, asyncio, uvloop") as info:
        loops.resolve_loop("trio")
    assert info.value.field == "loop"


def test_uvloop_asked_for_but_missing_says_how_to_install_it(no_env, monkeypatch):
    monkeypatch.setattr(loops, "uvloop_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'tokiwa\[uvloop\]'"):
        loops.resolve_loop("uvloop")


def test_run_async_reports_a_bad_loop_and_never_leaves_the_coroutine_unawaited(no_env, capsys):
    async def work() -> int:
        return 0

    assert run_async(work(), loop="nope") == exitcodes.USAGE  # warnings are errors: no "never awaited"
    assert "unknown event loop 'nope'" in capsys.readouterr().err


def test_run_async_runs_on_the_chosen_loop(no_env):
    async def which() -> int:
        return 3 if "uvloop" in type(asyncio.get_running_loop()).__module__ else 4

    assert run_async(which(), loop="asyncio") == 4
    if loops.uvloop_installed():
        assert run_async(which(), loop="uvloop") == 3
