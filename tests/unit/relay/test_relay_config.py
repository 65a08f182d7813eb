"""Relay config: Miclow's TOML, its aliases, our additions, and errors that name the task."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from workers.relay.config import load_relay_config, parse_relay_config

MICLOW_README = """
[[tasks]]
task_name = "python-script"
command = "python3"
args = ["main.py"]
working_directory = "./"
environment_vars = { PYTHONUNBUFFERED = "1" }
subscribe_topics = ["key1", "key2"]

[[tasks]]
task_name = "example_task"
command = "python3"
args = ["a", "b"]
environment = { VAR1 = "value1", VAR2 = 2 }
topics = ["t1", "t2"]
"""


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def task(**fields: object) -> dict[str, object]:
    return {"task_name": "w", "command": "python3", **fields}


def test_the_miclow_readme_config_loads_with_both_spellings(tmp_path: Path) -> None:
    config = load_relay_config(write(tmp_path, MICLOW_README))
    first, second = config.tasks
    assert first.subscribe_topics == ["key1", "key2"]
    assert first.environment_vars == {"PYTHONUNBUFFERED": "1"}
    assert second.environment_vars == {"VAR1": "value1", "VAR2": "2"}
    assert second.subscribe_topics == ["t1", "t2"]


def test_working_directory_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    config = load_relay_config(write(tmp_path, '[[tasks]]\ntask_name="a"\ncommand="x"\nworking_directory="sub"\n'))
    assert config.tasks[0].working_directory == (tmp_path / "sub").resolve()


def test_absent_working_directory_is_the_config_files_directory(tmp_path: Path) -> None:
    config = load_relay_config(write(tmp_path, '[[tasks]]\ntask_name="a"\ncommand="x"\n'))
    assert config.tasks[0].working_directory == tmp_path


def test_plain_output_topics_default_to_task_name_stdout_and_stderr() -> None:
    spec = parse_relay_config({"tasks": [task()]}).tasks[0]
    assert (spec.stdout_topic, spec.stderr_topic) == ("w.stdout", "w.stderr")


def test_tokiwa_additions_have_safe_defaults() -> None:
    spec = parse_relay_config({"tasks": [task()]}).tasks[0]
    assert (spec.restart, spec.stdin_framing, spec.queue_max, spec.args) == ("never", "line", 1000, [])


def test_subscribing_twice_in_config_is_one_subscription() -> None:
    assert parse_relay_config({"tasks": [task(subscribe_topics=["a", "a"])]}).tasks[0].subscribe_topics == ["a"]


def test_no_tasks_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no autostart tasks"):
        parse_relay_config({"tasks": []})


def test_error_names_the_task_and_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_config({"tasks": [task(), task(task_name="bad", restart="sometimes")]}, source="r.toml")
    assert "task 'bad' (tasks[1])" in str(info.value) and "r.toml" in str(info.value)
    assert info.value.field == "restart"


def test_missing_command_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_config({"tasks": [{"task_name": "lonely"}]})
    assert info.value.field == "command" and "'lonely'" in str(info.value)


def test_unknown_key_is_rejected_instead_of_silently_ignored() -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_config({"tasks": [task(restart_on_failure=True)]})
    assert info.value.field == "restart_on_failure"


def test_topic_with_a_space_is_rejected() -> None:
    with pytest.raises(ConfigError, match="no whitespace"):
        parse_relay_config({"tasks": [task(subscribe_topics=["a b"])]})


def test_both_spellings_of_one_setting_are_rejected() -> None:
    with pytest.raises(ConfigError, match="not both"):
        parse_relay_config({"tasks": [task(topics=["a"], subscribe_topics=["b"])]})


def test_duplicate_task_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate task_name 'w'"):
        parse_relay_config({"tasks": [task(), task()]})


def test_missing_working_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory does not exist"):
        parse_relay_config({"tasks": [task(working_directory=str(tmp_path / "nope"))]})


def test_unknown_framing_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_config({"tasks": [task(stdin_framing="json")]})
    assert info.value.field == "stdin_framing"


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_relay_config(write(tmp_path, "[[tasks]\n"))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_relay_config(tmp_path / "absent.toml")


def test_includes_are_followed_relative_to_the_including_file(tmp_path: Path) -> None:
    (tmp_path / "inc").mkdir()
    write(tmp_path / "inc", '[[tasks]]\ntask_name="b"\ncommand="x"\n', "more.toml")
    root = write(tmp_path, 'include_paths=["inc/more.toml"]\n[[tasks]]\ntask_name="a"\ncommand="x"\n')
    config = load_relay_config(root)
    assert [t.task_name for t in config.tasks] == ["a", "b"]
    assert config.tasks[1].working_directory == (tmp_path / "inc").resolve()


def test_circular_include_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, 'include_paths=["relay.toml"]\n[[tasks]]\ntask_name="b"\ncommand="x"\n', "b.toml")
    root = write(tmp_path, 'include_paths=["b.toml"]\n[[tasks]]\ntask_name="a"\ncommand="x"\n')
    assert [t.task_name for t in load_relay_config(root).tasks] == ["a", "b"]


def test_missing_include_is_an_error(tmp_path: Path) -> None:
    root = write(tmp_path, 'include_paths=["gone.toml"]\n[[tasks]]\ntask_name="a"\ncommand="x"\n')
    with pytest.raises(ConfigError, match="not found"):
        load_relay_config(root)


def test_error_in_an_included_task_names_its_file(tmp_path: Path) -> None:
    write(tmp_path, '[[tasks]]\ntask_name="b"\ncommand="x"\nqueue_max=0\n', "b.toml")
    root = write(tmp_path, 'include_paths=["b.toml"]\n[[tasks]]\ntask_name="a"\ncommand="x"\n')
    with pytest.raises(ConfigError, match=r"task 'b' \(tasks\[1\] in .*b\.toml\)"):
        load_relay_config(root)


def test_publish_events_patterns_match_like_shell_globs() -> None:
    config = parse_relay_config({"tasks": [task()], "publish_events": ["orders.*", "audit"]})
    regex = config.publish_events_regex()
    assert regex.match("orders.created") and regex.match("audit")
    assert not regex.match("orders") and not regex.match("audit.x")


def test_functions_are_found_by_case_insensitive_name() -> None:
    config = parse_relay_config({"tasks": [task()], "functions": [task(task_name="Resize")]})
    assert config.function("resize").task_name == "Resize"
    assert config.function("missing") is None


def test_the_example_relay_file_is_valid() -> None:
    root = Path(__file__).resolve().parents[3]
    config = load_relay_config(root / "examples" / "relay" / "relay.toml")
    assert {t.task_name for t in config.tasks} == {"pinger", "echo"}


def test_a_restart_backoff_below_the_minimum_is_raised_to_it_with_a_warning(caplog) -> None:
    from workers.relay.config import RESTART_MIN_DELAY_S

    with caplog.at_level("WARNING", logger="tokiwa.relay"):
        spec = parse_relay_config({"tasks": [task(restart="always", restart_backoff_s=0)]}).tasks[0]
    assert [spec.restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert RESTART_MIN_DELAY_S == 0.5
    warning = [r.getMessage() for r in caplog.records if "restart_backoff_s" in r.getMessage()]
    assert len(warning) == 1 and "task 'w'" in warning[0] and "wait 0.5 s" in warning[0]


def test_restart_delays_double_per_quick_exit_up_to_the_cap() -> None:
    spec = parse_relay_config({"tasks": [task(restart="on-failure", restart_backoff_s=2,
                                              restart_backoff_max_s=5)]}).tasks[0]
    assert [spec.restart_delay(n) for n in (0, 1, 2, 3, 10, 100)] == [2, 2, 4, 5, 5, 5]


def test_a_task_that_never_restarts_gets_no_backoff_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="tokiwa.relay"):
        parse_relay_config({"tasks": [task(restart_backoff_s=0)]})
    assert not [r for r in caplog.records if "restart_backoff_s" in r.getMessage()]


def test_a_backoff_cap_below_the_backoff_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_relay_config({"tasks": [task(restart="always", restart_backoff_s=5, restart_backoff_max_s=2)]})
    assert "task 'w'" in str(err.value) and "restart_backoff_max_s (2) must not be below" in str(err.value)


def test_lossless_topics_match_like_shell_globs_and_reject_whitespace() -> None:
    config = parse_relay_config({"tasks": [task()], "lossless_topics": ["orders.*", "audit"]})
    regex = config.lossless_regex()
    assert regex is not None
    assert [bool(regex.match(t)) for t in ("orders.new", "audit", "Audit", "auditx", "orders")] == \
        [True, True, False, False, False]
    assert parse_relay_config({"tasks": [task()]}).lossless_regex() is None
    with pytest.raises(ConfigError) as err:
        parse_relay_config({"tasks": [task()], "lossless_topics": ["two words"]})
    assert "lossless_topics" in str(err.value)


def test_outbox_max_and_lossless_maxlen_are_bounded() -> None:
    assert parse_relay_config({"tasks": [task()]}).tasks[0].outbox_max == 100_000
    for data in ({"tasks": [task(outbox_max=0)]}, {"tasks": [task()], "lossless_maxlen": 10}):
        with pytest.raises(ConfigError):
            parse_relay_config(data)
