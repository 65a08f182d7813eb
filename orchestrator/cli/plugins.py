"""``tokiwa-producer plugins list|lint [--json]``: the task plug-ins installed in this Python.

A plug-in is an entry point of the group ``tokiwa.tasks`` (or pyoco's ``pyoco.tasks``, read
too, so pyoco plug-ins work unchanged) whose hook registers tasks
(:mod:`orchestrator.pyoco.discovery.plugins`). ``list`` shows each plug-in, its tasks, how
each was registered (``task_class`` is the recommended form; ``callable`` is accepted with a
warning) and any warning or load error. ``lint`` prints the problems and exits 1 when there
is any (0 when every plug-in looks good), so a plug-in's CI can run it.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from orchestrator.cli import exitcodes
from orchestrator.cli.producer import setup_logging


def collect_reports() -> list[dict[str, Any]]:
    """One report per installed plug-in (see :class:`~orchestrator.pyoco.discovery.loader.TaskLoader`)."""
    from orchestrator.pyoco.discovery.loader import TaskLoader

    setup_logging("WARNING")
    logging.getLogger("tokiwa.plugins").setLevel(logging.ERROR)  # the report says it once
    return TaskLoader.from_plugins().plugin_reports


def issues_of(reports: list[dict[str, Any]]) -> list[str]:
    """Every error and warning, as ``plugin: message`` / ``plugin.task: message`` lines."""
    issues = []
    for info in reports:
        prefix = info["name"]
        if info.get("error"):
            issues.append(f"{prefix}: {info['error']}")
            continue
        issues.extend(f"{prefix}: {warning}" for warning in info.get("warnings", []))
        for task in info.get("tasks", []):
            issues.extend(f"{prefix}.{task['name']}: {warning}" for warning in task.get("warnings", []))
    return issues


def _groups() -> str:
    from orchestrator.pyoco.discovery.plugins import GROUPS

    return ", ".join(repr(g) for g in GROUPS)


@click.group("plugins")
def plugins_group() -> None:
    """Task plug-ins (entry-point groups tokiwa.tasks and pyoco.tasks)."""


@plugins_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def list_command(as_json: bool) -> None:
    """Each installed plug-in, its tasks and their warnings."""
    reports = collect_reports()
    if as_json:
        click.echo(json.dumps(reports, indent=2, default=str))
        return
    if not reports:
        click.echo(f"No plug-ins registered under the entry-point groups {_groups()}.")
        return
    click.echo("Discovered plug-ins:")
    for info in reports:
        click.echo(f" - {info['name']} ({info.get('module') or info.get('value')}) [{info.get('group', '')}]")
        if info.get("error"):
            click.echo(f"     ⚠️  error: {info['error']}")
            continue
        for task in info.get("tasks", []):
            state = "; ".join(task.get("warnings", [])) or "ok"
            click.echo(f"     • {task['name']} [{task['origin']}] ({state})")
        for warning in info.get("warnings", []):
            click.echo(f"     ⚠️  {warning}")


@plugins_group.command("lint")
@click.option("--json", "as_json", is_flag=True, help="Print {issues, reports} as JSON.")
def lint_command(as_json: bool) -> None:
    """Exit 1 if any plug-in has a warning or failed to load."""
    reports = collect_reports()
    issues = issues_of(reports)
    if as_json:
        click.echo(json.dumps({"issues": issues, "reports": reports}, indent=2, default=str))
    elif not issues:
        click.echo("✅ All plug-ins look good." if reports else
                   f"✅ No plug-ins installed (entry-point groups {_groups()}).")
    else:
        click.echo("⚠️  Plug-in issues found:")
        for issue in issues:
            click.echo(f" - {issue}")
    sys.exit(exitcodes.FAILURE if issues else exitcodes.OK)
