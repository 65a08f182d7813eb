"""exec helpers: argv without a shell, explicit opt-in for shell syntax, typed failures."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from orchestrator.errors import CommandError, InvalidArgumentError, ShellNotAllowedError, StepExecutionError
from orchestrator.workflow.execs import exec_command, exec_command_async, exec_shell, exec_shell_async

PY = sys.executable


def test_exec_command_returns_exit_code_stdout_and_stderr():
    result = exec_command([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "out\n", "err\n")
    assert result.to_dict() == {"exit_code": 0, "stdout": "out\n", "stderr": "err\n"}


def test_arguments_are_never_interpreted_by_a_shell():
    result = exec_command(["echo", "a; echo injected", "$HOME", "*"])
    assert result.stdout == "a; echo injected $HOME *\n"


def test_a_failing_command_raises_with_argv_exit_code_and_stderr():
    argv = [PY, "-c", "import sys; print('partial'); sys.stderr.write('boom'); sys.exit(3)"]
    with pytest.raises(CommandError) as info:
        exec_command(argv)
    err = info.value
    assert (err.argv, err.exit_code, err.stderr, err.stdout) == (argv, 3, "boom", "partial\n")
    assert "exited with code 3: boom" in str(err)
    assert isinstance(err, StepExecutionError)


def test_ok_codes_accept_other_exit_codes():
    assert exec_command([PY, "-c", "raise SystemExit(1)"], ok_codes=(0, 1)).exit_code == 1


def test_a_missing_program_is_a_command_error_that_names_it():
    with pytest.raises(CommandError, match="could not start") as info:
        exec_command(["/nonexistent/tool", "x"])
    assert info.value.exit_code is None and info.value.argv == ["/nonexistent/tool", "x"]


def test_cwd_and_env_are_applied_and_env_extends_the_environment(tmp_path):
    code = "import os; print(os.getcwd()); print(os.environ['EXTRA']); print('PATH' in os.environ)"
    result = exec_command([PY, "-c", code], cwd=tmp_path, env={"EXTRA": "yes"})
    assert result.stdout.split() == [str(tmp_path.resolve()), "yes", "True"]


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time;"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']);"
        f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(30)"
    )
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out after 0.5s") as info:
        exec_command([PY, "-c", code], timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.value.timed_out and info.value.exit_code is None
    child = int(marker.read_text())
    _assert_gone(child)


def _assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (killed, not yet reaped by init) is gone too
            if stat.read().split()[2] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} survived")


def test_input_is_sent_to_stdin():
    assert exec_command(["cat"], input="hello").stdout == "hello"


@pytest.mark.parametrize("argv", ["ls -l", [], ["ls", 3], None])
def test_bad_argv_is_a_clear_error(argv):
    with pytest.raises(InvalidArgumentError, match="argv"):
        exec_command(argv)


def test_a_string_argv_error_points_to_exec_shell():
    with pytest.raises(InvalidArgumentError, match="exec_shell"):
        exec_command("ls | wc")


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1}, {"ok_codes": ()}, {"ok_codes": ("0",)}])
def test_bad_timeout_or_ok_codes_are_clear_errors(kwargs):
    with pytest.raises(InvalidArgumentError):
        exec_command(["true"], **kwargs)


def test_exec_shell_refuses_without_allow_shell():
    with pytest.raises(ShellNotAllowedError, match="allow_shell=True"):
        exec_shell("echo hi | tr a-z A-Z")


def test_exec_shell_refuses_a_truthy_non_true_flag():
    with pytest.raises(ShellNotAllowedError):
        exec_shell("echo hi", allow_shell="yes")


def test_exec_shell_runs_shell_syntax_when_allowed():
    assert exec_shell("echo hi | tr a-z A-Z", allow_shell=True).stdout == "HI\n"


def test_exec_shell_failure_carries_the_shell_argv():
    with pytest.raises(CommandError) as info:
        exec_shell("echo oops >&2; exit 4", allow_shell=True)
    assert info.value.argv == ["/bin/sh", "-c", "echo oops >&2; exit 4"]
    assert (info.value.exit_code, info.value.stderr) == (4, "oops\n")


async def test_async_exec_command_returns_the_result():
    result = await exec_command_async([PY, "-c", "print(6 * 7)"])
    assert (result.exit_code, result.stdout) == (0, "42\n")


async def test_async_failure_carries_argv_exit_code_and_stderr():
    with pytest.raises(CommandError) as info:
        await exec_command_async([PY, "-c", "import sys; sys.stderr.write('bad'); sys.exit(2)"])
    assert (info.value.exit_code, info.value.stderr) == (2, "bad")


async def test_async_timeout_kills_the_command():
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out") as info:
        await exec_command_async(["sleep", "30"], timeout=0.3)
    assert info.value.timed_out and time.monotonic() - started < 5


async def test_cancelling_the_caller_kills_the_command_and_reraises(tmp_path):
    marker = tmp_path / "pid"
    task = asyncio.create_task(
        exec_command_async([PY, "-c", f"import os,time; open({str(marker)!r},'w').write(str(os.getpid())); time.sleep(30)"])
    )
    for _ in range(200):
        if marker.exists() and marker.read_text():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    _assert_gone(int(marker.read_text()))


async def test_async_exec_shell_refuses_without_allow_shell():
    with pytest.raises(ShellNotAllowedError):
        await exec_shell_async("echo hi")


async def test_async_exec_shell_runs_when_allowed():
    assert (await exec_shell_async("printf '%s' a && printf b", allow_shell=True)).stdout == "ab"


@pytest.mark.parametrize(("argv", "message"), [
    (["echo", "a\x00b"], "argv[1] 'a\\x00b' contains a NUL byte, which no command argument can hold"),
    ([Path("ech\x00o")], "argv[0] 'ech\\x00o' contains a NUL byte, which no command argument can hold"),
])
def test_a_nul_byte_in_an_argument_is_a_clear_error_not_a_bare_value_error(argv, message):
    with pytest.raises(InvalidArgumentError) as info:
        exec_command(argv)
    assert str(info.value) == message


@pytest.mark.parametrize(("env", "message"), [
    ({"X": "a\x00b"}, "environment variable X contains a NUL byte, which no environment value can hold"),
    ({"A=B": "x"}, "environment variable name 'A=B' must be non-empty, without '=' or NUL"),
    ({"": "x"}, "environment variable name '' must be non-empty, without '=' or NUL"),
])
async def test_an_environment_the_os_cannot_pass_is_a_clear_error(env, message, tmp_path):
    with pytest.raises(InvalidArgumentError) as sync_info:
        exec_command(["touch", str(tmp_path / "ran")], env=env)
    with pytest.raises(InvalidArgumentError) as async_info:
        await exec_shell_async(f"touch {tmp_path / 'ran'}", allow_shell=True, env=env)
    assert str(sync_info.value) == str(async_info.value) == message
    assert not (tmp_path / "ran").exists()


async def test_exec_shell_passes_input_on_stdin():
    assert exec_shell("tr a-z A-Z", allow_shell=True, input="hi").stdout == "HI"
    assert (await exec_shell_async("wc -c", allow_shell=True, input=b"abc")).stdout.strip() == "3"
