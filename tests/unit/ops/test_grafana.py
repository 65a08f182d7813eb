"""The Grafana dashboard: valid JSON, the panels the issue asks for, and every query names a
metric that orchestrator.ops.metrics registers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.ops import metrics

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "tokiwa.json"
METRIC = re.compile(r"\btokiwa_[a-z0-9_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries(dashboard: dict) -> list[str]:
    """Every PromQL text: panel targets and templating variable queries."""
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            found.append(query.get("query", ""))
        if var.get("definition"):
            found.append(var["definition"])
    return found


def test_every_metric_named_in_the_dashboard_is_registered_by_the_code(dashboard):
    named = {name for q in queries(dashboard) for name in METRIC.findall(q)}
    assert named, "the dashboard names no tokiwa metric"
    unknown = named - metrics.metric_names()
    assert not unknown, f"dashboard queries name metrics tokiwa does not register: {sorted(unknown)}"


def test_every_panel_query_names_a_tokiwa_metric(dashboard):
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), (panel["title"], target["expr"])


def test_the_dashboard_has_the_panels_the_issue_asks_for(dashboard):
    exprs = " ".join(queries(dashboard))
    for needed in ("tokiwa_runs_in_progress", "rate(tokiwa_runs_total", "tokiwa_run_duration_seconds_sum",
                   "tokiwa_dead_letters_total", "tokiwa_group_lag"):
        assert needed in exprs, needed


def test_panel_ids_are_unique_and_every_query_uses_the_datasource_variable(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_a_misspelled_metric_would_be_caught():
    assert "tokiwa_run_total" not in metrics.metric_names()
    assert "tokiwa_runs_total" in metrics.metric_names()


# -- operator docs: a redis-cli recipe for every key ------------------------------------------
def key_builders() -> list[tuple[str, str]]:
    """(builder name, key with each argument as NUL) for every Keys member."""
    import inspect

    from orchestrator.keys import Keys, PartitionKeys

    built = []
    for cls, keys in ((Keys, Keys("tokiwa")), (PartitionKeys, PartitionKeys("tokiwa", 0))):
        for name, member in vars(cls).items():
            if name.startswith("_") or name in ("tag", "all_patterns"):
                continue
            if isinstance(member, property):
                key = getattr(keys, name)
            elif inspect.isfunction(member):
                params = list(inspect.signature(member).parameters)[1:]
                key = getattr(keys, name)(*["\0"] * len(params)) if "index" not in params and "count" not in params else None
            else:
                continue
            if isinstance(key, str):
                built.append((f"{cls.__name__}.{name}", key))
    return built


def test_the_observability_docs_have_a_redis_cli_recipe_for_every_key():
    docs = (DASHBOARD.parents[2] / "docs" / "observability.md").read_text(encoding="utf-8")
    builders = key_builders()
    assert len(builders) >= 20
    missing = []
    for name, key in builders:
        pattern = re.escape(key).replace("\0", r"(?:<[^>]+>|[\w.*-]+)")  # <placeholder> or an example
        if not re.search(r"`[A-Z]+[^`]*" + pattern, docs):
            missing.append((name, key.replace("\0", "<…>")))
    assert not missing, f"keys without a redis-cli recipe in docs/observability.md: {missing}"
