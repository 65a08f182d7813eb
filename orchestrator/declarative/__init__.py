"""Declarative workflows: YAML / TOML / JSON files, their step types (shell, file, test,
docker, python, custom) and the Jinja templates they render.
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "DeclarativeWorkflow": "files",
    "RetrySpec": "files",
    "StepHandler": "files",
    "StepSpec": "files",
    "WorkflowSpec": "files",
    "load_workflow_file": "files",
    "load_workflow_spec": "files",
    "run_workflow_file": "files",
    "DockerParams": "steps",
    "FileParams": "steps",
    "PythonParams": "steps",
    "RedactingNodeContext": "steps",
    "ShellParams": "steps",
    "StepContext": "steps",
    "StepType": "steps",
    "TestParams": "steps",
    "build_docker_argv": "steps",
    "call_maybe_async": "steps",
    "get_step_type": "steps",
    "import_callable": "steps",
    "load_entry_points": "steps",
    "register_step_type": "steps",
    "run_docker": "steps",
    "run_file": "steps",
    "run_python": "steps",
    "run_shell": "steps",
    "run_test": "steps",
    "step_types": "steps",
    "unregister_step_type": "steps",
    "EnvSecretsRedactor": "templates",
    "MissingNameError": "templates",
    "RedactingFilter": "templates",
    "Redactor": "templates",
    "RenderedCommand": "templates",
    "evaluate": "templates",
    "make_environment": "templates",
    "redact": "templates",
    "render": "templates",
    "render_command": "templates",
    "render_string": "templates",
    "render_text": "templates",
    "secrets_from_env": "templates",
    "syntax_problem": "templates",
    "template_data": "templates",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('orchestrator.declarative', _EXPORTS)
