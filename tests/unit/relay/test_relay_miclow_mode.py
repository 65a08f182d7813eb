"""Miclow mode: the output dialect, the plain-output rule of the README form, and the
lenient reading of a Miclow file (unknown keys, ``${VAR}``, ``[tasks.command]``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from workers.relay.config import load_relay_config, parse_relay_config
from workers.relay.miclow import expand
from workers.relay.protocol import Output, OutputParser, bare_topic, written_lines


def parse(line: str, dialect: str = "tokiwa") -> Output | None:
    return OutputParser("t.stdout", dialect=dialect).feed(line)  # type: ignore[arg-type]


def task(**fields: object) -> dict[str, object]:
    return {"task_name": "w", "command": "python3", **fields}


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- what could not be a topic stays plain output (both dialects) ------------------------------
PROSE = [
    '{"name": "Alice", "age": 30}',
    "ValueError: boom",
    "json.decoder.JSONDecodeError: Expecting value",
    "WARNING:root:disk almost full",
    "INFO:__main__:started",
    "Result: ok",
    "http://example.com/x",
    "redis://localhost:6379/0",
    "Traceback (most recent call last):",
    "Processing item 3: done",
    "12:30:05 started",
    "[1, 2]: list",
    "'quoted': x",
    "C:\\temp: file",
]


@pytest.mark.parametrize("line", PROSE)
@pytest.mark.parametrize("dialect", ["tokiwa", "miclow"])
def test_a_line_whose_topic_could_not_be_a_topic_is_plain_output(line: str, dialect: str) -> None:
    assert parse(line, dialect) == Output("plain", "t.stdout", line)


@pytest.mark.parametrize("line,topic,data", [
    ("task_queue: value", "task_queue", "value"),
    ("results:Processed: x", "results", "Processed: x"),
    ("orders.eu-west: A-1", "orders.eu-west", "A-1"),
    ("key1:", "key1", ""),
])
def test_a_readme_style_topic_makes_a_message(line: str, topic: str, data: str) -> None:
    assert parse(line) == Output("message", topic, data)


def test_a_readme_style_command_may_use_any_case() -> None:
    assert parse("System.Subscribe-Topic: News") == Output("command", "system.subscribe-topic", "News")


def test_the_bare_topic_rule_in_one_place() -> None:
    assert [bare_topic(t) for t in ("a", "a.b-c_1", "system.Status", "A", "a b", "1a", "a/b", "")] == \
        [True, True, True, False, False, False, False, False]


# -- the Miclow dialect --------------------------------------------------------------------------
def test_miclow_dialect_reads_an_unquoted_colon_line_as_plain_as_miclow_does() -> None:
    assert parse("task_queue: value", "miclow") == Output("plain", "t.stdout", "task_queue: value")


def test_miclow_dialect_reads_a_bare_system_status_line_as_plain() -> None:
    assert parse("system.status", "miclow").kind == "plain"


def test_miclow_dialect_reads_the_quoted_forms() -> None:
    parser = OutputParser("t.stdout", dialect="miclow")
    assert parser.feed('"k" :\t v ') == Output("message", "k", "v")
    assert parser.feed('"doc"::') is None
    assert parser.feed("a\n") is None
    assert parser.feed('::"doc"') == Output("message", "doc", "a\n")


def test_the_lines_a_child_wrote_can_be_shown_again() -> None:
    parser = OutputParser("t.stdout")
    assert written_lines(parser.feed("orders: A-1\n")) == ["orders: A-1"]
    assert written_lines(parser.feed('"k" : v\n')) == ['"k" : v']
    assert written_lines(parser.feed("just prose\n")) == ["just prose"]
    parser.feed('"d\\"oc"::\n')
    parser.feed("a\r\n")
    assert written_lines(parser.feed('::"d\\"oc"\n')) == ['"d\\"oc"::', "a", '::"d\\"oc"']


# -- choosing the mode -----------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["miclow", "Miclow", "MiclowStdIO", "miclowstdio"])
def test_one_line_puts_a_file_in_miclow_mode(spelling: str) -> None:
    config = parse_relay_config({"protocol": spelling, "tasks": [task()]})
    assert config.protocol == "miclow"
    assert (config.tasks[0].protocol, config.tasks[0].stdin_framing) == ("miclow", "counted")


def test_a_task_naming_miclows_protocol_puts_its_file_in_miclow_mode() -> None:
    config = parse_relay_config({"tasks": [task(protocol="MiclowStdIO"), task(task_name="other")]})
    assert config.protocol == "miclow" and [t.protocol for t in config.tasks] == ["miclow", "miclow"]


def test_the_default_mode_is_tokiwa_with_line_framing() -> None:
    spec = parse_relay_config({"tasks": [task()]}).tasks[0]
    assert (spec.protocol, spec.stdin_framing) == ("tokiwa", "line")


def test_an_explicit_framing_wins_over_the_modes_default() -> None:
    assert parse_relay_config({"protocol": "miclow", "tasks": [task(stdin_framing="line")]}).tasks[0].stdin_framing \
        == "line"


def test_a_task_may_keep_tokiwas_protocol_in_a_miclow_file() -> None:
    config = parse_relay_config({"protocol": "miclow", "tasks": [task(protocol="tokiwa")]})
    assert config.tasks[0].protocol == "tokiwa"


@pytest.mark.parametrize("data", [{"protocol": "MCP", "tasks": [task()]}, {"tasks": [task(protocol="Interactive")]}])
def test_an_unknown_protocol_is_an_error_that_names_the_choices(data: dict) -> None:
    with pytest.raises(ConfigError, match="MiclowStdIO") as err:
        parse_relay_config(data)
    assert err.value.field == "protocol"


# -- lenient keys ----------------------------------------------------------------------------------
def test_miclow_mode_ignores_unknown_keys_with_one_warning_each(caplog) -> None:
    data = {"protocol": "miclow", "flavour": "x",
            "tasks": [task(auto_start=True, initial_topics=["a"]), task(task_name="v", auto_start=False)]}
    with caplog.at_level("WARNING", logger="tokiwa.relay"):
        config = parse_relay_config(data)
    assert [t.task_name for t in config.tasks] == ["w", "v"]
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert len(warnings) == 3
    assert "'tasks.auto_start' (task 'w', 'v') ignored in Miclow mode" in warnings[1]
    assert "'flavour' ignored" in warnings[0] and "subscribe_topics" in warnings[2]


def test_tokiwa_mode_still_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigError) as err:
        parse_relay_config({"tasks": [task(auto_start=True)]})
    assert err.value.field == "auto_start"


# -- variables ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("${A}", "1"), ("${EMPTY}", ""), ("${UNSET:-d}", "d"), ("${EMPTY:-d}", "d"), ("${EMPTY-d}", ""),
    ("${UNSET-d}", "d"), ("x${A}y${A}", "x1y1"), ("$A ${MICLOW_CONFIG_DIR}/run", "$A /cfg/run"),
])
def test_variables_expand_as_in_miclow(text: str, expected: str) -> None:
    assert expand(text, "/cfg", {"A": "1", "EMPTY": ""}, "relay config", "args") == expected


def test_an_unset_variable_without_a_default_is_an_error_naming_task_and_field(monkeypatch) -> None:
    monkeypatch.delenv("TOKIWA_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"task 'w'.*'args'.*TOKIWA_TEST_UNSET") as err:
        parse_relay_config({"protocol": "miclow", "tasks": [task(args=["${TOKIWA_TEST_UNSET}"])]})
    assert err.value.field == "args"


def test_tokiwa_mode_leaves_dollar_braces_alone() -> None:
    assert parse_relay_config({"tasks": [task(args=["${HOME}"])]}).tasks[0].args == ["${HOME}"]


LATER_FORMAT = """
[[tasks]]
protocol = "MiclowStdIO"
task_name = "apply"
view_stdout = true

