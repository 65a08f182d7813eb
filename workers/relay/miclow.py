"""Miclow mode of a relay file: Miclow's config dialect, read the way Miclow reads it.

A file is in Miclow mode when it says ``protocol = "miclow"`` (or Miclow's own
``"MiclowStdIO"``, any case) at the top, or when one of its ``[[tasks]]`` / ``[[functions]]``
entries says so (Miclow's later format names the protocol per task). Its tasks then get
Miclow's stdin framing (counted records), Miclow's output rules (quoted forms only) and
Miclow's replies (see :mod:`workers.relay.commands`), and the file itself is read leniently,
as Miclow reads it (:func:`adapt_file`):

* unknown keys are dropped with **one warning per key** (naming the tasks that have it),
  where a tokiwa file refuses them: Miclow's serde ignores unknown keys, so files carry
  ``auto_start``, ``initial_topics`` (names of older Miclow versions), ``[tasks.lifecycle]``;
* ``${VAR}``, ``${VAR:-default}`` (default when unset or empty), ``${VAR-default}`` (default
  when unset) and ``${MICLOW_CONFIG_DIR}`` (the directory of the file being read) are expanded
  in every string of an entry except its ``task_name``, in table keys, and in
  ``include_paths``, as Miclow's later versions do; a variable that is not set and has no
  default is an error naming the task and the field;
* a ``[tasks.command]`` table (``command``, ``args``, ``working_directory``, ``environment``,
  ``stdout_topic``, ``stderr_topic``) is merged into its task.

Pure functions on the parsed TOML mapping; validation stays in :mod:`workers.relay.config`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError

log = logging.getLogger("tokiwa.relay")

#: accepted spellings of the two protocols (compared lower-cased).
PROTOCOLS = {"tokiwa": "tokiwa", "miclow": "miclow", "miclowstdio": "miclow"}
#: keys a ``[tasks.command]`` table may hold (Miclow's later format).
COMMAND_TABLE_KEYS = ("command", "args", "working_directory", "environment", "environment_vars",
                      "stdout_topic", "stderr_topic")
#: what the warning for a dropped key adds, for keys Miclow files are known to carry.
HINTS = {
    "auto_start": "every [[tasks]] entry starts at boot, [[functions]] on demand",
    "initial_topics": "older Miclow's name of subscribe_topics; Miclow ignores it too",
    "lifecycle": "tokiwa runs one instance of each [[tasks]] entry (no desired_instances)",
    "allow_duplicate": "a [[functions]] entry may run many instances, a task one",
}
_VAR = re.compile(r"\$\{([^}]+)\}")
GROUPS = ("tasks", "functions")


def protocol_name(value: object, where: str) -> str:
    """``tokiwa`` or ``miclow`` for an accepted spelling; :class:`ConfigError` otherwise."""
    name = PROTOCOLS.get(value.lower()) if isinstance(value, str) else None
    if name is None:
        raise ConfigError(f"{where}: field 'protocol': unknown protocol {value!r}; tokiwa's relay speaks "
                          f"'tokiwa' (the default) and 'miclow' (also spelled 'MiclowStdIO')", field="protocol")
    return name


def file_protocol(data: Mapping[str, Any], inherited: str, where: str) -> str:
    """The mode of one file: its top-level ``protocol``, else ``miclow`` when one of its
    entries names Miclow's protocol, else ``inherited`` (the including file's mode)."""
    if "protocol" in data:
        return protocol_name(data["protocol"], where)
    for group in GROUPS:
        entries = data.get(group)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and "protocol" in entry:
                if protocol_name(entry["protocol"], f"{where}: task {entry.get('task_name', '?')!r}") == "miclow":
                    return "miclow"
    return inherited


def expand(value: str, config_dir: str | None, env: Mapping[str, str], where: str, field: str) -> str:
    """Miclow's variable expansion of one string (see the module docstring)."""

    def one(match: re.Match[str]) -> str:
        expr = match.group(1)
        name, sep, default = expr.partition(":-")
        empty_is_unset = bool(sep)
        if not sep:
            name, sep, default = expr.partition("-")
        found = config_dir if name == "MICLOW_CONFIG_DIR" and config_dir is not None else env.get(name)
        if found is not None and not (found == "" and empty_is_unset):
            return found
        if sep:
            return default
        raise ConfigError(f"{where}: field {field!r}: variable {name!r} is not set and has no default "
                          f"(write ${{{name}:-default}})", field=field)

    return _VAR.sub(one, value)


def _expand_tree(value: Any, config_dir: str | None, env: Mapping[str, str], where: str, field: str) -> Any:
    if isinstance(value, str):
        return expand(value, config_dir, env, where, field)
    if isinstance(value, list):
        return [_expand_tree(v, config_dir, env, where, field) for v in value]
    if isinstance(value, dict):
        return {expand(k, config_dir, env, where, field): _expand_tree(v, config_dir, env, where, field)
                for k, v in value.items()}
    return value


def _merge_command_table(entry: dict[str, Any], where: str) -> dict[str, Any]:
    table = entry.get("command")
    if not isinstance(table, dict):
        return entry
    merged = {k: v for k, v in entry.items() if k != "command"}
    for key, value in table.items():
        if key not in COMMAND_TABLE_KEYS:
            merged.setdefault("__unknown__", []).append(f"command.{key}")
            continue
        if key in merged:
            raise ConfigError(f"{where}: field {key!r} is given both in the task and in its [tasks.command] table",
                              field=key)
        merged[key] = value
    return merged


def adapt_entry(entry: dict[str, Any], known: set[str], config_dir: str | None, where: str,
                env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """One ``[[tasks]]`` entry read the Miclow way: variables expanded, a command table
    merged, unknown keys dropped. Returns the entry and the keys it dropped."""
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for key, value in entry.items():
        keep = key in ("task_name", "protocol", "__file__")
        out[key] = value if keep else _expand_tree(value, config_dir, env, where, key)
    out = _merge_command_table(out, where)
    dropped = list(out.pop("__unknown__", []))
    dropped += [key for key in out if key not in known]
    return {k: v for k, v in out.items() if k in known}, dropped


def adapt_file(data: dict[str, Any], *, known_top: set[str], known_task: set[str], config_dir: Path | None,
               where: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A whole file's mapping read the Miclow way (see :func:`adapt_entry`); logs one warning
    per dropped key."""
    env = os.environ if env is None else env
    cdir = str(config_dir) if config_dir is not None else None
    out: dict[str, Any] = {}
    dropped: dict[str, list[str]] = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, list):
            entries = []
            for i, entry in enumerate(value):
                if not isinstance(entry, dict):
                    entries.append(entry)
                    continue
                name = entry.get("task_name", f"{key}[{i}]")
                adapted, gone = adapt_entry(entry, known_task, cdir, f"{where}: task {name!r}", env)
                entries.append(adapted)
                for g in gone:
                    dropped.setdefault(f"{key}.{g}", []).append(str(name))
            out[key] = entries
        elif key == "include_paths":
            out[key] = _expand_tree(value, cdir, env, where, key)
        elif key in known_top:
            out[key] = value
        else:
            dropped.setdefault(key, [])
    for key, names in dropped.items():
        hint = HINTS.get(key.split(".", 1)[-1].split(".", 1)[0])
        owners = f" (task {', '.join(repr(n) for n in names)})" if names else ""
        log.warning("%s: unknown key %r%s ignored in Miclow mode%s", where, key, owners, f": {hint}" if hint else "")
    return out
