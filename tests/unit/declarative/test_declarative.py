"""Declarative workflows: files of shell / file / test / docker / python / custom steps."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest

from orchestrator.declarative.files import (
    DeclarativeWorkflow,
    load_workflow_file,
    load_workflow_spec,
    run_workflow_file,
)
from orchestrator.declarative.steps import (
    build_docker_argv,
    load_entry_points,
    register_step_type,
    unregister_step_type,
)
from orchestrator.errors import ConfigError, WorkflowFileError
from orchestrator.runs.stores import InMemoryRunStore

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "workflows" / "report.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


async def run_yaml(tmp_path: Path, text: str, input=None, **kwargs):
    path = write(tmp_path, "wf.yaml", text)
    return await run_workflow_file(path, input, artifacts_dir=tmp_path / "artifacts", **kwargs)


# --- the example file (the example_copy fixture is in tests/conftest.py): every step type but docker


async def test_the_example_file_runs_each_step_type_to_success(example_copy, tmp_path):
    result = await run_workflow_file(example_copy, {"who": "Ada", "keep": True}, artifacts_dir=tmp_path / "a")
    assert result.status == "succeeded", result.error
    assert result.output_of("count")["stdout"].split()[0] == "3"
    assert result.output_of("greet")["stdout"] == "hello Ada\n"
    assert result.output_of("check_count")["passed"] is True
    # the output is the data steps pass on; what people see of it (the record) hides the secret
    assert result.output_of("summarize") == {"greeting": "hello Ada", "lines": 3, "token_used": "tok-SECRET-42"}
    assert result.to_record()["nodes"]["summarize"]["output"]["token_used"] == "***"
    assert result.output_of("cleanup") is None  # `when` was false: keep=True
    report = (tmp_path / "build" / "report" / "report.md").read_text()
    assert report.startswith("# Report for Ada\n") and result.run_id in report


async def test_the_example_stores_an_artifact_listed_in_the_run_record(example_copy, tmp_path):
    result = await run_workflow_file(example_copy, {"who": "Ada"}, artifacts_dir=tmp_path / "a")
    [artifact] = result.to_record()["artifacts"]
    assert artifact["name"] == "summary.txt" and artifact["node"] == "summarize"
    assert (tmp_path / "a" / result.run_id / "summary.txt").read_text() == "hello Ada: 3 lines\n"


async def test_secrets_never_reach_outputs_logs_or_the_stored_run_record(example_copy, tmp_path):
    store = InMemoryRunStore()
    result = await run_workflow_file(example_copy, {"who": "Ada"}, artifacts_dir=tmp_path / "a", store=store)
    stored = json.dumps(await store.get(result.run_id)) + json.dumps(await store.get_logs(result.run_id))
    assert "[summarize] summarizing with token ***" in stored
    assert "tok-SECRET-42" not in stored and "tok-SECRET-42" not in json.dumps(result.logs)


async def test_a_missing_secret_fails_before_anything_runs(example_copy, monkeypatch, tmp_path):
    monkeypatch.delenv("REPORT_TOKEN")
    with pytest.raises(ConfigError, match="REPORT_TOKEN"):
        await run_workflow_file(example_copy, artifacts_dir=tmp_path / "a")
    assert not (tmp_path / "build").exists()


def test_the_file_sets_the_runner_options():
    workflow = load_workflow_file(EXAMPLE)
    assert isinstance(workflow, DeclarativeWorkflow)
    assert workflow.run_options == {"concurrency": 2, "fail_fast": True, "timeout": 60}
    assert [n.name for n in workflow.get_execution_plan()[0]] == ["write_input", "render_header", "greet"]


# --- shell -------------------------------------------------------------------------------------


async def test_a_failing_shell_step_records_exit_code_and_stderr(tmp_path):
    result = await run_yaml(tmp_path, """
        name: failing
        steps:
          - id: boom
            type: shell
            params: {command: "echo nope >&2; exit 3", shell: true}
    """)
    error = result.nodes["boom"].error
    assert result.status == "failed" and error["name"] == "CommandError"
    assert "exited with code 3: nope" in error["message"]


async def test_ok_exit_codes_env_and_cwd_apply_to_shell_steps(tmp_path):
    (tmp_path / "sub").mkdir()
    result = await run_yaml(tmp_path, """
        name: shell-options
        steps:
          - id: s
            type: shell
            params:
              argv: [sh, -c, 'pwd; echo "$GREETING"; exit 1']
              cwd: sub
              env: {GREETING: hi}
              ok_exit_codes: [0, 1]
    """)
    assert result.output_of("s") == {"exit_code": 1, "stdout": f"{tmp_path / 'sub'}\nhi\n", "stderr": ""}


async def test_a_command_string_without_shell_syntax_runs_without_a_shell(tmp_path):
    result = await run_yaml(tmp_path, """
        name: no-shell
        steps:
          - {id: s, type: shell, params: {command: "echo '{{ input.x }}'"}}
    """, {"x": "a b"})
    assert result.output_of("s")["stdout"] == "a b\n"


@pytest.mark.parametrize("command", ["ls | wc -l", "ls {{ input.dir }} | wc -l"])
def test_shell_syntax_without_shell_true_is_refused_at_load_with_its_line(tmp_path, command):
    path = write(tmp_path, "wf.yaml", f"""
        name: needs-shell
        steps:
          - id: s
            type: shell
            params:
              command: "{command}"
    """)
    with pytest.raises(WorkflowFileError, match=r"line 6: steps\[0\]\.params\.command: .*command uses shell "
                                                r"syntax \('\|'\); set shell: true") as info:
        load_workflow_file(path)
    assert info.value.line == 6 and info.value.field == "steps[0].params.command"


async def test_input_reaches_the_stdin_of_shell_and_argv_steps(tmp_path):
    result = await run_yaml(tmp_path, """
        name: stdin
        steps:
          - {id: sh, type: shell, params: {command: "tr a-z A-Z | rev", shell: true, input: "{{ input.text }}"}}
          - {id: argv, type: shell, params: {argv: [tr, a-z, A-Z], input: "{{ input.text }}"}}
    """, {"text": "abc"})
    assert result.output_of("sh")["stdout"] == "CBA" and result.output_of("argv")["stdout"] == "ABC"


async def test_retry_settings_retry_a_failing_step(tmp_path):
    marker = tmp_path / "attempts"
    result = await run_yaml(tmp_path, f"""
        name: flaky
        steps:
          - id: flaky
            type: shell
            retry: {{max_attempts: 3, backoff: fixed, initial_delay_s: 0, retryable_errors: [CommandError]}}
            params:
              command: 'echo x >> {marker}; test $(wc -l < {marker}) -ge 2'
              shell: true
    """)
    assert result.status == "succeeded" and result.nodes["flaky"].attempts == 2


async def test_errors_not_listed_as_retryable_fail_at_once(tmp_path):
    result = await run_yaml(tmp_path, """
        name: not-retryable
        steps:
          - id: t
            type: test
            retry: {max_attempts: 3, initial_delay_s: 0, retryable_errors: [CommandError]}
            params: {expression: "false"}
    """)
    assert result.nodes["t"].attempts == 1 and result.nodes["t"].error["name"] == "CheckFailedError"


async def test_a_step_timeout_stops_a_long_command(tmp_path):
    result = await run_yaml(tmp_path, """
        name: slow
        steps:
          - {id: slow, type: shell, timeout_s: 0.3, params: {argv: [sleep, "30"]}}
    """)
    assert result.nodes["slow"].error["name"] == "TimeoutError"
    assert result.duration_ms < 5000


# --- file and test -----------------------------------------------------------------------------


async def test_file_steps_write_copy_render_and_delete(tmp_path):
    write(tmp_path, "t.j2", "Hi {{ input.name }} from {{ steps.copy.output.dest.split('/') | last }}\n")
    result = await run_yaml(tmp_path, """
        name: files
        steps:
          - {id: write, type: file, params: {op: write, path: out/a.txt, content: "v={{ input.name }}"}}
          - {id: copy, type: file, depends_on: [write], params: {op: copy, src: out/a.txt, dest: out/b.txt}}
          - {id: render, type: file, depends_on: [copy], params: {op: render, template: t.j2, dest: out/r.txt}}
          - {id: delete, type: file, depends_on: [render], params: {op: delete, path: out/a.txt}}
    """, {"name": "Bo"})
    assert result.status == "succeeded", result.error
    assert (tmp_path / "out" / "b.txt").read_text() == "v=Bo"
    assert (tmp_path / "out" / "r.txt").read_text() == "Hi Bo from b.txt\n"
    assert not (tmp_path / "out" / "a.txt").exists()
    assert result.output_of("delete")["existed"] is True


async def test_copying_a_missing_file_fails_the_step_naming_the_file(tmp_path):
    result = await run_yaml(tmp_path, """
        name: copy-missing
        steps:
          - {id: c, type: file, params: {op: copy, src: nope.txt, dest: x.txt}}
    """)
    assert "nope.txt: no such file" in result.nodes["c"].error["message"]


async def test_a_failing_test_step_fails_the_run_and_skips_its_dependents(tmp_path):
    result = await run_yaml(tmp_path, """
        name: checks
        steps:
          - {id: n, type: python, params: {callable: "builtins:len", kwargs: {}}}
          - {id: check, type: test, params: {expression: "input.count > 5", message: count too small}}
          - {id: after, type: shell, depends_on: [check], params: {argv: ["true"]}}
    """, {"count": 2})
    assert result.status == "failed"
    assert result.nodes["check"].error["message"].startswith("step 'check': check failed: count too small")
    assert result.nodes["after"].status == "skipped"


async def test_a_missing_template_name_fails_the_step_with_a_template_error_naming_it(tmp_path):
    result = await run_yaml(tmp_path, """
        name: missing
        steps:
          - {id: s, type: shell, params: {argv: [echo, "{{ variables.nope }}"]}}
    """)
    error = result.nodes["s"].error
    assert error["name"] == "TemplateError" and "'nope' is undefined" in error["message"]
    assert "step s params.argv[1]" in error["message"]


async def test_later_steps_read_earlier_outputs_and_lone_expressions_keep_types(tmp_path):
    result = await run_yaml(tmp_path, """
        name: wiring
        variables: {n: 4}
        steps:
          - {id: a, type: shell, params: {argv: [echo, "{{ variables.n * 2 }}"]}}
          - id: b
            type: python
            depends_on: [a]
            params: {callable: "helpers.py:echo", kwargs: {value: "{{ steps.a.output.stdout | int }}"}}
    """ .replace("helpers.py", str(write(tmp_path, "helpers.py", "def echo(ctx, value):\n    return [value, type(value).__name__]\n"))))
    assert result.output_of("b") == [8, "int"]


async def test_python_steps_accept_dotted_module_paths(tmp_path, monkeypatch):
    write(tmp_path, "mymod_decl.py", "async def hello(ctx, who):\n    return f'hi {who} {ctx.attempt}'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = await run_yaml(tmp_path, """
        name: py
        steps:
          - {id: p, type: python, params: {callable: "mymod_decl:hello", kwargs: {who: "{{ input.who }}"}}}
    """, {"who": "Cy"})
    assert result.output_of("p") == "hi Cy 1"


async def test_an_unimportable_python_callable_fails_the_step_naming_it(tmp_path):
    result = await run_yaml(tmp_path, """
        name: py-missing
        steps:
          - {id: p, type: python, params: {callable: "no_such_module_xyz:fn"}}
    """)
    assert "cannot import module 'no_such_module_xyz'" in result.nodes["p"].error["message"]


async def test_when_false_skips_the_action_but_dependents_run(tmp_path):
    result = await run_yaml(tmp_path, """
        name: when
        steps:
          - {id: maybe, type: file, when: "input.write", params: {op: write, path: w.txt, content: x}}
          - {id: after, type: test, depends_on: [maybe], params: {expression: "steps.maybe.output is none"}}
    """, {"write": False})
    assert result.status == "succeeded" and not (tmp_path / "w.txt").exists()


async def test_a_workflow_timeout_returns_a_failed_result(tmp_path):
    result = await run_yaml(tmp_path, """
        name: too-slow
        timeout_s: 0.3
        steps:
          - {id: slow, type: shell, params: {argv: [sleep, "30"]}}
    """)
    assert result.status == "timed_out" and result.failed and result.error["name"] == "TimeoutError"


# --- docker ------------------------------------------------------------------------------------


def test_docker_argv_puts_env_names_not_values_on_the_command_line(tmp_path):
    argv = build_docker_argv({"image": "alpine:3", "args": ["sh", "-c", "echo $X"], "env": {"X": "secret"},
                              "volumes": ["./data:/data:ro", "named:/cache"], "workdir": "/data",
                              "network": "none"}, tmp_path)
    assert argv == ["docker", "run", "--rm", "-e", "X", "-v", f"{tmp_path / 'data'}:/data:ro",
                    "-v", "named:/cache", "-w", "/data", "--network", "none", "alpine:3", "sh", "-c", "echo $X"]
    assert "secret" not in argv


def test_docker_params_are_validated():
    with pytest.raises(Exception, match="image"):
        build_docker_argv({"args": ["x"]})


async def test_a_docker_step_without_docker_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    result = await run_yaml(tmp_path, """
        name: dockerless
        steps:
          - {id: d, type: docker, params: {image: alpine}}
    """)
    error = result.nodes["d"].error
    assert error["name"] == "StepExecutionError" and "docker is not available" in error["message"]


def fake_docker(bin_dir: Path, *, engine_up: bool) -> None:
    bin_dir.mkdir()
    script = bin_dir / "docker"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = info ]; then {"echo 27.0" if engine_up else "echo cannot connect >&2; exit 1"}; exit $?; fi\n'
        'echo "args: $*"; echo "X=$X"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


async def test_a_docker_step_reports_an_engine_that_does_not_answer(tmp_path, monkeypatch):
    fake_docker(tmp_path / "bin", engine_up=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = await run_yaml(tmp_path, """
        name: engine-down
        steps:
          - {id: d, type: docker, params: {image: alpine}}
    """)
    assert "the engine does not answer (cannot connect)" in result.nodes["d"].error["message"]


async def test_a_docker_step_runs_the_built_argv_with_env_values_from_the_environment(tmp_path, monkeypatch):
    fake_docker(tmp_path / "bin", engine_up=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    result = await run_yaml(tmp_path, """
        name: engine-up
        steps:
          - {id: d, type: docker, params: {image: alpine, args: [echo, hi], env: {X: "{{ input.x }}"}}}
    """, {"x": "val"})
    assert result.output_of("d")["stdout"] == "args: run --rm -e X alpine echo hi\nX=val\n"


# --- custom step types -------------------------------------------------------------------------


async def test_register_step_type_adds_a_custom_step(tmp_path):
    async def shout(step, params):
        step.log(f"shouting {params['text']}")
        return params["text"].upper()

    register_step_type("shout_test", shout)
    try:
        result = await run_yaml(tmp_path, """
            name: custom
            steps:
              - {id: s, type: shout_test, params: {text: "{{ input.t }}"}}
        """, {"t": "hey"})
    finally:
        unregister_step_type("shout_test")
    assert result.output_of("s") == "HEY"
    assert result.logs[0]["message"] == "shouting hey"


async def test_a_custom_step_type_gets_its_raw_params_unrendered(tmp_path):
    def show(step, params):
        return {"raw": params["query"], "rendered": params["label"]}

    register_step_type("show_raw_test", show, raw_params=["query"])
    try:
        result = await run_yaml(tmp_path, """
            name: raw
            steps:
              - {id: s, type: show_raw_test, params: {query: "id = {{ input.id }}", label: "{{ input.id }}"}}
        """, {"id": 7})
    finally:
        unregister_step_type("show_raw_test")
    assert result.output_of("s") == {"raw": "id = {{ input.id }}", "rendered": 7}


def test_a_built_in_step_type_cannot_be_replaced_by_accident():
    with pytest.raises(Exception, match="already registered"):
        register_step_type("shell", lambda step, params: None)


async def test_step_types_load_from_the_tokiwa_steps_entry_point_group(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "tokiwa_plug_demo-1.0.dist-info").mkdir(parents=True)
    (site / "tokiwa_plug_demo-1.0.dist-info" / "METADATA").write_text("Name: tokiwa-plug-demo\nVersion: 1.0\n")
    (site / "tokiwa_plug_demo-1.0.dist-info" / "entry_points.txt").write_text(
        "[tokiwa.steps]\nreverse_demo = tokiwa_plug_demo:Reverse\n")
    (site / "tokiwa_plug_demo.py").write_text(
        "class Reverse:\n    def run(self, step, params):\n        return params['text'][::-1]\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "reverse_demo" in load_entry_points(force=True)
        result = await run_yaml(tmp_path, """
            name: plugin
            steps:
              - {id: r, type: reverse_demo, params: {text: abc}}
        """)
    finally:
        unregister_step_type("reverse_demo")
    assert result.output_of("r") == "cba"


# --- bad files: errors name the field and the line ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "line", "field", "message"),
    [
        ("name: x\nsteps:\n  - id: a\n    type: shell\n    parms: {}\n", 5, "steps[0].parms", "Extra inputs"),
        ("name: x\nsteps:\n  - id: a\n    type: shel\n", 4, "steps[0].type", "unknown step type 'shel'"),
        ("name: x\nsteps:\n  - id: a\n    type: test\n    depends_on: [b]\n    params: {expression: 'true'}\n",
         5, "steps[0].depends_on[0]", "unknown step 'b'"),
        ("name: x\nmax_parallel: zero\nsteps:\n  - {id: a, type: test, params: {expression: 'true'}}\n",
         2, "max_parallel", "valid integer"),
        ("name: x\nsteps:\n  - id: a\n    type: shell\n    params:\n      argv: echo\n", 6, "steps[0].params.argv",
         "valid list"),
        ("name: x\nsteps:\n  - id: a\n    type: file\n    params: {op: move, path: p}\n", 5, "steps[0].params.op",
         "'write', 'copy', 'delete' or 'render'"),
        ("name: x\nsteps:\n  - id: a\n    type: test\n    params: {expression: 'true'}\n  - id: a\n    type: test\n"
         "    params: {expression: 'true'}\n", 6, "steps[1].id", "duplicate step id 'a'"),
        ("name: x\nsteps:\n  - id: a\n    type: shell\n    params:\n      argv: [echo, '{{ oops ']\n", 6,
         "steps[0].params.argv[1]", "template syntax error"),
        ("name: x\nsteps:\n  - id: a\n    type: test\n    retry: {backoff: cubic}\n    params: {expression: 'true'}\n",
         5, "steps[0].retry.backoff", "'fixed', 'exponential' or 'linear'"),
        ("name: x\nsteps:\n  - type: test\n    params: {expression: 'true'}\n", 3, "steps[0]", "needs an id"),
        ("name: x\nsteps: []\n", 2, "steps", "at least 1 item"),
        ("steps:\n  - {id: a, type: test, params: {expression: 'true'}}\n", 1, "name", "Field required"),
    ],
)
def test_bad_yaml_files_name_the_field_and_the_line(tmp_path, body, line, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(WorkflowFileError) as info:
        load_workflow_file(path)
    assert info.value.field == field
    assert info.value.line == line
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_a_dependency_cycle_names_the_steps_and_the_line(tmp_path):
    path = write(tmp_path, "cycle.yaml", """
        name: cycle
        steps:
          - {id: a, type: test, depends_on: [b], params: {expression: "true"}}
          - {id: b, type: test, depends_on: [a], params: {expression: "true"}}
    """)
    with pytest.raises(WorkflowFileError, match=r"line [34]: .*dependency cycle: (a -> b -> a|b -> a -> b)"):
        load_workflow_file(path)


def test_a_duplicate_yaml_key_is_an_error_with_its_line(tmp_path):
    path = write(tmp_path, "dup.yaml", "name: x\nname: y\nsteps: []\n")
    with pytest.raises(WorkflowFileError, match="line 2: name: duplicate key"):
        load_workflow_file(path)


def test_invalid_yaml_syntax_gives_the_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "name: x\nsteps:\n  - id: [unclosed\n")
    with pytest.raises(WorkflowFileError, match="not valid YAML") as info:
        load_workflow_file(path)
    assert info.value.line is not None and info.value.line >= 3


def test_every_problem_in_a_file_is_reported_at_once(tmp_path):
    path = write(tmp_path, "many.yaml", "name: x\nsteps:\n  - {id: a, type: nope}\n  - {id: b, type: nada}\n")
    with pytest.raises(WorkflowFileError) as info:
        load_workflow_file(path)
    assert [p[0] for p in info.value.problems] == ["steps[0].type", "steps[1].type"]


def test_json_files_load_and_their_errors_give_the_line(tmp_path):
    good = tmp_path / "ok.json"
    good.write_text(json.dumps({"name": "j", "steps": [{"id": "a", "type": "test", "params": {"expression": "1"}}]}))
    assert load_workflow_file(good).name == "j"
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "name": "j",\n  "steps": [\n    {"id": "a", "type": "nope"}\n  ]\n}\n')
    with pytest.raises(WorkflowFileError, match=r"line 4: steps\[0\]\.type: unknown step type"):
        load_workflow_file(bad)


def test_toml_files_load_and_their_errors_name_the_field(tmp_path):
    good = write(tmp_path, "ok.toml", """
        name = "t"
        [[steps]]
        id = "a"
        type = "test"
        params = {expression = "true"}
    """)
    assert [n.name for n in load_workflow_file(good).nodes] == ["a"]
    bad = write(tmp_path, "bad.toml", 'name = "t"\n[[steps]]\nid = "a"\ntype = "test"\ntimeout_s = -1\n')
    with pytest.raises(WorkflowFileError, match=r"steps\[0\]\.timeout_s: Input should be greater than 0"):
        load_workflow_file(bad)


def test_an_unknown_file_type_and_a_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(WorkflowFileError, match="unknown workflow file type '.txt'"):
        load_workflow_file(write(tmp_path, "wf.txt", "name: x"))
    with pytest.raises(WorkflowFileError, match="not found"):
        load_workflow_file(tmp_path / "absent.yaml")


def test_load_workflow_spec_builds_from_a_dict_and_names_bad_fields():
    workflow = load_workflow_spec({"name": "d", "steps": [{"name": "a", "type": "test",
                                                          "params": {"expression": "true"}}]})
    assert workflow.nodes[0].name == "a"
    with pytest.raises(WorkflowFileError, match="environment variable names") as info:
        load_workflow_spec({"name": "d", "secrets": ["not valid"], "steps": [{"id": "a", "type": "test"}]})
    assert info.value.field == "secrets" and info.value.line is None


def test_yaml_aliases_are_allowed_and_do_not_confuse_line_numbers(tmp_path):
    path = write(tmp_path, "alias.yaml", """
        name: alias
        variables: {common: &c {expression: "true"}}
        steps:
          - {id: a, type: test, params: *c}
          - {id: b, type: nope, params: *c}
    """)
    with pytest.raises(WorkflowFileError, match=r"line 5: steps\[1\]\.type"):
        load_workflow_file(path)


async def test_secrets_are_redacted_in_the_errors_of_failed_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOY_KEY", "k3y-VALUE")
    result = await run_yaml(tmp_path, """
        name: leaky
        secrets: [DEPLOY_KEY]
        steps:
          - id: s
            type: shell
            params: {argv: [sh, -c, 'echo "bad key $0" >&2; exit 1', "{{ secrets.DEPLOY_KEY }}"]}
    """)
    record = json.dumps(result.to_record())
    assert "bad key ***" in result.nodes["s"].error["message"]
    assert "k3y-VALUE" not in record
    assert result.nodes["s"].exception.stderr == "bad key ***\n"


def test_a_when_syntax_error_is_reported_at_load_with_its_line(tmp_path):
    path = write(tmp_path, "when.yaml", """
        name: w
        steps:
          - id: a
            type: test
            when: "input.x =="
            params: {expression: "true"}
    """)
    with pytest.raises(WorkflowFileError, match=r"line 5: steps\[0\]\.when: template syntax error"):
        load_workflow_file(path)


def test_retry_and_timeout_settings_map_onto_the_node():
    workflow = load_workflow_spec({"name": "r", "steps": [{
        "id": "a", "type": "test", "timeout_s": 2.5, "params": {"expression": "true"},
        "retry": {"max_attempts": 4, "backoff": "linear", "initial_delay_s": 0.5, "increment_s": 2,
                  "max_delay_s": 3, "jitter": "equal", "retryable_errors": ["CommandError"]}}]})
    node = workflow.nodes[0]
    assert node.timeout == 2.5
    assert (node.retry.max_attempts, node.retry.backoff, node.retry.jitter) == (4, "linear", "equal")
    assert node.retry.retry_on == ("CommandError",)
    for attempt, full_delay in ((1, 0.5), (2, 2.5), (3, 3.0)):  # linear, capped; equal jitter halves at most
        assert full_delay / 2 <= node.retry.delay_for(attempt) <= full_delay
