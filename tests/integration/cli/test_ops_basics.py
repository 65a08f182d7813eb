"""Operations basics: JSON logs, the cron settings, a bounded ``dead requeue --all`` and the
events stream purge (library and CLI)."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import time

import pytest

from orchestrator import Orchestrator
from orchestrator.broker.connection import create_redis
from orchestrator.cli import exitcodes
from orchestrator.cli.producer import JsonFormatter
from orchestrator.config import load_settings
from orchestrator.errors import ConfigError
from orchestrator.keys import Keys
from orchestrator.ops.inspector import Inspector
from tests.integration.procs import ROOT

pytestmark = pytest.mark.timeout(90)

PRODUCER = [sys.executable, "-m", "orchestrator.cli"]


# -- JSON logs --------------------------------------------------------------------------------
def test_the_json_formatter_writes_one_object_per_record_with_exc_info():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tokiwa.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("hello %s\nsecond line", "world")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(first) == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == ("WARNING", "tokiwa.test.json",
                                                                  "hello world\nsecond line")
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["message"] == "failed" and "ValueError: boom" in second["exc_info"]


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_a_producer_logs_json_lines_when_asked(how, subprocess_env, redis_url, namespace, tmp_path):
    argv = PRODUCER + ["run", "--app", "examples.shop:app", "--redis-url", redis_url, "--namespace", namespace]
    env = dict(subprocess_env)
    if how == "flag":
        argv += ["--log-format", "json"]
    elif how == "env":
        env["TOKIWA_LOG_FORMAT"] = "json"
    else:
        (tmp_path / "tokiwa.toml").write_text('log_format = "json"\n')
        argv += ["--config", str(tmp_path / "tokiwa.toml")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "tokiwa.cron" for r in records)


# -- cron settings ----------------------------------------------------------------------------
def test_cron_settings_validate_and_come_from_env():
    s = load_settings(env={"TOKIWA_CRON_TZ": "Asia/Tokyo", "TOKIWA_CRON_LEASE_MS": "3000",
                           "TOKIWA_CRON_MISSED_POLICY": "ALL"})
    assert (s.cron_tz, s.cron_lease_ms, s.cron_missed_policy) == ("Asia/Tokyo", 3000, "all")
    for name, value in (("TOKIWA_CRON_TZ", "Nowhere/City"), ("TOKIWA_CRON_LEASE_MS", "10"),
                        ("TOKIWA_CRON_MISSED_POLICY", "sometimes")):
        with pytest.raises(ConfigError, match=f"from {name}"):
            load_settings(env={name: value})


def test_the_cron_registry_reads_the_settings_after_configure(monkeypatch):
    for name in ("TOKIWA_CRON_TZ", "TOKIWA_CRON_LEASE_MS", "TOKIWA_CRON_MISSED_POLICY"):
        monkeypatch.delenv(name, raising=False)
    app = Orchestrator(mode="producer")
    assert (app.cron.tz, app.cron.lease_ms, app.cron.missed_policy) == (None, 15_000, "latest")
    app.configure(cron_tz="Europe/Paris", cron_lease_ms=4000, cron_missed_policy="none")
    assert (app.cron.tz, app.cron.lease_ms, app.cron.missed_policy) == ("Europe/Paris", 4000, "none")
    # the app's own arguments count where the settings leave a field unset; settings win
    coded = Orchestrator(mode="producer", cron_tz="Asia/Tokyo", cron_lease_ms=5000)
    assert (coded.cron.tz, coded.cron.lease_ms) == ("Asia/Tokyo", 5000)
    coded.configure(cron_lease_ms=6000)
    assert (coded.cron.tz, coded.cron.lease_ms) == ("Asia/Tokyo", 6000)


async def test_the_scheduler_is_built_with_the_settings(redis_url, namespace):
    app = Orchestrator(redis_url=redis_url, namespace=namespace, mode="producer")
    app.configure(cron_tz="Asia/Tokyo", cron_lease_ms=2500, cron_missed_policy="all")
    app.register_cron_job("*/5 * * * *", "tick", lambda *_: None)
    await app.connect()
    try:
        scheduler = app.cron.build()
        assert app.cron.elector is not None and app.cron.elector.ttl_ms == 2500
        assert scheduler.missed_policy.value == "all"
        assert str(scheduler.tz) == "Asia/Tokyo"
    finally:
        await app.close()


def test_cron_list_takes_the_time_zone_flag(subprocess_env, redis_url, namespace):
    def next_fire(*flags: str) -> str:
        result = subprocess.run(PRODUCER + ["cron", "list", "--json", "--app", "examples.shop:app", "--redis-url",
                                            redis_url, "--namespace", namespace, *flags],
                                cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)[0]["next_fire"]

    assert next_fire("--cron-tz", "Asia/Tokyo").endswith("+09:00")
    assert next_fire("--cron-tz", "UTC").endswith("+00:00")


# -- dead requeue --all is bounded ------------------------------------------------------------
class DiesAgain(Inspector):
    """Every requeued event fails at once and comes back as a new dead letter."""

    async def requeue(self, dead_ids):
        out = await super().requeue(dead_ids)
        for row in out:
            await self.redis.xadd(self.keys.dead, {"id": row["dead_id"], "type": "x", "body": b"",
                                                   "reason": "max_deliveries"})
        return out


async def test_requeue_all_requeues_only_the_letters_present_at_the_start(redis_url, namespace):
    keys = Keys(namespace)
    redis = create_redis(redis_url)
    try:
        ids = [(await redis.xadd(keys.dead, {"id": f"e{i}", "type": "x", "body": b"", "reason": "r"})).decode()
               for i in range(250)]
        out = await DiesAgain(redis, keys).requeue_all()
        assert [r["dead_id"] for r in out] == ids and all(r["stream_id"] for r in out)
        assert await redis.xlen(keys.events) == 250
        assert await redis.xlen(keys.dead) == 250  # the new dead letters wait for the next requeue
        assert await Inspector(redis, Keys(f"{namespace}-empty")).requeue_all() == []
    finally:
        await redis.aclose()


# -- purging the events stream ----------------------------------------------------------------
async def _stream_with_two_groups(redis, keys):
    ids = [(await redis.xadd(keys.events, {"id": f"e{i}", "type": "x", "body": b""})).decode() for i in range(10)]
    for group in ("workers", "workers:chat"):
        await redis.xgroup_create(keys.events, group, "0")
    await redis.xreadgroup("workers", "c1", {keys.events: ">"}, count=4)
    await redis.xreadgroup("workers:chat", "c2", {keys.events: ">"}, count=10)
    await redis.xack(keys.events, "workers:chat", *ids[:3])
    order = keys.conversation_order("conv-1", "workers:chat")
    await redis.rpush(order, ids[5], ids[7], "99999999999999-0")
    await redis.zadd(keys.delayed, {"d1": 1})
    return ids, order


async def test_purge_events_empties_the_stream_and_leaves_the_groups_consistent(redis_url, namespace):
    keys = Keys(namespace)
    redis = create_redis(redis_url)
    try:
        ids, order = await _stream_with_two_groups(redis, keys)
        out = await Inspector(redis, keys).purge_events()
        assert out == {"stream": keys.events, "purged": 10, "up_to": ids[-1],
                       "groups": {"workers": 4, "workers:chat": 7}, "order_ids_removed": 2, "delayed_kept": 1}
        assert await redis.xlen(keys.events) == 0
        groups = {g["name"].decode(): g for g in await redis.xinfo_groups(keys.events)}
        assert set(groups) == {"workers", "workers:chat"}
        assert all(g["pending"] == 0 and g["lag"] == 0 for g in groups.values())
        assert all(g["last-delivered-id"].decode() == ids[-1] for g in groups.values())
        assert [i.decode() for i in await redis.lrange(order, 0, -1)] == ["99999999999999-0"]
        # what is published next is read once, by every group, and nothing purged comes back
        new = (await redis.xadd(keys.events, {"id": "after", "type": "x", "body": b""})).decode()
        for group in groups:
            [[_, entries]] = await redis.xreadgroup(group, "c9", {keys.events: ">"}, count=10)
            assert [e[0].decode() for e in entries] == [new]
            _, claimed, deleted = await redis.xautoclaim(keys.events, group, "c9", 0, "0-0", count=100)
            assert [e[0].decode() for e in claimed] == [new] and deleted == []
        assert (await Inspector(redis, keys).purge_events())["purged"] == 1
        assert (await Inspector(redis, keys).purge_events())["up_to"] is None
    finally:
        await redis.aclose()


def _purge(subprocess_env, redis_url, namespace, *flags, input_=""):
    return subprocess.run(PRODUCER + ["inspect", "events", "purge", "--redis-url", redis_url, "--namespace",
                                      namespace, *flags], cwd=ROOT, env=subprocess_env, capture_output=True,
                          text=True, timeout=60, input=input_)


def test_the_purge_command_asks_for_the_namespace(subprocess_env, redis_url, namespace, sync_redis):
    for i in range(3):
        sync_redis.xadd(f"{{{namespace}:0}}:events", {"id": f"e{i}", "type": "x", "body": b""})
    for typed in ("", "wrong\n"):
        refused = _purge(subprocess_env, redis_url, namespace, input_=typed)
        assert refused.returncode == exitcodes.FAILURE
        assert refused.stderr.splitlines()[-1] == (f"error: not confirmed (the namespace is {namespace!r}): nothing "
                                                   "was purged; type it at the prompt, or pass --yes")
        assert f"{{{namespace}:0}}:events: 3 entries, 0 group(s) with 0 pending" in refused.stderr
        assert sync_redis.xlen(f"{{{namespace}:0}}:events") == 3
    done = _purge(subprocess_env, redis_url, namespace, input_=f"{namespace}\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"purged 3 entries of {{{namespace}:0}}:events up to ")
    assert sync_redis.xlen(f"{{{namespace}:0}}:events") == 0
    sync_redis.xadd(f"{{{namespace}:0}}:events", {"id": "e9", "type": "x", "body": b""})
    scripted = _purge(subprocess_env, redis_url, namespace, "--yes", "--json")
    assert scripted.returncode == 0 and scripted.stderr == ""
    assert json.loads(scripted.stdout)["purged"] == 1
