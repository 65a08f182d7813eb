"""What Redis ran, as atomic units, and the hash slots each unit touched.

:class:`MonitorRecorder` opens a ``MONITOR`` connection to a redis-server and records every
command it executes, with the client that sent it; the commands a Lua script runs show as
client ``lua`` right after the script's ``EVAL`` / ``EVALSHA`` line (a script is atomic, so
nothing comes between). :func:`atomic_units` groups the record into what a Redis Cluster must
serve from one slot:

* a script call: its declared keys (``numkeys``) and the keys of every command it ran, so keys
  a script computes from its ARGV count too;
* a ``MULTI`` ... ``EXEC`` of one client (with the keys it ``WATCH``ed before), scripts inside
  included;
* one command with several keys outside both (a multi-key ``XREADGROUP``, ``BLPOP``,
  ``RENAME`` ...), except ``DEL`` / ``UNLINK`` / ``EXISTS`` / ``TOUCH`` / ``MGET`` / ``MSET``,
  which redis-py's cluster client splits per slot itself.

Keys are read by the server itself (``COMMAND GETKEYS``), so every command's key positions are
Redis's own. :class:`CallSites` remembers which line of tokiwa sent each command (by wrapping
redis-py's client and pipeline), so a cross-slot unit is reported with its file:line.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_COMMANDS = {b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"}
#: multi-key commands redis-py's cluster client sends per slot (outside a transaction)
SPLIT_BY_CLIENT = {b"DEL", b"UNLINK", b"EXISTS", b"TOUCH", b"MGET", b"MSET"}
#: commands with no keys (answered without asking the server)
KEYLESS = {b"PING", b"HELLO", b"CLIENT", b"SCRIPT", b"TIME", b"INFO", b"SELECT", b"PUBLISH", b"SUBSCRIBE",
           b"PSUBSCRIBE", b"UNSUBSCRIBE", b"PUNSUBSCRIBE", b"COMMAND", b"WAIT", b"MULTI", b"EXEC", b"DISCARD",
           b"AUTH", b"ECHO", b"CONFIG", b"DBSIZE", b"READONLY", b"READWRITE", b"UNWATCH", b"RESET", b"QUIT",
           b"CLUSTER", b"ROLE", b"LASTSAVE", b"SLOWLOG", b"MEMORY", b"LATENCY", b"MONITOR", b"PUBSUB"}

_LINE = re.compile(rb"^\+?(\d+\.\d+) \[(\d+) ([^\]]+)\] (.*)$")
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("a"): b"\a", ord("b"): b"\b",
            ord('"'): b'"', ord("\\"): b"\\"}


def parse_args(text: bytes) -> list[bytes]:
    """The arguments of a MONITOR line's command part: ``"SET" "k" "a\\x00b"`` -> [SET, k, a\\0b]."""
    args: list[bytes] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] != ord('"'):
            i += 1
            continue
        i += 1
        out = bytearray()
        while i < n and text[i] != ord('"'):
            if text[i] == ord("\\") and i + 1 < n:
                nxt = text[i + 1]
                if nxt == ord("x") and i + 3 < n:
                    out.append(int(text[i + 2:i + 4], 16))
                    i += 4
                    continue
                out += _ESCAPES.get(nxt, bytes([nxt]))
                i += 2
                continue
            out.append(text[i])
            i += 1
        args.append(bytes(out))
        i += 1
    return args


@dataclass(frozen=True, slots=True)
class Executed:
    """One command as MONITOR showed it."""

    client: str  # "127.0.0.1:port", "unix:...", or "lua" (run by a script)
    args: tuple[bytes, ...]

    @property
    def name(self) -> bytes:
        return self.args[0].upper() if self.args else b""


