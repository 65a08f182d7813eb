"""Relay configuration: Miclow's TOML ``[[tasks]]`` file, validated with pydantic.

A Miclow config works unchanged::

    include_paths = ["more.toml"]          # resolved relative to this file
    publish_events = ["orders.*"]          # tokiwa: topics (fnmatch patterns) turned into events
    lossless_topics = ["orders.*"]         # tokiwa: topics relayed through a Redis stream, no drops

    [[tasks]]
    task_name = "worker"
    command = "python3"
    args = ["worker.py"]
    working_directory = "./"               # relative to this file (Miclow: its own cwd)
    environment_vars = { PYTHONUNBUFFERED = "1" }   # alias: environment
    subscribe_topics = ["task_queue"]      # alias: topics
    # tokiwa additions (all optional):
    restart = "on-failure"                 # never | on-failure | always
    restart_backoff_s = 1.0                # at least 0.5; doubles per quick exit, up to restart_backoff_max_s
    stdin_framing = "line"                 # line (topic:message) | counted (upstream framing)
    queue_max = 1000                       # messages waiting for this child's stdin
    outbox_max = 100000                    # messages of this child waiting to be sent to Redis

``protocol = "miclow"`` (or ``"MiclowStdIO"``) at the top of a file, or in one of its entries,
puts the file in Miclow mode: Miclow's framing, output rules and replies for its tasks, and
Miclow's lenient reading of the file (see :mod:`workers.relay.miclow`).

Errors are :class:`~orchestrator.errors.ConfigError` naming the file, the task and the field.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import ConfigError
from workers.relay.miclow import GROUPS, PROTOCOLS, adapt_file, file_protocol

log = logging.getLogger("tokiwa.relay")

_ALIASES = {"environment_vars": "environment", "subscribe_topics": "topics"}

#: the shortest wait before a task is restarted, whatever ``restart_backoff_s`` says: a child
#: that fails at once is restarted at most twice a second, then ever more slowly.
RESTART_MIN_DELAY_S = 0.5
#: a child that ran at least this long before exiting resets its restart backoff.
STABLE_AFTER_S = 10.0
#: messages of one task that may wait to be sent to Redis (``outbox_max``).
OUTBOX_MAX_DEFAULT = 100_000


def _check_topic(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be non-empty and contain no whitespace, got {value!r}")
    return value


def _protocol(value: Any) -> Any:
    """``tokiwa`` / ``miclow`` from any accepted spelling (``MiclowStdIO`` ...)."""
    if isinstance(value, str) and value.lower() in PROTOCOLS:
        return PROTOCOLS[value.lower()]
    raise ValueError(f"unknown protocol {value!r}; use 'tokiwa' (the default) or 'miclow' (also 'MiclowStdIO')")


Protocol = Literal["tokiwa", "miclow"]


class TaskConfig(BaseModel):
    """One ``[[tasks]]`` (or ``[[functions]]``) entry: a child process and its topics."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    task_name: str
    command: str
    # Miclow requires ``args``; we default it to [] (a missing list is not ambiguous).
    args: list[str] = Field(default_factory=list)
    working_directory: Path | None = None
    environment_vars: dict[str, str] = Field(
        default_factory=dict, validation_alias=AliasChoices("environment_vars", "environment")
    )
    subscribe_topics: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("subscribe_topics", "topics")
    )
    stdout_topic: str = ""
    stderr_topic: str = ""
    view_stdout: bool = False
    view_stderr: bool = False
    restart: Literal["never", "on-failure", "always"] = "never"
    restart_backoff_s: float = Field(default=1.0, ge=0)
    restart_backoff_max_s: float = Field(default=30.0, ge=0)
    # counted (Miclow's framing) when the task's protocol is miclow and it sets none
    stdin_framing: Literal["line", "counted"] = "line"
    queue_max: int = Field(default=1000, ge=1, le=10_000_000)
    outbox_max: int = Field(default=OUTBOX_MAX_DEFAULT, ge=1, le=10_000_000)
    # tokiwa: README form + quoted forms, error replies; miclow: Miclow's rules (workers.relay.miclow)
    protocol: Protocol = "tokiwa"

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, alias in _ALIASES.items():
                if name in data and alias in data:
                    raise ValueError(f"give either {name!r} or its alias {alias!r}, not both")
            if "protocol" in data:
                data = dict(data, protocol=_protocol(data["protocol"]))
                if data["protocol"] == "miclow" and "stdin_framing" not in data:
                    data["stdin_framing"] = "counted"
        return data

    @field_validator("task_name", "command")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be non-empty")
        return value

    @field_validator("environment_vars", mode="before")
    @classmethod
    def _env_to_str(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: str(v).lower() if isinstance(v, bool) else (str(v) if isinstance(v, int | float) else v)
                    for k, v in value.items()}
        return value

    @field_validator("subscribe_topics")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        for topic in value:
            _check_topic(topic, "every topic")
        return list(dict.fromkeys(value))  # subscribing is idempotent (upstream subscribes twice)

    @field_validator("stdout_topic", "stderr_topic")
    @classmethod
    def _output_topic(cls, value: str) -> str:
        return _check_topic(value, "the topic") if value else value

    @field_validator("working_directory")
    @classmethod
    def _dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and str(value) != "" and not value.is_dir():
            raise ValueError(f"directory does not exist: {value}")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> TaskConfig:
        # frozen model: fill the derived defaults once, at validation time
        if not self.stdout_topic:
            object.__setattr__(self, "stdout_topic", f"{self.task_name}.stdout")
        if not self.stderr_topic:
            object.__setattr__(self, "stderr_topic", f"{self.task_name}.stderr")
        return self

    @model_validator(mode="after")
    def _restart_delays(self) -> TaskConfig:
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError(f"restart_backoff_max_s ({self.restart_backoff_max_s:g}) must not be below "
                             f"restart_backoff_s ({self.restart_backoff_s:g})")
        if self.restart != "never" and self.restart_backoff_s < RESTART_MIN_DELAY_S:
            log.warning("relay config: task %r: restart_backoff_s = %g is below the minimum; its restarts wait "
                        "%g s, doubled after each exit within %g s of its start, up to %g s",
                        self.task_name, self.restart_backoff_s, RESTART_MIN_DELAY_S, STABLE_AFTER_S,
                        max(RESTART_MIN_DELAY_S, self.restart_backoff_max_s))
        return self

    def restart_delay(self, quick_exits: int) -> float:
        """Seconds before the next start after ``quick_exits`` consecutive exits within
        ``STABLE_AFTER_S`` of starting: ``max(restart_backoff_s, RESTART_MIN_DELAY_S)``
        doubled per quick exit after the first, capped at ``restart_backoff_max_s`` (never
        below the base)."""
        base = max(self.restart_backoff_s, RESTART_MIN_DELAY_S)
        cap = max(self.restart_backoff_max_s, base)
        delay: float = base * 2 ** min(max(0, quick_exits - 1), 30)
        return min(cap, delay)


