"""Settings: flags > TOKIWA_* env > TOML > defaults, and loud errors naming the field."""

from __future__ import annotations

import pytest

from orchestrator import ConfigError
from orchestrator.config import load_settings


def test_defaults_when_nothing_is_given():
    s = load_settings(env={})
    assert (s.redis_url, s.namespace, s.group, s.ack_policy) == (None, "tokiwa", "workers", "always")
    assert s.renew_interval_s == pytest.approx(s.visibility_timeout_s / 3, abs=0.001)


def test_precedence_is_flags_then_env_then_toml(tmp_path):
    toml = tmp_path / "tokiwa.toml"
    toml.write_text('[tokiwa]\nnamespace = "from-toml"\nconcurrency = 3\ngroup = "g-toml"\n')
    env = {"TOKIWA_CONFIG": str(toml), "TOKIWA_NAMESPACE": "from-env", "TOKIWA_CONCURRENCY": "5"}
    s = load_settings({"namespace": "from-flag", "concurrency": None}, env=env)
    assert (s.namespace, s.concurrency, s.group) == ("from-flag", 5, "g-toml")


@pytest.mark.parametrize(
    "url",
    ["redis://:pw@127.0.0.1:6379/0", "redis://alice:pw@127.0.0.1:6379/2", "rediss://h.example:6380/0",
     "unix:///tmp/redis.sock"],
)
def test_urls_with_auth_acl_and_tls_are_accepted(url):
    assert load_settings({"redis_url": url}, env={}).redis_url == url


@pytest.mark.parametrize(
    ("values", "field"),
    [({"concurrency": 0}, "concurrency"), ({"redis_url": "http://x"}, "redis_url"),
     ({"ack_policy": "sometimes"}, "ack_policy"), ({"namespace": "a b"}, "namespace"),
     ({"bogus": 1}, "bogus")],
)
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ConfigError) as info:
        load_settings(values, env={})
    assert info.value.field == field and field in str(info.value)


def test_bad_env_value_names_the_field():
    with pytest.raises(ConfigError, match="visibility_timeout_ms"):
        load_settings(env={"TOKIWA_VISIBILITY_TIMEOUT_MS": "soon"})


def test_broken_toml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("namespace = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=bad, env={})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(config_file=tmp_path / "nope.toml", env={})


def test_the_apps_own_arguments_are_below_env_and_toml(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text("concurrency = 4\n")
    s = load_settings({}, base={"concurrency": 8, "namespace": "app-ns"},
                      env={"TOKIWA_CONFIG": str(toml), "TOKIWA_NAMESPACE": "env-ns"})
    assert (s.concurrency, s.namespace) == (4, "env-ns")
    assert load_settings({}, base={"concurrency": 8}, env={}).concurrency == 8