class MonitorRecorder:
    """Every command a redis-server runs while recording (a thread reads the MONITOR feed)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._chunks: list[bytes] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MonitorRecorder:
        sock = self._sock = socket.create_connection((self.host, self.port), timeout=5)
        sock.sendall(b"MONITOR\r\n")
        first = b""
        while b"\r\n" not in first:
            first += sock.recv(64)
        head, _, rest = first.partition(b"\r\n")
        if head != b"+OK":
            raise RuntimeError(f"MONITOR refused: {head!r}")
        self._chunks.append(rest)
        sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, name="slot-monitor", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self._chunks.append(data)

    def stop(self) -> list[Executed]:
        """Stop recording (after a PING through the feed, so everything sent before is in)."""
        marker = f"slot-monitor-end-{id(self)}".encode()
        pinger = redis.Redis(host=self.host, port=self.port)
        try:
            pinger.echo(marker)
        finally:
            pinger.close()
        deadline = 50
        while marker not in b"".join(self._chunks[-3:]) and deadline:
            threading.Event().wait(0.1)
            deadline -= 1
        assert self._sock is not None
        self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        return list(self._parse(b"".join(self._chunks)))

    @staticmethod
    def _parse(raw: bytes) -> Iterator[Executed]:
        for line in raw.split(b"\r\n"):
            match = _LINE.match(line)
            if match:
                yield Executed(match.group(3).decode(), tuple(parse_args(match.group(4))))


@dataclass
class Unit:
    """One atomic unit: a script call, a transaction, or a multi-key command."""

    kind: str  # "script", "transaction" or "command"
    client: str
    commands: list[Executed] = field(default_factory=list)
    declared: list[bytes] = field(default_factory=list)  # a script's KEYS
    keys: set[bytes] = field(default_factory=set)

    @property
    def slots(self) -> dict[int, list[bytes]]:
        out: dict[int, list[bytes]] = {}
        for key in sorted(self.keys):
            out.setdefault(key_slot(key), []).append(key)
        return out

    @property
    def head(self) -> Executed:
        return self.commands[0]


def _script_keys(args: tuple[bytes, ...]) -> list[bytes]:
    try:
        numkeys = int(args[2])
    except (IndexError, ValueError):
        return []
    return list(args[3:3 + numkeys])


def atomic_units(executed: Iterable[Executed]) -> list[Unit]:
    """The script calls, transactions and lone commands of a MONITOR record (see the module doc)."""
    units: list[Unit] = []
    open_tx: dict[str, Unit] = {}
    watched: dict[str, list[Executed]] = {}
    script: Unit | None = None
    script_tx: Unit | None = None  # the transaction the current script runs in
    for cmd in executed:
        if cmd.client == "lua":
            for unit in (script, script_tx):
                if unit is not None:
                    unit.commands.append(cmd)
            continue
        script = script_tx = None
        tx = open_tx.get(cmd.client)
        if cmd.name == b"WATCH":
            watched.setdefault(cmd.client, []).append(cmd)
        elif cmd.name == b"MULTI":
            open_tx[cmd.client] = Unit("transaction", cmd.client, [cmd, *watched.pop(cmd.client, [])])
        elif cmd.name in (b"EXEC", b"DISCARD") and tx is not None:
            units.append(open_tx.pop(cmd.client))
        elif cmd.name in SCRIPT_COMMANDS:
            script = Unit("script", cmd.client, [cmd], declared=_script_keys(cmd.args))
            units.append(script)
            if tx is not None:
                tx.commands.append(cmd)
                script.kind, script_tx = "script in transaction", tx
        elif tx is not None:
            tx.commands.append(cmd)
        elif cmd.name not in SPLIT_BY_CLIENT and cmd.name not in KEYLESS:
            units.append(Unit("command", cmd.client, [cmd]))
    return units


class KeyReader:
    """Keys of a command as the server reads them (``COMMAND GETKEYS``), cached."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._cache: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}

    def keys_of(self, commands: Iterable[Executed]) -> dict[tuple[bytes, ...], tuple[bytes, ...]]:
        wanted = [c.args for c in commands if c.name not in KEYLESS and c.args not in self._cache]
        wanted = list(dict.fromkeys(wanted))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            pipe = self.client.pipeline(transaction=False)
            for args in chunk:
                pipe.execute_command("COMMAND GETKEYS", *args)
            for args, reply in zip(chunk, pipe.execute(raise_on_error=False), strict=True):
                self._cache[args] = () if isinstance(reply, Exception) else tuple(
                    k if isinstance(k, bytes) else str(k).encode() for k in reply)
        return self._cache

    def fill(self, units: list[Unit]) -> None:
        """Set each unit's ``keys``: the keys of all its commands, a script's declared ones too."""
        every = [c for u in units for c in u.commands]
        cache = self.keys_of(every)
        for unit in units:
            unit.keys = set(unit.declared)
            for cmd in unit.commands:
                unit.keys.update(cache.get(cmd.args, ()))


