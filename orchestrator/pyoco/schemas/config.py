"""pyoco's ``flow.yaml``: flows (``graph`` DSL text and ``defaults``), tasks (``callable``,
``inputs``, ``outputs``; also ``retries``, ``timeout_sec``, ``fail_policy``, which pyoco
0.5.1 refused), ``discovery`` and ``runtime``. An unknown key is a ConfigError naming it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError


@dataclass
class TaskConfig:
    callable: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    retries: int | None = None
    timeout_sec: float | None = None
    fail_policy: str | None = None


@dataclass
class FlowConfig:
    graph: str
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiscoveryConfig:
    entry_points: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    glob_modules: list[str] = field(default_factory=list)


@dataclass
class RuntimeConfig:
    expose_env: list[str] = field(default_factory=list)


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}", field=where)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})",
                          field=f"{where}.{unknown[0]}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}", field=where) from None


@dataclass
class PyocoConfig:
    version: int
    flows: dict[str, FlowConfig]
    tasks: dict[str, TaskConfig]
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    runtime: RuntimeConfig | None = field(default_factory=RuntimeConfig)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> PyocoConfig:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a mapping at the top, got {type(data).__name__}")
        unknown = sorted(set(data) - {"version", "flows", "tasks", "discovery", "runtime"})
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}", field=unknown[0])
        return cls(
            version=data.get("version", 1),
            flows={k: _build(FlowConfig, v, f"flows.{k}") for k, v in (data.get("flows") or {}).items()},
            tasks={k: _build(TaskConfig, v, f"tasks.{k}") for k, v in (data.get("tasks") or {}).items()},
            discovery=_build(DiscoveryConfig, data.get("discovery"), "discovery"),
            runtime=_build(RuntimeConfig, data.get("runtime"), "runtime"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> PyocoConfig:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        return cls.from_dict(data, str(path))
