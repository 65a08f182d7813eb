"""Declarative step safety, fed with nasty values: paths stay inside the workflow's folder
unless a step opts out, and a templated command value is always exactly one argument."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.declarative.files import load_workflow_file, run_workflow_file
from orchestrator.declarative.steps import StepContext
from orchestrator.errors import UnsafePathError, WorkflowFileError

PY = shlex.quote(sys.executable)

# values a payload could carry; hypothesis is not installed, so these are the fuzz corpus
NASTY = {
    "spaces": "a b  c",
    "semicolon": "a b; touch pwned",
    "single_quote": "it's",
    "lone_single_quote": "'",
    "double_quotes": 'say "hi"',
    "lone_double_quote": '"',
    "mixed_quotes": "'\"'\"",
    "question_mark": "?",
    "star": "*",
    "brackets": "[a-z]*",
    "dotdot": "..",
    "traversal": "../../etc/passwd",
    "absolute": "/etc/passwd",
    "tilde": "~",
    "tilde_path": "~/x",
    "newline": "line1\nline2",
    "trailing_newline": "x\n",
    "crlf": "a\r\nb",
    "tab": "a\tb",
    "dollar_paren": "$(touch pwned)",
    "backticks": "`touch pwned`",
    "variables": "$HOME ${HOME} $0",
    "value_reference": "${TOKIWA_VALUE_0}",
    "backslashes": "a\\b\\",
    "backslash_quote": "\\'",
    "operators": "a | b && c || d & e",
    "redirect": "> pwned",
    "heredoc_end": "x\nEOF\ntouch pwned",
    "hash": "# not a comment",
    "empty": "",
    "blank": " ",
    "dash": "-rf",
    "double_dash": "--",
    "percent": "%s%d%%",
    "unicode": "日本語 ünï 🎉",
    "surrogate": "\udcff",
    "jinja_expression": "{{ 7 * 7 }}",
    "jinja_block": "{% if true %}x{% endif %}",
    "long": "x y " * 2000,
}
NASTY_IDS = list(NASTY)
NASTY_VALUES = list(NASTY.values())

ARGV_PY = "import json, sys; print(json.dumps(sys.argv[1:]))"


def as_output(text: str) -> str:
    """``text`` as a step's stdout reads it: the bytes the OS got, decoded as UTF-8 with replacement."""
    return os.fsencode(text).decode("utf-8", errors="replace")