def cross_slot(units: Iterable[Unit], namespace: str) -> list[Unit]:
    """The units whose keys of ``namespace`` span more than one hash slot (or, for a script,
    that touch keys while declaring none: a cluster would send it to any node)."""
    ns = namespace.encode()
    bad = []
    for unit in units:
        mine = {k for k in unit.keys if k.startswith((ns + b":", b"{" + ns + b":"))}
        if not mine:
            continue
        unit.keys = mine
        if len(unit.slots) > 1 or (unit.kind.startswith("script") and not unit.declared):
            bad.append(unit)
    return bad


# -- where a command came from -------------------------------------------------------------
def lua_constants(registered: dict[str, tuple[str, str]] | None = None) -> dict[str, str]:
    """sha1 of every Lua script text defined as a module constant in the library ->
    ``path:line NAME``. ``registered`` (:attr:`CallSites.registered`: sha -> (where it was
    registered, text)) names the scripts made at run time: a constant whose ``__PLACEHOLDER__``
    parts were filled in, else by where it was registered."""
    found: dict[str, str] = {}
    templates: list[tuple[re.Pattern[str], str]] = []
    for path in sorted((ROOT / "orchestrator").rglob("*.py")) + sorted((ROOT / "workers").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r'^([A-Z][A-Z0-9_]*)\s*=\s*"""(.*?)"""', text, re.S | re.M):
            body = match.group(2)
            if "redis.call" not in body and "redis.pcall" not in body:
                continue
            name = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1} {match.group(1)}"
            found[hashlib.sha1(body.encode()).hexdigest()] = name
            parts = re.split(r"__[A-Z][A-Z0-9_]*__", body)
            if len(parts) > 1:
                templates.append((re.compile(".*?".join(map(re.escape, parts)) + r"\Z", re.S), name))
    for sha, (site, script) in (registered or {}).items():
        if sha not in found:
            found[sha] = next((name for pattern, name in templates if pattern.match(script)), site)
    return found


