"""A templated shell ``command``: ``?``, ``'``, spaces and ``$( )`` in the template's own text and
in its values either run as one safe argument each or are refused with an error that says why,
when the file loads where it can be known then."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from orchestrator.declarative.files import load_workflow_spec
from orchestrator.errors import WorkflowFileError
from orchestrator.workflow.runner import Runner

PY = shlex.quote(sys.executable)
ARGV_PY = "import json, sys; print(json.dumps(sys.argv[1:]))"


def flow(tmp_path: Path, command: str, **params):
    (tmp_path / "argv.py").write_text(ARGV_PY)
    return load_workflow_spec({"name": "quoting", "steps": [
        {"id": "s", "type": "shell", "params": {"command": command, **params}}]}, base_dir=tmp_path)


async def argv_of(tmp_path: Path, command: str, value: str, **params) -> list[str]:
    result = await Runner().run(flow(tmp_path, f"{PY} argv.py {command}", **params), input={"v": value})
    assert result.status == "succeeded", result.nodes["s"].error
    return json.loads(result.output_of("s")["stdout"])


@pytest.mark.parametrize("value", ["a?b", "it's", "a b  c", "$(touch pwned)", "'", "?", "x' ; touch pwned; '"])
@pytest.mark.parametrize("shell", [False, True])
async def test_a_value_with_question_marks_quotes_spaces_or_substitutions_is_one_argument(tmp_path, value, shell):
    assert await argv_of(tmp_path, "{{ input.v }} '{{ input.v }}' \"{{ input.v }}\"", value, shell=shell) == [
        value, value, value]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("shell", [False, True])
async def test_a_question_mark_in_the_template_text_is_passed_as_written(tmp_path, shell):
    got = await argv_of(tmp_path, "https://example.invalid/items?id={{ input.v }} 'what?'", "7 8", shell=shell)
    assert got == ["https://example.invalid/items?id=7 8", "what?"]


async def test_shell_syntax_inside_quotes_in_the_template_text_needs_no_shell(tmp_path):
    got = await argv_of(tmp_path, """'{"a": [1, 2]}' "what? it's *" '$(not run)' {{ input.v }}""", "v")
    assert got == ['{"a": [1, 2]}', "what? it's *", "$(not run)", "v"]


def test_an_unclosed_quote_in_the_template_text_is_refused_when_the_file_loads(tmp_path):
    with pytest.raises(WorkflowFileError, match="command has an unclosed ' quote in its own text"):
        flow(tmp_path, "echo it's {{ input.v }}")
    with pytest.raises(WorkflowFileError, match='command has an unclosed " quote in its own text'):
        flow(tmp_path, 'echo "{{ input.v }}')


def test_a_substitution_in_the_template_text_without_a_shell_is_refused_when_the_file_loads(tmp_path):
    with pytest.raises(WorkflowFileError, match=r"command uses shell syntax \('\$', '\(', '\)'\); set shell: true"):
        flow(tmp_path, "echo $(date) {{ input.v }}")
    with pytest.raises(WorkflowFileError, match=r"command uses shell syntax \('\$'\)"):
        flow(tmp_path, 'echo "$HOME" {{ input.v }}')  # double quotes still expand


async def test_an_unclosed_quote_in_a_shell_script_fails_the_step_with_a_clear_error(tmp_path):
    result = await Runner().run(flow(tmp_path, "echo it's {{ input.v }}", shell=True), input={"v": "x"})
    error = result.nodes["s"].error
    assert result.status == "failed" and error["name"] == "TemplateError"
    assert "the ' quote written in the template is never closed" in error["message"]


async def test_a_substitution_written_in_a_shell_script_runs_and_its_value_stays_an_argument(tmp_path):
    got = await argv_of(tmp_path, "\"$(printf '%s' ok)\" {{ input.v }}", "$(echo no)", shell=True)
    assert got == ["ok", "$(echo no)"]