def workflow(base: Path, steps: list[dict], **top) -> Path:
    """A JSON workflow file in ``base`` (JSON: no YAML quoting of the nasty values)."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "argv.py").write_text(ARGV_PY)
    path = base / "wf.json"
    path.write_text(json.dumps({"name": "safety", "steps": steps, **top}))
    return path


async def run(path: Path, input=None):
    return await run_workflow_file(path, input, artifacts_dir=path.parent.parent / "artifacts")


def shell_step(command: str, **params) -> dict:
    return {"id": "s", "type": "shell", "params": {"command": command, **params}}


# --- commands without a shell: each value is one argv item -------------------------------------


@pytest.mark.parametrize("value", NASTY_VALUES, ids=NASTY_IDS)
async def test_a_value_is_one_argument_of_a_command_without_a_shell(tmp_path, value):
    base = tmp_path / "wf"
    path = workflow(base, [shell_step(f"{PY} argv.py {{{{ input.v }}}} '{{{{ input.v }}}}' \"{{{{ input.v }}}}\" "
                                      "--opt={{ input.v }}")])
    result = await run(path, {"v": value})
    assert result.status == "succeeded", result.error
    assert json.loads(result.output_of("s")["stdout"]) == [value, value, value, f"--opt={value}"]
    assert not (base / "pwned").exists()


@pytest.mark.parametrize("value", NASTY_VALUES, ids=NASTY_IDS)
async def test_a_value_is_one_word_of_a_shell_command_whatever_its_quoting_context(tmp_path, value):
    base = tmp_path / "wf"
    command = (f"{PY} argv.py {{{{ input.v }}}} '{{{{ input.v }}}}' \"{{{{ input.v }}}}\" pre{{{{ input.v }}}}post "
               "\"$(printf '%s' {{ input.v }})\" \"`printf '%s' {{ input.v }}`\" \"${UNSET_TOKIWA:-{{ input.v }}}\" "
               "| cat # {{ input.v }}")
    result = await run(workflow(base, [shell_step(command, shell=True)]), {"v": value})
    assert result.status == "succeeded", result.error
    substituted = value.rstrip("\n")  # $( ) and ` ` drop trailing newlines, as in any shell
    assert json.loads(result.output_of("s")["stdout"]) == [
        value, value, value, f"pre{value}post", substituted, substituted, value]
    assert not (base / "pwned").exists()


@pytest.mark.parametrize("value", NASTY_VALUES, ids=NASTY_IDS)
async def test_a_value_in_a_here_document_is_its_text_and_cannot_end_it(tmp_path, value):
    base = tmp_path / "wf"
    result = await run(workflow(base, [shell_step("cat <<EOF\n{{ input.v }}\nEOF\necho done", shell=True)]),
                       {"v": value})
    assert result.output_of("s")["stdout"] == as_output(f"{value}\ndone\n")
    assert not (base / "pwned").exists()


@pytest.mark.parametrize("shell", [False, True])
async def test_a_value_with_a_nul_byte_is_refused_before_anything_runs(tmp_path, shell):
    base = tmp_path / "wf"
    result = await run(workflow(base, [shell_step("touch ran {{ input.v }}", shell=shell)]), {"v": "a\x00b"})
    error = result.nodes["s"].error
    assert error["name"] == "TemplateError"
    assert error["message"] == ("step s params.command: the value 'a\\x00b' contains a NUL byte, which no "
                                "command argument can hold")
    assert not (base / "ran").exists()


async def test_a_command_that_is_one_value_is_one_program_name_not_a_command_line(tmp_path):
    result = await run(workflow(tmp_path / "wf", [shell_step("{{ input.cmd }}")]), {"cmd": "echo hi"})
    error = result.nodes["s"].error
    assert error["name"] == "CommandError"
    assert error["message"].startswith("command ['echo hi'] could not start")


async def test_a_loop_writes_one_argument_per_item(tmp_path):
    result = await run(workflow(tmp_path / "wf", [shell_step(
        f"{PY} argv.py {{% for f in input.files %}}{{{{ f }}}} {{% endfor %}}")]), {"files": ["a b", "c;d", "'"]})
    assert json.loads(result.output_of("s")["stdout"]) == ["a b", "c;d", "'"]


def test_an_unbalanced_quote_written_in_the_template_is_refused_when_the_file_loads(tmp_path):
    with pytest.raises(WorkflowFileError, match=r"steps\[0\]\.params\.command: .*command has an unclosed ' "
                                                r"quote in its own text \(outside \{\{ \}\}\); close it, or write "
                                                r"the ' inside \"\.\.\.\""):
        load_workflow_file(workflow(tmp_path / "wf", [shell_step("echo 'abc {{ input.v }}")]))


async def test_the_shell_script_reads_values_from_the_environment_and_its_log_shows_them_redacted(
        tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_TOKEN", "tok-SECRET")
    path = workflow(tmp_path / "wf", [shell_step("printf '%s|%s' {{ input.v }} {{ secrets.SAFETY_TOKEN }}",
                                                 shell=True)], secrets=["SAFETY_TOKEN"])
    result = await run(path, {"v": "a b"})
    assert result.output_of("s")["stdout"] == "a b|tok-SECRET"  # the data later steps get
    assert result.to_record()["nodes"]["s"]["output"]["stdout"] == "a b|***"  # what people see
    assert [entry["message"] for entry in result.logs] == [
        "shell: printf '%s|%s' \"${TOKIWA_VALUE_0}\" \"${TOKIWA_VALUE_1}\"\n  TOKIWA_VALUE_0='a b'\n"
        "  TOKIWA_VALUE_1=***"]


@pytest.mark.parametrize(("command", "message"), [
    ("echo $(( {{ input.v }} + 1 ))", "a {{ }} value inside $(( )) would be evaluated as arithmetic; compute it "
                                      "in the template instead ({{ a + 1 }})"),
    ("cat <<'EOF'\n{{ input.v }}\nEOF", "a {{ }} value in a here-document with a quoted delimiter would not be "
                                        "expanded; leave the delimiter unquoted"),
])
async def test_values_where_the_shell_would_not_keep_them_one_word_are_refused(tmp_path, command, message):
    result = await run(workflow(tmp_path / "wf", [shell_step(command, shell=True)]), {"v": "1"})
    assert result.nodes["s"].error["message"] == f"step s params.command: command {command!r}: {message}"


def test_env_names_that_would_shadow_a_commands_values_are_refused_at_load(tmp_path):
    path = workflow(tmp_path / "wf", [shell_step("env", env={"TOKIWA_VALUE_0": "x"})])
    with pytest.raises(WorkflowFileError, match=r"env names starting with TOKIWA_VALUE_ are reserved for the "
                                                r"values of a shell command; rename TOKIWA_VALUE_0"):
        load_workflow_file(path)


@pytest.mark.parametrize("field", ["argv", "env"])
async def test_a_nul_byte_in_an_argv_item_or_env_value_is_a_clear_error(tmp_path, field):
    params = {"argv": ["touch", "ran", "{{ input.v }}"]} if field == "argv" else {
        "argv": ["touch", "ran"], "env": {"X": "{{ input.v }}"}}
    base = tmp_path / "wf"
    result = await run(workflow(base, [{"id": "s", "type": "shell", "params": params}]), {"v": "a\x00b"})
    error = result.nodes["s"].error
    assert error["name"] == "InvalidArgumentError"
    assert error["message"] == {
        "argv": "argv[2] 'a\\x00b' contains a NUL byte, which no command argument can hold",
        "env": "environment variable X contains a NUL byte, which no environment value can hold"}[field]
    assert not (base / "ran").exists()


# --- paths: inside the workflow's folder unless the step opts out ------------------------------


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """wf/ (the workflow folder) next to outside/ and home/ ($HOME), with symlinks out of wf/."""
    base, outside, home = tmp_path / "wf", tmp_path / "outside", tmp_path / "home"
    for folder in (base / "sub", outside, home):
        folder.mkdir(parents=True)
    (outside / "target.txt").write_text("keep")
    (base / "inside.txt").write_text("in")
    (base / "link").symlink_to(outside, target_is_directory=True)
    (base / "linkfile").symlink_to(outside / "target.txt")
    (base / "inlink").symlink_to(base / "sub", target_is_directory=True)
    (base / "loop").symlink_to(base / "loop")
    monkeypatch.setenv("HOME", str(home))
    return SimpleNamespace(base=base, outside=outside, home=home, root=tmp_path)


def snapshot(root: Path) -> dict[str, str | None]:
    """Every entry under ``root`` but the workflow folder and the artifacts: its text, or where a link points."""
    entries = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in ("wf", "artifacts"):
            continue
        entries[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else (
            path.read_text() if path.is_file() else None)
    return entries


# paths that lead out of wf/ (all into the test's own folders, so a broken check harms nothing)
OUTSIDE = ["../outside/new.txt", "sub/../../outside/new.txt", "./../outside/new.txt", "..", "../outside",
           "~", "~/new.txt", "link/new.txt", "link/target.txt", "linkfile", "inlink/../../outside/new.txt",
           "sub/nope/../../../outside/new.txt", "{outside}/new.txt", "{outside}/target.txt"]

FILE_OPS = {
    "write": lambda p: ({"op": "write", "path": p, "content": "x"}, "path"),
    "append": lambda p: ({"op": "write", "path": p, "content": "x", "append": True}, "path"),
    "delete": lambda p: ({"op": "delete", "path": p}, "path"),
    "copy_src": lambda p: ({"op": "copy", "src": p, "dest": "copied.txt"}, "src"),
    "copy_dest": lambda p: ({"op": "copy", "src": "inside.txt", "dest": p}, "dest"),
    "render_template": lambda p: ({"op": "render", "template": p, "dest": "rendered.txt"}, "template"),
    "render_dest": lambda p: ({"op": "render", "template": "inside.txt", "dest": p}, "dest"),
}


def refusal(step: str, value: str, field: str, base: Path) -> str:
    return (rf"^step '{step}': path {re.escape(repr(value))} \(params\.{field}\) leads to .+, outside the "
            rf"workflow folder {re.escape(str(base))}; set allow_outside: true on the step \(or on the workflow\) "
            r"to allow paths outside it$")


@pytest.mark.parametrize("op", list(FILE_OPS))
@pytest.mark.parametrize("template", OUTSIDE)
async def test_a_file_step_path_from_the_payload_cannot_leave_the_workflow_folder(layout, op, template):
    value = template.format(outside=layout.outside)
    params, field = FILE_OPS[op]("{{ input.p }}")
    before = snapshot(layout.root)
    result = await run(workflow(layout.base, [{"id": "f", "type": "file", "params": params}]), {"p": value})
    error = result.nodes["f"].error
    assert error["name"] == "UnsafePathError"
    assert re.match(refusal("f", value, field, layout.base), error["message"]), error["message"]
    assert snapshot(layout.root) == before
    assert not (layout.base / "copied.txt").exists() and not (layout.base / "rendered.txt").exists()


@pytest.mark.parametrize("value", ["/etc/passwd", "/", "../../../../../../../../../etc/passwd", "/proc/self/environ"])
@pytest.mark.parametrize("op", ["copy_src", "render_template"])
async def test_system_files_cannot_be_read_into_the_workflow_folder(layout, value, op):
    params, field = FILE_OPS[op]("{{ input.p }}")
    result = await run(workflow(layout.base, [{"id": "f", "type": "file", "params": params}]), {"p": value})
    assert re.match(refusal("f", value, field, layout.base), result.nodes["f"].error["message"])
    assert not (layout.base / "copied.txt").exists() and not (layout.base / "rendered.txt").exists()


# names that stay inside wf/ however odd they look
INSIDE = ["plain.txt", "a b.txt", "it's \"q\".txt", "..foo", "a..b", "a/../b.txt", "./c.txt", "sub/deep/d.txt",
          "$(touch pwned)", "`x`", "line\nbreak", "tab\there", " lead", "-rf", "*", "?", "日本語.txt",
          "~no-such-user-tokiwa/x", "inlink/via-link.txt", "sub/../inlink/./e.txt", "{base}/abs.txt"]


@pytest.mark.parametrize("template", INSIDE)
async def test_odd_names_inside_the_workflow_folder_are_written_where_they_say(layout, template):
    value = template.format(base=layout.base)
    before = snapshot(layout.root)
    result = await run(workflow(layout.base, [{"id": "f", "type": "file",
                                               "params": {"op": "write", "path": "{{ input.p }}", "content": "v"}}]),
                       {"p": value})
    assert result.status == "succeeded", result.error
    expected = Path(os.path.realpath(layout.base / value))
    assert result.output_of("f")["path"] == str(expected) and expected.read_text() == "v"
    assert expected.is_relative_to(layout.base)
    assert snapshot(layout.root) == before and not (layout.base / "pwned").exists()


async def test_deleting_a_symlink_that_stays_inside_removes_the_link_not_its_target(layout):
    (layout.base / "sub" / "real.txt").write_text("real")
    (layout.base / "alias.txt").symlink_to(layout.base / "sub" / "real.txt")
    result = await run(workflow(layout.base, [{"id": "f", "type": "file",
                                               "params": {"op": "delete", "path": "alias.txt"}}]))
    assert result.status == "succeeded", result.error
    assert not (layout.base / "alias.txt").is_symlink() and (layout.base / "sub" / "real.txt").read_text() == "real"


def context(base: Path, **kwargs) -> StepContext:
    return StepContext(node=SimpleNamespace(logger=logging.getLogger("test")), step_id="p", base_dir=base,
                       namespace={}, **kwargs)


def test_a_symlink_loop_or_a_nul_byte_is_refused_as_a_path_whatever_the_opt_out(layout):
    for allow in (False, True):
        step = context(layout.base, allow_outside=allow)
        with pytest.raises(UnsafePathError, match=r"^step 'p': path 'loop/x' cannot be resolved: ") as info:
            step.path("loop/x")
        assert (info.value.path, info.value.resolved, info.value.node) == ("loop/x", None, "p")
        with pytest.raises(UnsafePathError, match=r"^step 'p': path 'a\\x00b' \(params.path\) contains a NUL byte$"):
            step.path("a\x00b", field="params.path")


def test_the_refusal_carries_the_path_where_it_leads_and_the_folder(layout):
    with pytest.raises(UnsafePathError) as info:
        context(layout.base).path("link/target.txt")
    err = info.value
    assert (err.path, err.resolved, err.base_dir, err.node) == (
        "link/target.txt", str(layout.outside / "target.txt"), str(layout.base), "p")
    assert isinstance(err, ValueError)


def test_without_allow_outside_the_folder_itself_is_allowed_but_not_its_parent(layout):
    assert context(layout.base).path(".") == layout.base
    with pytest.raises(UnsafePathError):
        context(layout.base).path("..")
    assert context(layout.base, allow_outside=True).path("..") == layout.root


@pytest.mark.parametrize(("step_flag", "workflow_flag", "allowed"), [
    (True, None, True), (None, True, True), (False, True, False), (None, None, False), (None, False, False)])
async def test_allow_outside_on_the_step_or_the_workflow_lets_a_path_out(layout, step_flag, workflow_flag, allowed):
    step = {"id": "f", "type": "file", "params": {"op": "write", "path": "../outside/new.txt", "content": "x"}}
    if step_flag is not None:
        step["allow_outside"] = step_flag
    top = {} if workflow_flag is None else {"allow_outside": workflow_flag}
    result = await run(workflow(layout.base, [step], **top))
    assert (result.status == "succeeded") is allowed
    assert (layout.outside / "new.txt").exists() is allowed


def test_allow_outside_cannot_come_from_a_template(layout):
    path = workflow(layout.base, [{"id": "f", "type": "file", "allow_outside": "{{ input.open }}",
                                   "params": {"op": "delete", "path": "x"}}])
    with pytest.raises(WorkflowFileError, match=r"steps\[0\]\.allow_outside: Input should be a valid boolean"):
        load_workflow_file(path)


async def test_a_shell_cwd_outside_the_folder_is_refused_before_the_command_starts(layout):
    result = await run(workflow(layout.base, [{"id": "s", "type": "shell",
                                               "params": {"argv": ["touch", "ran"], "cwd": "{{ input.dir }}"}}]),
                       {"dir": "link"})
    assert re.match(refusal("s", "link", "cwd", layout.base), result.nodes["s"].error["message"])
    assert not (layout.outside / "ran").exists()


@pytest.mark.parametrize("volume", ["../outside:/data", "./link:/data:ro", "/:/host", "~/:/home"])
async def test_a_docker_volume_host_path_outside_the_folder_is_refused_before_docker_runs(layout, volume,
                                                                                         monkeypatch):
    monkeypatch.setenv("PATH", str(layout.root / "no-bin"))  # a docker check would fail differently
    result = await run(workflow(layout.base, [{"id": "d", "type": "docker",
                                               "params": {"image": "alpine", "volumes": [volume]}}]))
    host = volume.rsplit(":", 2 if volume.endswith(":ro") else 1)[0]
    assert re.match(refusal("d", host, r"volumes\[0\]", layout.base), result.nodes["d"].error["message"])


async def test_a_python_file_outside_the_folder_is_refused_and_never_imported(layout):
    marker = layout.outside / "imported"
    (layout.outside / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef fn(ctx):\n    return 1\n")
    result = await run(workflow(layout.base, [{"id": "py", "type": "python",
                                               "params": {"callable": "{{ input.ref }}"}}]),
                       {"ref": "../outside/evil.py:fn"})
    assert re.match(refusal("py", "../outside/evil.py", "callable", layout.base), result.nodes["py"].error["message"])
    assert not marker.exists()
