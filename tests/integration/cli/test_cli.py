"""Both CLIs, with click's CliRunner and as real processes."""

from __future__ import annotations

import json
import subprocess
import sys

import msgpack
from click.testing import CliRunner

from orchestrator.cli.producer import cli as producer_cli
from orchestrator.events import decode_fields
from tests.integration.procs import ROOT, start_worker, stop, wait_until, worker_env
from workers.cli import cli as worker_cli


def test_publish_one_event_with_payload_and_metadata(redis_url, namespace, sync_redis):
    result = CliRunner().invoke(producer_cli, [
        "publish", "order.created", "--payload", '{"ref": "A-1"}', "--metadata", '{"tags": ["cli"]}',
        "--redis-url", redis_url, "--namespace", namespace])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    [(entry_id, fields)] = sync_redis.xrange(f"{{{namespace}:0}}:events")
    event = decode_fields(fields)
    assert (event.type, event.payload, event.tags, event.id) == ("order.created", {"ref": "A-1"}, ["cli"], printed["id"])


def test_publish_file_in_bulk(redis_url, namespace, sync_redis, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps({"type": "bulk", "payload": i}) for i in range(1200)) + "\n")
    result = CliRunner().invoke(producer_cli, ["publish", "--file", str(path), "--batch", "500",
                                               "--redis-url", redis_url, "--namespace", namespace])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {"published": 1200}
    assert sync_redis.xlen(f"{{{namespace}:0}}:events") == 1200


def test_publish_file_with_a_bad_line_names_the_line(redis_url, namespace, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"type": "ok"}\n{"payload": 1}\n')
    result = CliRunner().invoke(producer_cli, ["publish", "--file", str(path), "--redis-url", redis_url,
                                               "--namespace", namespace])
    assert result.exit_code == 1
    assert "events.jsonl:2" in result.output


def test_invalid_payload_json_is_a_usage_error(redis_url):
    result = CliRunner().invoke(producer_cli, ["publish", "x", "--payload", "{nope", "--redis-url", redis_url])
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_bad_app_path_and_bad_settings_exit_2(redis_url, tmp_path):
    bad_app = CliRunner().invoke(worker_cli, ["run", "--app", "no.such.module:app", "--redis-url", redis_url])
    assert bad_app.exit_code == 2 and "cannot import" in bad_app.output
    config = tmp_path / "tokiwa.toml"
    config.write_text("concurrency = -1\n")
    bad_config = CliRunner().invoke(worker_cli, ["run", "--app", "examples.shop:app", "--config", str(config)])
    assert bad_config.exit_code == 2 and "concurrency" in bad_config.output


def test_run_file_runs_a_declarative_workflow_and_traces_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli.producer", "run-file", "--plain", "examples/workflows/report.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**_env(), "REPORT_TOKEN": "t0k"})
    assert result.returncode == 0, result.stderr
    assert "daily-report: succeeded" in result.stdout
    assert "INFO tokiwa start flow=daily-report" in result.stderr


def test_cron_list_shows_jobs_with_next_fire_time(redis_url, namespace):
    result = CliRunner().invoke(producer_cli, ["cron", "list", "--json", "--app", "examples.shop:app",
                                               "--redis-url", redis_url, "--namespace", namespace])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert (row["name"], row["expr"], row["kind"]) == ("heartbeat", "*/2 * * * * *", "event")
    assert row["next_fire"] and row["last_fired"] is None


def test_trigger_waits_for_the_result_from_a_real_worker(redis_url, namespace, subprocess_env, tmp_path,
                                                         sync_redis):
    env = worker_env(subprocess_env, redis_url, namespace)
    worker = start_worker(env, tmp_path / "w.log", app="tests.integration.apps.flows:app")
    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:workers") == 1, 30, message="worker up")
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli.producer", "trigger", "add", "--input", '{"a": 20, "b": 22}',
             "--wait", "--timeout", "30", "--app", "tests.integration.apps.flows:app"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    finally:
        stop(worker)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "succeeded"
    run = sync_redis.hgetall(f"{{{namespace}:runs}}:{record['run_id']}")
    assert run[b"status"] == b"succeeded"
    assert msgpack.unpackb(run[b"record"])["run_id"] == record["run_id"]


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env