[tasks.command]
command = "python3"
args = ["apply.py", "${GREETING:-hello}"]
working_directory = "${MICLOW_CONFIG_DIR}/sub"
environment = { PYTHONUNBUFFERED = "1", WHERE = "${MICLOW_CONFIG_DIR}" }

[tasks.lifecycle]
desired_instances = 5
"""


def test_miclows_later_format_loads(tmp_path: Path, monkeypatch, caplog) -> None:
    (tmp_path / "sub").mkdir()
    monkeypatch.delenv("GREETING", raising=False)
    with caplog.at_level("WARNING", logger="tokiwa.relay"):
        config = load_relay_config(write(tmp_path, LATER_FORMAT))
    spec = config.tasks[0]
    assert (spec.command, spec.args, spec.working_directory) == ("python3", ["apply.py", "hello"], tmp_path / "sub")
    assert spec.environment_vars == {"PYTHONUNBUFFERED": "1", "WHERE": str(tmp_path)}
    assert (spec.protocol, spec.view_stdout) == ("miclow", True)
    assert [r.getMessage() for r in caplog.records if "lifecycle" in r.getMessage()] != []


def test_a_field_given_in_the_task_and_in_its_command_table_is_an_error() -> None:
    entry = {"task_name": "w", "args": ["a"], "command": {"command": "x", "args": ["b"]}}
    with pytest.raises(ConfigError, match="both in the task and in its") as err:
        parse_relay_config({"protocol": "miclow", "tasks": [entry]})
    assert err.value.field == "args"


def test_the_seed_commits_example_config_loads_in_both_modes(tmp_path: Path) -> None:
    example = ('[[tasks]]\ntask_name = "json-generator"\ncommand = "bash"\n'
               'args = ["-c", "echo \'{\\"name\\": \\"Alice\\"}\';"]\n'
               'subscribe_topics = ["json-data", "user-info"]\nview_stdout = true\nview_stderr = true')
    plain = load_relay_config(write(tmp_path, example, "a.toml"))
    miclow = load_relay_config(write(tmp_path, 'protocol = "miclow"\n' + example, "b.toml"))
    assert (plain.tasks[0].protocol, miclow.tasks[0].protocol) == ("tokiwa", "miclow")
    assert plain.tasks[0].args == miclow.tasks[0].args


# -- includes ------------------------------------------------------------------------------------------
def test_an_included_file_inherits_the_including_files_mode(tmp_path: Path) -> None:
    write(tmp_path, '[[functions]]\ntask_name="f"\ncommand="x"\nauto_start=false\n', "inc.toml")
    root = write(tmp_path, 'protocol="miclow"\ninclude_paths=["${MICLOW_CONFIG_DIR}/inc.toml"]\n'
                           '[[tasks]]\ntask_name="a"\ncommand="x"\n')
    config = load_relay_config(root)
    assert config.functions[0].protocol == "miclow"


def test_an_include_cycle_back_to_the_root_loads_the_root_once(tmp_path: Path, caplog) -> None:
    # Miclow never marks the root as loaded, so it loads it twice and starts its tasks twice
    write(tmp_path, 'include_paths=["relay.toml"]\n[[tasks]]\ntask_name="b"\ncommand="x"\n', "b.toml")
    root = write(tmp_path, 'protocol="miclow"\ninclude_paths=["b.toml"]\n[[tasks]]\ntask_name="a"\ncommand="x"\n')
    with caplog.at_level("WARNING", logger="tokiwa.relay"):
        assert [t.task_name for t in load_relay_config(root).tasks] == ["a", "b"]
    assert any("circular include" in r.getMessage() for r in caplog.records)