class RelayConfig(BaseModel):
    """A whole relay file: tasks started at boot, functions started on demand, options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[TaskConfig] = Field(min_length=1)
    functions: list[TaskConfig] = Field(default_factory=list)
    include_paths: list[str] = Field(default_factory=list)
    publish_events: list[str] = Field(default_factory=list)
    # SIGTERM -> SIGKILL delay at shutdown (upstream: 3 s).
    shutdown_grace_s: float = Field(default=3.0, ge=0)
    # how often the relay writes its heartbeat (tasks, topics) to ``{ns}:relays``.
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    # topics (shell globs) relayed through a Redis stream per topic instead of pub/sub alone:
    # every message reaches every subscriber, in order; a full queue makes the writer wait.
    # Every relay of the namespace must list the same patterns.
    lossless_topics: list[str] = Field(default_factory=list)
    # entries (frames of up to 64 KiB) each lossless topic's stream keeps (approximate MAXLEN).
    lossless_maxlen: int = Field(default=10_000, ge=100, le=10_000_000)
    # the root file's mode; each task has its own (``TaskConfig.protocol``), inherited from its file.
    protocol: Protocol = "tokiwa"
    # where the file was loaded from (None when built in code).
    source: str | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_name(cls, value: Any) -> Any:
        return _protocol(value)

    @field_validator("publish_events")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.strip():
                raise ValueError("patterns must be non-empty")
        return value

    @field_validator("lossless_topics")
    @classmethod
    def _lossless_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _check_topic(pattern, "every pattern")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _unique_names(self) -> RelayConfig:
        for group in (self.tasks, self.functions):
            seen: set[str] = set()
            for task in group:
                if task.task_name in seen:
                    raise ValueError(f"duplicate task_name {task.task_name!r}")
                seen.add(task.task_name)
        return self

    def publish_events_regex(self) -> re.Pattern[str] | None:
        """One compiled regex for all ``publish_events`` patterns (None when there are none)."""
        if not self.publish_events:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.publish_events))

    def lossless_regex(self) -> re.Pattern[str] | None:
        """One compiled regex for all ``lossless_topics`` patterns (None when there are none)."""
        if not self.lossless_topics:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.lossless_topics))

    def function(self, name: str) -> TaskConfig | None:
        """The ``[[functions]]`` entry called ``name`` (case-insensitive), if any."""
        wanted = name.lower()
        return next((f for f in self.functions if f.task_name.lower() == wanted), None)


def _describe_error(exc: ValidationError, data: dict[str, Any], source: str | None) -> ConfigError:
    first = exc.errors()[0]
    loc = list(first.get("loc", ()))
    where = f"relay config {source}" if source else "relay config"
    parts, field = [], ".".join(str(p) for p in loc) or None
    if len(loc) >= 2 and loc[0] in ("tasks", "functions") and isinstance(loc[1], int):
        entries = data.get(loc[0]) or []
        entry = entries[loc[1]] if loc[1] < len(entries) and isinstance(entries[loc[1]], dict) else {}
        name = entry.get("task_name", "?")
        origin = entry.get("__file__")
        parts.append(f"task {name!r} ({loc[0]}[{loc[1]}]{' in ' + origin if origin else ''})")
        field = ".".join(str(p) for p in loc[2:]) or None
    if field:
        parts.append(f"field {field!r}")
    msg = first.get("msg", "invalid")
    return ConfigError(f"{where}: {', '.join(parts)}: {msg}" if parts else f"{where}: {msg}", field=field)


def _read_mode(data: dict[str, Any], inherited: str, where: str, config_dir: Path | None) -> dict[str, Any]:
    """``data`` with its mode applied: read the Miclow way when it is in Miclow mode, and
    every entry's ``protocol`` defaulted to the file's."""
    mode = file_protocol(data, inherited, where)
    if mode == "miclow":
        known_task = set(TaskConfig.model_fields) | set(_ALIASES.values())
        known_top = set(RelayConfig.model_fields) - {"source"}
        data = adapt_file(data, known_top=known_top, known_task=known_task, config_dir=config_dir, where=where)
    data = dict(data, protocol=mode)
    for group in GROUPS:
        if isinstance(data.get(group), list):
            data[group] = [dict(e, protocol=e.get("protocol", mode)) if isinstance(e, dict) else e
                           for e in data[group]]
    return data


def parse_relay_config(data: dict[str, Any], *, source: str | None = None) -> RelayConfig:
    """Validate an already-loaded mapping (``include_paths`` are *not* followed here). A
    mapping in Miclow mode is read the Miclow way first (``${VAR}`` expanded without a
    ``MICLOW_CONFIG_DIR``)."""
    return _validate(_read_mode(data, "tokiwa", f"relay config {source}" if source else "relay config", None), source)


def _validate(data: dict[str, Any], source: str | None) -> RelayConfig:
    clean = {k: v for k, v in data.items()}
    for group in ("tasks", "functions"):
        if isinstance(clean.get(group), list):
            clean[group] = [
                {k: v for k, v in t.items() if k != "__file__"} if isinstance(t, dict) else t
                for t in clean[group]
            ]
    if "tasks" not in clean or clean.get("tasks") == []:
        raise ConfigError(f"relay config {source or ''}: no autostart tasks configured ([[tasks]])".replace("  ", " "),
                          field="tasks")
    try:
        return RelayConfig(**clean, source=source)
    except ValidationError as exc:
        raise _describe_error(exc, data, source) from exc


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"relay config file not found: {path}", field="include_paths") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"relay config {path} is not valid TOML: {exc}") from exc


def _resolve_dirs(entries: Any, base: Path, origin: Path) -> Any:  # a list of dirs resolved, else as it was
    if not isinstance(entries, list):
        return entries
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            entry = dict(entry)
            wd = entry.get("working_directory")
            if isinstance(wd, str):
                entry["working_directory"] = str((base / wd).resolve()) if wd else str(base)
            elif wd is None:
                entry["working_directory"] = str(base)
            entry["__file__"] = str(origin)
        out.append(entry)
    return out


def _load_tree(path: Path, seen: set[Path], inherited: str = "tokiwa") -> dict[str, Any]:
    base = path.parent
    data = _read_mode(_read_toml(path), inherited, f"relay config {path}", base)
    mode = data["protocol"]
    for group in ("tasks", "functions"):
        if group in data:
            data[group] = _resolve_dirs(data[group], base, path)
    includes = data.get("include_paths", [])
    if not isinstance(includes, list):
        return data  # pydantic reports the type error
    for inc in includes:
        target = (base / str(inc)).resolve()
        if target in seen:
            log.warning("relay config %s: circular include of %s skipped", path, target)
            continue
        seen.add(target)
        child = _load_tree(target, seen, mode)
        for group in ("tasks", "functions"):
            extra = child.get(group, [])
            if isinstance(extra, list) and isinstance(data.setdefault(group, []), list):
                data[group] = list(data[group]) + extra
    return data


def load_relay_config(path: str | os.PathLike[str]) -> RelayConfig:
    """Load a relay TOML file and its ``include_paths`` (recursively, each relative to the
    file that names it; a repeated file is skipped with a warning, a missing one is an error).

    ``working_directory`` (relative, empty or absent) is resolved against the directory of
    the file that defines the task, so a config works from any current directory.
    """
    root = Path(path).resolve()
    data = _load_tree(root, {root})
    return _validate(data, source=str(path))
