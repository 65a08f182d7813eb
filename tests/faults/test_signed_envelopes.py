"""Signed envelopes on real worker processes: with signing keys set, forged, unsigned,
wrong-key and tampered entries are dead-lettered with their reason, signed ones run, and keys
rotate without a stop."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from orchestrator import Orchestrator
from orchestrator.broker import signing
from orchestrator.config import Settings
from orchestrator.errors import ConfigError
from orchestrator.events import Event, encode_fields
from tests.integration.procs import stop

from .apps import successes
from .common import FAULT_GROUP, dead_entries, ensure_group, pending, start_fault_worker, wait_for

OLD = "k1=0123456789abcdef-old"
NEW = "k2=fedcba9876543210-new"


def test_sign_and_check_round_trip_and_rotation():
    producer = Settings(signing_keys=f"{OLD},{NEW}", signing_key_id="k2")
    fields = signing.sign(encode_fields(Event("job", {"i": 1})), producer)
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    assert raw[b"kid"] == b"k2" and signing.check(raw, producer) is None
    assert signing.check(raw, Settings(signing_keys=NEW)) is None
    assert signing.check(raw, Settings(signing_keys=OLD))[0] == "unknown_key"
    assert signing.check({**raw, b"body": raw[b"body"] + b"x"}, producer)[0] == "bad_signature"
    assert signing.check({k: v for k, v in raw.items() if k not in (b"kid", b"sig")}, producer)[0] == "unsigned"
    assert signing.check(raw, Settings()) is None  # no keys: nothing is checked


@pytest.mark.parametrize("spec", ["k1", "k1=tiny", "=0123456789abcdef0"])
def test_bad_signing_keys_are_refused_with_the_setting_named_and_no_secret_shown(spec, monkeypatch):
    from orchestrator.config import load_settings
    monkeypatch.setenv("TOKIWA_SIGNING_KEYS", spec)
    with pytest.raises(ConfigError, match="signing_keys") as caught:
        load_settings()
    assert "tiny" not in str(caught.value) and "0123456789abcdef0" not in str(caught.value), "a secret was shown"


def test_forged_unsigned_and_wrong_key_entries_are_dead_lettered_while_signed_ones_run(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    out = tmp_path / "calls.txt"
    ensure_group(sync_redis, namespace)
    stream = f"{{{namespace}:0}}:events"
    # forged with redis-cli-like XADDs: no signature, a key the workers do not know, a tampered body
    sync_redis.xadd(stream, encode_fields(Event("job", {"i": 900})))
    wrong = signing.sign(encode_fields(Event("job", {"i": 901})), Settings(signing_keys="evil=0123456789abcdefXYZ"))
    sync_redis.xadd(stream, wrong)
    tampered = signing.sign(encode_fields(Event("job", {"i": 902})), Settings(signing_keys=OLD))
    body = msgpack.unpackb(tampered["body"], raw=False)
    body["payload"] = {"i": 903}
    sync_redis.xadd(stream, {**tampered, "body": msgpack.packb(body)})

    async def publish(keys: str, key_id: str | None, start: int) -> None:
        app = Orchestrator(redis_url, namespace=namespace, mode="producer", signing_keys=keys,
                           signing_key_id=key_id)
        try:
            for i in range(start, start + 20):
                await app.publish("job", {"i": i})
        finally:
            await app.close()

    asyncio.run(publish(OLD, None, 0))  # signed with the old key
    worker = start_fault_worker(subprocess_env, redis_url, namespace, tmp_path / "w.log", out,
                                signing_keys=f"{OLD},{NEW}")
    try:
        asyncio.run(publish(f"{OLD},{NEW}", "k2", 20))  # producers switched to the new key
        wait_for(lambda: len(successes(out)) == 40 and len(dead_entries(sync_redis, namespace)) == 3, 30,
                 "40 signed events run, 3 forged ones dead-lettered")
        wait_for(lambda: pending(sync_redis, namespace) == 0, 10, "nothing pending")
    finally:
        code = stop(worker)
    ran = successes(out)
    assert sorted(ran) == list(range(40)) and set(ran.values()) == {1}
    reasons = sorted(d[b"reason"].decode() for d in dead_entries(sync_redis, namespace))
    assert reasons == ["bad_signature", "unknown_key", "unsigned"]
    assert all(d[b"group"].decode() == FAULT_GROUP for d in dead_entries(sync_redis, namespace))
    assert code == 0
