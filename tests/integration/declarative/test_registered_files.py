"""Declarative files registered on an app keep their ``max_parallel``, ``timeout_s`` and
``fail_fast``; secrets are hidden in what people see (logs, run records) and never in the data
steps pass each other, so a one-letter secret breaks nothing; the repository's report.yaml
runs with ``REPORT_TOKEN=x``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from orchestrator.app import Orchestrator
from orchestrator.declarative.files import load_workflow_file, run_workflow_file
from orchestrator.runs.stores import InMemoryRunStore

pytestmark = pytest.mark.timeout(60)

SPANS_PY = '''
import asyncio, time

async def span(ctx, sleep_s: float):
    start = time.monotonic()
    await asyncio.sleep(sleep_s)
    return {"start": start, "end": time.monotonic()}
'''


def write(folder: Path, text: str, name: str = "wf.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spans.py").write_text(SPANS_PY)
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def three_spans(max_parallel: int) -> str:
    steps = "".join(f"""
          - id: s{i}
            type: python
            params: {{callable: "spans.py:span", kwargs: {{sleep_s: 0.2}}}}""" for i in range(3))
    return f"""
        name: spans-{max_parallel}
        max_parallel: {max_parallel}
        steps:{steps}
    """


async def run_registered(redis_url: str, namespace: str, path: Path) -> dict:
    """Register the file on an app with an event trigger, publish one event, drain; the record."""
    app = Orchestrator(redis_url, namespace=namespace, block_ms=50)
    workflow = app.register_workflow(load_workflow_file(path), trigger={"type": "event", "event_type": "go"})
    try:
        await app.publish("go", {})
        await app.drain(timeout=20)
        [record] = await app.run_store.list(workflow=workflow.id)
        record["logs"] = await app.run_store.get_logs(record["run_id"])
    finally:
        await app.close()
    return record


def overlapping(record: dict) -> bool:
    spans = sorted((n["output"]["start"], n["output"]["end"]) for n in record["nodes"].values())
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


async def test_a_registered_file_with_max_parallel_1_runs_its_steps_one_at_a_time(redis_url, namespace, tmp_path):
    record = await run_registered(redis_url, namespace, write(tmp_path / "one", three_spans(1)))
    assert record["status"] == "succeeded"
    assert not overlapping(record), "steps ran at once under max_parallel: 1"


async def test_a_registered_file_with_max_parallel_3_runs_its_steps_together(redis_url, namespace, tmp_path):
    record = await run_registered(redis_url, namespace, write(tmp_path / "three", three_spans(3)))
    assert record["status"] == "succeeded" and overlapping(record)


async def test_a_registered_file_keeps_its_timeout(redis_url, namespace, tmp_path):
    path = write(tmp_path, """
        name: bounded
        timeout_s: 0.5
        steps:
          - id: slow
            type: shell
            params: {argv: [sleep, "10"]}
    """)
    record = await run_registered(redis_url, namespace, path)
    assert record["status"] == "timed_out"
    assert "exceeded its timeout of 0.5s" in record["error"]["message"]


async def test_a_registered_file_keeps_fail_fast_false(redis_url, namespace, tmp_path):
    path = write(tmp_path, """
        name: keep-going
        fail_fast: false
        steps:
          - {id: boom, type: shell, params: {argv: ["false"]}}
          - {id: other, type: python, params: {callable: "spans.py:span", kwargs: {sleep_s: 0.2}}}
    """)
    record = await run_registered(redis_url, namespace, path)
    assert record["status"] == "failed" and record["nodes"]["other"]["status"] == "succeeded"


ONE_LETTER_SECRET = """
    name: one-letter
    secrets: [TOK]
    steps:
      - id: save
        type: file
        params: {op: write, path: example.txt, content: "token {{ secrets.TOK }}"}
      - id: check
        type: test
        depends_on: [save]
        params: {expression: "steps.save.output.path.endswith('/example.txt')"}
      - id: show
        type: shell
        depends_on: [check]
        params: {argv: [cat, "{{ steps.save.output.path }}"]}
"""


def assert_one_letter_secret_hidden_for_people_only(record: dict) -> None:
    assert record["status"] == "succeeded", record["error"]
    assert record["nodes"]["save"]["output"]["path"].endswith("/e***ample.t***t")  # what people see
    assert record["nodes"]["show"]["output"]["stdout"] == "token ***"


async def test_a_one_letter_secret_never_changes_what_steps_pass_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("TOK", "x")
    store = InMemoryRunStore()
    result = await run_workflow_file(write(tmp_path, ONE_LETTER_SECRET), store=store, artifacts_dir=tmp_path / "a")
    assert result.output_of("show")["stdout"] == "token x"  # the data, as the steps saw it
    assert result.output_of("save")["path"] == str(tmp_path / "example.txt")
    assert_one_letter_secret_hidden_for_people_only(await store.get(result.run_id))
    assert all("token x" not in line for line in await store.get_logs(result.run_id))


async def test_a_one_letter_secret_in_a_registered_file_is_hidden_in_the_redis_record_only(
        redis_url, namespace, tmp_path, monkeypatch):
    monkeypatch.setenv("TOK", "x")
    record = await run_registered(redis_url, namespace, write(tmp_path, ONE_LETTER_SECRET))
    assert_one_letter_secret_hidden_for_people_only(record)
    assert "token x" not in json.dumps(record)


async def test_the_example_report_runs_with_a_one_letter_report_token(example_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("REPORT_TOKEN", "x")
    store = InMemoryRunStore()
    result = await run_workflow_file(example_copy, {"who": "Ada"}, artifacts_dir=tmp_path / "a", store=store)
    assert result.status == "succeeded", result.error
    assert result.output_of("count")["stdout"].split()[0] == "3"
    assert result.output_of("summarize") == {"greeting": "hello Ada", "lines": 3, "token_used": "x"}
    record = await store.get(result.run_id)
    assert record["status"] == "succeeded" and record["nodes"]["summarize"]["output"]["token_used"] == "***"
    assert not (tmp_path / "build" / "report" / "words.txt").exists()  # cleanup found the real path
