"""Templates: strict Jinja2 rendering of nested parameters, safe expressions, secret redaction."""

from __future__ import annotations

import logging
import re

import pytest

from orchestrator.declarative.templates import (
    RedactingFilter,
    evaluate,
    redact,
    render,
    render_command,
    render_string,
    secrets_from_env,
    template_data,
)
from orchestrator.errors import ConfigError, TemplateError

NS = {
    "variables": {"env": "prod", "count": 3},
    "input": {"ref": "A-1"},
    "steps": {"fetch": {"output": {"rows": [1, 2, 3]}}},
    "secrets": {"TOKEN": "s3cr3t"},
}


def test_strings_inside_nested_params_are_rendered_and_other_values_kept():
    params = {"argv": ["echo", "{{ variables.env }}-{{ input.ref }}"], "retries": 2, "flag": True}
    assert render(params, NS) == {"argv": ["echo", "prod-A-1"], "retries": 2, "flag": True}


def test_a_lone_expression_keeps_its_native_type():
    assert render_string("{{ steps.fetch.output.rows }}", NS) == [1, 2, 3]
    assert render_string("{{ variables.count * 2 }}", NS) == 6


def test_whitespace_around_a_lone_expression_makes_it_a_string():
    assert render_string(" {{ variables.count * 2 }}\n", NS) == " 6\n"


def test_dotted_names_on_mappings_find_keys_before_dict_methods():
    assert render_string("{{ steps.copy.output }}", {"steps": {"copy": {"output": 1}}}) == 1
    assert render_string("{{ data.items }}", {"data": {"items": [1]}}) == [1]


def test_text_around_an_expression_makes_a_string():
    assert render_string("n={{ variables.count }}", NS) == "n=3"


def test_strings_without_template_syntax_are_returned_as_they_are():
    assert render_string("plain } text {", NS) == "plain } text {"


def test_a_missing_top_level_name_is_a_template_error_naming_it():
    with pytest.raises(TemplateError, match="'nope' is undefined") as info:
        render({"a": {"b": "{{ nope }}"}}, NS, where="step x params")
    assert info.value.name == "nope"
    assert "step x params.a.b" in str(info.value)
    assert "top-level names: input, secrets, steps, variables" in str(info.value)


def test_a_missing_key_names_it_and_lists_the_available_keys():
    with pytest.raises(TemplateError, match=r"'missing' is undefined \(available keys: fetch\)") as info:
        render_string("{{ steps.missing.output }}", NS)
    assert info.value.name == "missing"


def test_a_missing_name_inside_a_larger_template_still_fails():
    with pytest.raises(TemplateError) as info:
        render_string("x {{ variables.nope }} y", NS)
    assert info.value.name == "nope"


def test_a_syntax_error_is_a_template_error_with_the_line():
    with pytest.raises(TemplateError, match="syntax error on line 2"):
        render_string("ok\n{{ broken", NS)


def test_templates_are_sandboxed():
    with pytest.raises(TemplateError, match="unsafe"):
        render_string("{{ ().__class__.__mro__ }}", NS)


def test_defaults_and_tests_work_with_strict_undefined():
    assert render_string("{{ variables.other | default('d') }}", NS) == "d"
    assert render_string("{{ variables.other is defined }}", NS) is False


def test_evaluate_checks_an_expression_without_python_eval():
    assert evaluate("steps.fetch.output.rows | length == 3 and input.ref.startswith('A')", NS) is True
    assert evaluate("variables.count > 5", NS) is False


def test_evaluate_cannot_reach_python_internals():
    with pytest.raises(TemplateError):
        evaluate("variables.__class__.__subclasses__()", NS)


def test_evaluate_rejects_an_empty_expression():
    with pytest.raises(TemplateError, match="non-empty"):
        evaluate("  ", NS)


def test_redact_hides_every_secret_value_anywhere_in_a_value():
    value = {"out": "token=s3cr3t", "list": ["a s3cr3t b", 1], "s3cr3t-key": None}
    assert redact(value, {"TOKEN": "s3cr3t"}) == {"out": "token=***", "list": ["a *** b", 1], "***-key": None}


def test_redact_hides_a_longer_secret_whole_even_if_it_contains_a_shorter_one():
    assert redact("abcdef and abc", ["abc", "abcdef"]) == "*** and ***"


def test_redact_ignores_empty_secrets():
    assert redact("text", ["", None]) == "text"


def test_redacting_filter_hides_secrets_in_log_messages(caplog):
    logger = logging.getLogger("tokiwa.test.redact")
    secret_filter = RedactingFilter(["s3cr3t"])
    logger.addFilter(secret_filter)
    try:
        with caplog.at_level(logging.INFO, logger="tokiwa.test.redact"):
            logger.info("calling with %s", "s3cr3t")
    finally:
        logger.removeFilter(secret_filter)
    assert caplog.records[-1].getMessage() == "calling with ***"


def test_secrets_come_from_the_environment():
    assert secrets_from_env(["TOKEN"], {"TOKEN": "v", "OTHER": "w"}) == {"TOKEN": "v"}


def test_a_missing_secret_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="API_KEY"):
        secrets_from_env(["API_KEY"], {})


# --- commands: values held apart from the template's own text ----------------------------------


