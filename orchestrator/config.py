"""Settings: one pydantic model, loaded from CLI flags > ``TOKIWA_*`` env > TOML file > defaults.

Every field has its unit in its name. A bad value fails loudly when settings are built,
naming the field (``ConfigError.field``).
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import ConfigError
from orchestrator.urls import parse_redis_url

ENV_PREFIX = "TOKIWA_"


def default_state_dir() -> Path:
    """A per-user folder under the temp dir (``$TMPDIR/tokiwa-$USER``)."""
    user = os.environ.get("USER") or os.environ.get("USERNAME") or str(os.getuid())
    return Path(tempfile.gettempdir()) / f"tokiwa-{user}"


def parse_signing_keys(spec: str | None) -> dict[str, bytes]:
    """``"kid=secret,kid2=secret2"`` -> {kid: secret bytes}; ValueError naming the bad part."""
    keys: dict[str, bytes] = {}
    for n, part in enumerate((spec or "").split(","), 1):
        part = part.strip()
        if not part:
            continue
        kid, sep, secret = part.partition("=")
        kid, secret = kid.strip(), secret.strip()
        if not sep or not kid or not secret:  # never echo the text: it may be a secret
            raise ValueError(f"key {n} must be written kid=secret")
        if len(secret) < 16:
            raise ValueError(f"the secret of {kid!r} is shorter than 16 characters")
        keys[kid] = secret.encode()
    return keys


class Settings(BaseModel):
    """Everything a producer or worker needs to know, with its default.

    ``redis_url`` None means "start an embedded redis-server" (see :mod:`orchestrator.broker.embedded`).
    URLs with a password (``redis://:pw@host``), an ACL user (``redis://user:pw@host``),
    TLS (``rediss://``) and a db number are passed to redis-py as they are; Sentinel
    (``redis+sentinel://``) and Cluster (``redis+cluster://``) URLs are described in
    :mod:`orchestrator.urls`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, hide_input_in_errors=True)

    redis_url: str | None = None
    namespace: str = "tokiwa"
    group: str = "workers"
    # partitions of the event streams, each with its own stream, dead letters, delayed events
    # and conversation order in its own hash slot (docs/scaling.md). Every producer and worker
    # of a namespace must use the same number: changing it is a migration (docs/scaling.md).
    partitions: int = Field(default=1, ge=1, le=1024)
    # events a worker processes at once (its free slots bound how much it fetches).
    concurrency: int = Field(default=16, ge=1, le=10_000)
    # an entry idle longer than this (no renewal by its owner) is reclaimed by another worker.
    visibility_timeout_ms: int = Field(default=10_000, ge=200)
    # a live worker renews its in-flight entries this often; default visibility / 3.
    renew_interval_ms: int | None = Field(default=None, ge=50)
    # deliveries after which an entry goes to the dead-letter stream.
    max_deliveries: int = Field(default=5, ge=1)
    # a consumer with nothing pending that has not read for this long is an exited worker's and
    # is removed from its group (None: a minute, or three visibility timeouts if longer).
    dead_consumer_idle_ms: int | None = Field(default=None, ge=1_000)
    # signed envelopes: "kid=secret,kid2=secret2" (secrets of 16+ characters). Set, producers
    # sign every entry with signing_key_id (default the first key) and workers dead-letter an
    # entry whose signature is missing or wrong (orchestrator.broker.signing).
    signing_keys: str | None = Field(default=None, repr=False)
    signing_key_id: str | None = None
    # a failed event (ack_policy on_success) is redelivered after this delay, doubled on each
    # further delivery up to redelivery_backoff_max_ms (and at most the visibility timeout),
    # with jitter (half fixed, half random).
    redelivery_backoff_ms: int = Field(default=1_000, ge=0)
    redelivery_backoff_max_ms: int = Field(default=10_000, ge=0)
    # how often a worker looks for entries to reclaim (idle past the visibility timeout, or
    # failed and due for redelivery); a full batch is followed by another at once.
    reclaim_interval_ms: int = Field(default=500, ge=10)
    # entries kept in the events stream once every group has acked them (approximate; 0 =
    # none). Entries some group still needs are never trimmed, whatever this says.
    stream_maxlen: int = Field(default=0, ge=0)
    dead_maxlen: int = Field(default=100_000, ge=100)
    # longest XREADGROUP BLOCK; shorter = faster shutdown, longer = fewer idle round trips.
    block_ms: int = Field(default=2_000, ge=10, le=60_000)
    # ms a Redis connect or reply may take before the link counts as dead (the client drops
    # the connection and reconnects); blocking reads wait less than this (connection.py).
    redis_timeout_ms: int = Field(default=3_000, ge=100, le=600_000)
    # ms a publish's marker ``{ns}:published:{event_id}`` lives: publishing the same event id
    # again within it (a retry after a timeout) returns the first stream id instead of adding
    # a second entry. redis-py's own resends all fall within ~15 s; a marker costs ~240 bytes.
    # 0 = plain XADD, and a retried publish may then add the event twice.
    publish_dedup_ms: int = Field(default=20_000, ge=0)
    # durable publish: > 0 makes every publish wait (Redis WAIT) until this many replicas have
    # its entry, up to publish_wait_timeout_ms, and raise ReplicationError when fewer did, so
    # an acknowledged publish survives a failover (docs/scaling.md, "Sentinel"). 0: the
    # publish returns once the master has it; a failover right after may lose it.
    publish_wait_replicas: int = Field(default=0, ge=0, le=100)
    publish_wait_timeout_ms: int = Field(default=1_000, ge=1, le=600_000)
    # seconds a publish with an idempotency_key stays unique: the same key published again
    # within this window adds nothing (one marker of ~240 bytes per key while it lasts).
    idempotency_window_s: float = Field(default=86_400.0, gt=0)
    # memory bounds (README, "Redis keys"). A conversation's memory (snapshot, deltas, applied
    # ids, lock epoch) expires this long after its last write: a chat idle for 30 days starts
    # again from empty memory. Keep it far longer than the longest chatflow run. 0 = never.
    conversation_ttl_s: float = Field(default=30 * 86_400.0, ge=0)
    # run records (hash, logs, node checkpoints) expire this long after their last write, and
    # the run index keeps at most run_records_max runs (the oldest starts go first, about 1%
    # past the cap at a time, never a running one); 0 = no count bound.
    run_retention_s: float = Field(default=7 * 86_400.0, gt=0)
    run_records_max: int = Field(default=100_000, ge=0)
    # an encoded envelope larger than this is refused by the producer and dead-lettered by workers.
    max_event_bytes: int = Field(default=1_048_576, ge=1024)
    ack_policy: Literal["always", "on_success"] = "always"
    # seconds that SIGTERM / stop() waits for in-flight work before handing it back.
    grace_period_s: float = Field(default=30.0, ge=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    state_dir: Path = Field(default_factory=default_state_dir)
    log_level: str = "INFO"
    # log lines on stderr: "text" (one line per record) or "json" (one object per line with
    # time, level, logger, message and exc_info)
    log_format: Literal["text", "json"] = "text"
    # cron (producer / all mode): the time zone of cron expressions (a zone name, e.g.
    # Asia/Tokyo; None = the host's: $TZ, else /etc/localtime, else UTC), the leader lease (a
    # standby producer takes over within it) and what a new leader does with slots missed
    # while none ran: fire the latest once, all of them (within an hour), or none.
    cron_tz: str | None = None
    cron_lease_ms: int = Field(default=15_000, ge=100, le=600_000)
    cron_missed_policy: Literal["latest", "all", "none"] = "latest"
    # observability (docs/observability.md): off unless a port is set
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    api_port: int | None = Field(default=None, ge=0, le=65535)
    api_host: str = "127.0.0.1"
    # bearer token the HTTP API (and /metrics) requires when set
    api_token: str | None = None

    @field_validator("namespace", "group")
    @classmethod
    def _no_blank(cls, value: str) -> str:
        if not value or not value.strip() or any(c.isspace() for c in value):
            raise ValueError("must be non-empty and contain no whitespace")
        return value

    @field_validator("signing_keys")
    @classmethod
    def _signing_keys(cls, value: str | None) -> str | None:
        parse_signing_keys(value)  # raises ValueError naming the bad part
        return value or None

    @model_validator(mode="after")
    def _signing_key_known(self) -> Settings:
        if self.signing_key_id is not None and self.signing_key_id not in parse_signing_keys(self.signing_keys):
            raise ValueError(f"signing_key_id {self.signing_key_id!r} is not one of signing_keys")
        return self

    @field_validator("redis_url")
    @classmethod
    def _url_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parse_redis_url(value)  # InvalidArgumentError (a ValueError) naming the bad part
        return value

    @field_validator("log_format", "cron_missed_policy", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cron_tz")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as UTC or Asia/Tokyo)") from exc
        return value.strip()

    @property
    def renew_interval_s(self) -> float:
        ms = self.renew_interval_ms or max(50, self.visibility_timeout_ms // 3)
        return ms / 1000.0

    @property
    def reclaim_interval_s(self) -> float:
        return self.reclaim_interval_ms / 1000.0

    @property
    def visibility_timeout_s(self) -> float:
        return self.visibility_timeout_ms / 1000.0


_FIELDS = tuple(Settings.model_fields)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    return values


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}", field="config") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}", field="config") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}", field="config") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", field="config") from exc
    # accept either a flat file or a [tokiwa] table
    section = data.get("tokiwa", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [tokiwa] must be a table", field="config")
    return {k: v for k, v in section.items() if not isinstance(v, dict) or k == "tokiwa"}


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` with precedence overrides (CLI flags) > env > TOML > ``base``
    (the app's own constructor arguments) > defaults.

    ``config_file`` defaults to ``$TOKIWA_CONFIG`` when set. ``None`` values in
    ``overrides`` and ``base`` mean "not given" and do not override anything.
    """
    env = os.environ if env is None else env
    merged: dict[str, Any] = {k: v for k, v in (base or {}).items() if v is not None}
    origins = dict.fromkeys(merged, "the app's own arguments")
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        from_file = _from_toml(Path(path))
        merged.update(from_file)
        origins.update(dict.fromkeys(from_file, f"config file {path}"))
    from_env = _from_env(env)
    merged.update(from_env)
    origins.update({k: ENV_PREFIX + k.upper() for k in from_env})
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged.update(flags)
    origins.update({k: f"--{k.replace('_', '-')}" for k in flags})
    return build_settings(merged, source=str(path) if path else None, origins=origins)


def build_settings(values: Mapping[str, Any], *, source: str | None = None,
                   origins: Mapping[str, str] | None = None) -> Settings:
    """Validate ``values`` into Settings, turning pydantic's error into a ConfigError naming the
    field, and where its value came from when ``origins`` (field -> "TOKIWA_X", "config file
    PATH", "--x" ...) says."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or None
        where = f" in {source}" if source and not origins else ""

        def one(error: Any) -> str:
            name = ".".join(str(p) for p in error.get("loc", ()))
            origin = (origins or {}).get(name.split(".")[0])
            shown = f"{name} (from {origin})" if origin else name  # values stay hidden: they may be secrets
            return f"{shown}: {error.get('msg')}"

        lines = "; ".join(one(e) for e in exc.errors())
        raise ConfigError(f"invalid tokiwa settings{where}: {lines}", field=field) from exc