def _caller() -> str:
    """file:line of the innermost frame in tokiwa's own code (not redis-py, not this file)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if (f"{ROOT}/orchestrator/" in name or f"{ROOT}/workers/" in name) and "/broker/connection.py" not in name \
                and "/broker/batch.py" not in name:
            return f"{Path(name).relative_to(ROOT)}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def _signature(args: Iterable[Any]) -> tuple[bytes, bytes]:
    items = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    if not items:
        return b"", b""
    name = items[0].upper()
    if name in SCRIPT_COMMANDS and len(items) > 3:
        return name, items[3]
    return name, items[1] if len(items) > 1 else b""


class CallSites:
    """Wraps redis-py's asyncio and sync clients and pipelines (while installed) to remember the
    tokiwa line that sent each (command, first key); ``where(unit)`` reads it back."""

    def __init__(self) -> None:
        self.sites: dict[tuple[bytes, bytes], str] = {}
        #: sha -> (where its ``register_script`` was called, its text): names run-time scripts
        self.registered: dict[str, tuple[str, str]] = {}

    def install(self, monkeypatch: Any) -> CallSites:
        import redis.asyncio.client as aclient
        import redis.client as sclient
        import redis.commands.core as core

        sites, registered = self.sites, self.registered

        def wrap_script(original: Any) -> Any:
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                original(self, *args, **kwargs)
                text = self.script.decode() if isinstance(self.script, bytes) else str(self.script)
                registered.setdefault(self.sha, (f"registered at {_caller()}", text))
            return __init__

        monkeypatch.setattr(core.Script, "__init__", wrap_script(core.Script.__init__))
        monkeypatch.setattr(core.AsyncScript, "__init__", wrap_script(core.AsyncScript.__init__))

        def remember(args: Iterable[Any]) -> None:
            sites.setdefault(_signature(args), _caller())

        def wrap_command(original: Any, is_async: bool) -> Any:
            if is_async:
                async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
                    remember(args)
                    return await original(self, *args, **options)
                return execute_command

            def sync_execute_command(self: Any, *args: Any, **options: Any) -> Any:
                remember(args)
                return original(self, *args, **options)
            return sync_execute_command

        def wrap_queue(original: Any) -> Any:
            def pipeline_execute_command(self: Any, *args: Any, **options: Any) -> Any:
                remember(args)
                return original(self, *args, **options)
            return pipeline_execute_command

        monkeypatch.setattr(aclient.Redis, "execute_command",
                            wrap_command(aclient.Redis.execute_command, True))
        monkeypatch.setattr(sclient.Redis, "execute_command",
                            wrap_command(sclient.Redis.execute_command, False))
        monkeypatch.setattr(aclient.Pipeline, "pipeline_execute_command",
                            wrap_queue(aclient.Pipeline.pipeline_execute_command))
        monkeypatch.setattr(sclient.Pipeline, "pipeline_execute_command",
                            wrap_queue(sclient.Pipeline.pipeline_execute_command))
        return self

    def where(self, unit: Unit) -> str:
        for cmd in unit.commands:
            if cmd.client == "lua" or cmd.name in (b"MULTI", b"WATCH"):
                continue
            site = self.sites.get(_signature(cmd.args))
            if site:
                return site
        return "?"


def script_name(unit: Unit, scripts: dict[str, str]) -> str:
    """``path:line NAME`` of a script unit's Lua constant (or where it was registered)."""
    head = unit.head
    sha = head.args[1].decode(errors="replace") if head.name.startswith(b"EVALSHA") else \
        hashlib.sha1(head.args[1]).hexdigest()
    return scripts.get(sha, f"script {sha[:10]}")


def describe(unit: Unit, scripts: dict[str, str], sites: CallSites) -> str:
    """One report line: kind, script (where it is defined), call site, keys by slot."""
    head = unit.head
    what = unit.kind
    if unit.kind.startswith("script"):
        what += f" {script_name(unit, scripts)}"
    elif unit.kind == "transaction":
        what += " [" + " ".join(c.name.decode() for c in unit.commands[1:] if c.client != "lua") + "]"
    else:
        what += f" {head.name.decode()}"
    slots = "; ".join(f"slot {slot}: {', '.join(k.decode(errors='replace') for k in keys)}"
                      for slot, keys in unit.slots.items())
    if unit.kind.startswith("script") and not unit.declared:
        slots += " (no declared keys)"
    return f"{what} called at {sites.where(unit)}: {slots}"


def unit_inventory(units: Iterable[Unit], scripts: dict[str, str]) -> dict[str, int]:
    """How many units of each kind (scripts by name) the record holds: what the drive covered."""
    seen: dict[str, int] = {}
    for unit in units:
        head = unit.head
        if unit.kind.startswith("script"):
            name = script_name(unit, scripts).rsplit(" ", 1)[-1]
        elif unit.kind == "transaction":
            name = "MULTI " + ",".join(sorted({c.name.decode() for c in unit.commands[1:] if c.client != "lua"}))
        else:
            name = head.name.decode()
        seen[name] = seen.get(name, 0) + 1
    return seen