def test_a_rendered_command_holds_its_values_apart_from_the_template_text():
    command = render_command("cp {{ input.ref }} '{{ variables.env }} x'", NS)
    assert command.values == ("A-1", "prod")
    assert "A-1" not in command.text and command.literal == "cp  ' x'"
    assert command.argv() == ["cp", "A-1", "prod x"]


def test_a_value_that_looks_like_a_template_is_not_rendered_again():
    assert render_command("echo {{ input.v }}", {"input": {"v": "{{ secrets.TOKEN }}"}}).argv() == [
        "echo", "{{ secrets.TOKEN }}"]


def test_a_macro_or_set_block_output_is_one_value():
    source = "{% macro m(a) %}<{{ a }} x>{% endmacro %}{% set s %}[{{ input.ref }}]{% endset %}echo {{ m(input.ref) }} {{ s }}"
    assert render_command(source, NS).argv() == ["echo", "<A-1 x>", "[A-1]"]


def test_a_filter_block_around_a_value_is_refused():
    with pytest.raises(TemplateError, match=r"^w: command template .*: a value was changed after it was output "
                                            r"\(a \{% filter %\} block\?\); apply filters inside \{\{ \}\} instead$"):
        render_command("echo {% filter upper %}{{ input.ref }}{% endfilter %}", NS, where="w")


def test_a_nul_byte_in_the_command_template_is_refused():
    with pytest.raises(TemplateError, match=r"^w: command template 'echo \\x00' contains a NUL byte$"):
        render_command("echo \x00", NS, where="w")


def test_a_command_rendered_to_nothing_is_refused():
    with pytest.raises(TemplateError, match=r"command '\{% if false %\}ls\{% endif %\}' is empty once rendered"):
        render_command("{% if false %}ls{% endif %}", NS).argv()


def test_a_missing_name_in_a_command_is_the_usual_template_error():
    with pytest.raises(TemplateError, match="'nope' is undefined") as info:
        render_command("echo {{ nope }}", NS, where="step s params.command")
    assert info.value.name == "nope" and str(info.value).startswith("step s params.command: ")


@pytest.mark.parametrize(("source", "script"), [
    ("echo {{ input.ref }}", 'echo "${TOKIWA_VALUE_0}"'),
    ("echo '{{ input.ref }}'", "echo ''\"${TOKIWA_VALUE_0}\"''"),
    ('echo "x{{ input.ref }}"', 'echo "x${TOKIWA_VALUE_0}"'),
    ("echo \\'{{ input.ref }}", "echo \\'\"${TOKIWA_VALUE_0}\""),
    ('echo "$(cat {{ input.ref }})"', 'echo "$(cat "${TOKIWA_VALUE_0}")"'),
    ('echo "`cat {{ input.ref }}`"', 'echo "`cat "${TOKIWA_VALUE_0}"`"'),
    ('echo "${X:-{{ input.ref }}}" ${Y:-{{ input.ref }}}', 'echo "${X:-${TOKIWA_VALUE_0}}" ${Y:-"${TOKIWA_VALUE_1}"}'),
    ("echo a # {{ input.ref }}\necho {{ input.ref }}", 'echo a # ${TOKIWA_VALUE_0}\necho "${TOKIWA_VALUE_1}"'),
    ("echo $(echo a)#{{ input.ref }} $#{{ input.ref }}", 'echo $(echo a)#"${TOKIWA_VALUE_0}" $#"${TOKIWA_VALUE_1}"'),
    ("cat <<-END; echo {{ input.ref }}\n\t{{ input.ref }} 'x'\n\tEND\necho '{{ input.ref }}'",
     "cat <<-END; echo \"${TOKIWA_VALUE_0}\"\n\t${TOKIWA_VALUE_1} 'x'\n\tEND\necho ''\"${TOKIWA_VALUE_2}\"''"),
    ("echo $(( 1 + 2 )) {{ input.ref }}", 'echo $(( 1 + 2 )) "${TOKIWA_VALUE_0}"'),
])
def test_shell_scripts_reference_each_value_quoted_for_where_it_stands(source, script):
    got, env = render_command(source, NS).shell()
    assert got == script
    assert env == {f"TOKIWA_VALUE_{i}": "A-1" for i in range(script.count("TOKIWA_VALUE_"))}


@pytest.mark.parametrize(("source", "why"), [
    ("echo $(( {{ variables.count }} * 2 ))", "inside $(( )) would be evaluated as arithmetic"),
    ('cat <<"EOF"\n{{ input.ref }}\nEOF', "here-document with a quoted delimiter would not be expanded"),
    ("cat <<{{ input.ref }}\nx\n", "here-document's delimiter cannot come from a {{ }} value"),
])
def test_shell_contexts_that_would_not_keep_a_value_one_word_are_refused(source, why):
    with pytest.raises(TemplateError, match=re.escape(f"w: command {source!r}: ") + ".*" + re.escape(why)):
        render_command(source, NS, where="w").shell()


def test_template_data_is_the_text_outside_jinja_syntax():
    assert template_data("ls {{ x | default('|') }}{% if y %} -v{% else %} -q{% endif %}{# c; #} |") == "ls  -v -q |"
    assert template_data("{{ broken") is None
