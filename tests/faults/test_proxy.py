"""The fault proxy against a real redis-server: pass-through, blackhole, reply delay, cut, heal.

Raw sockets show what the link does (no data, no FIN, no RST); a direct client shows what the
server did meanwhile."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .proxy import FaultProxy


@pytest.fixture
def proxy(redis_url):
    with FaultProxy.for_url(redis_url) as p:
        yield p


def raw(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def readable(sock: socket.socket, within_s: float) -> bool:
    """Whether data or an end of stream (FIN / RST) arrives within ``within_s``."""
    return bool(select.select([sock], [], [], within_s)[0])


def command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n"]
    for p in parts:
        out.append(f"${len(p.encode())}\r\n{p}\r\n")
    return "".join(out).encode()


def reply(sock: socket.socket, within_s: float = 3.0) -> bytes:
    assert readable(sock, within_s), "no reply"
    return sock.recv(4096)


def no_retry_client(url: str, timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0))


def test_passes_commands_through(proxy, sync_redis, namespace):
    client = redis.Redis.from_url(proxy.url)
    try:
        client.set(f"{namespace}:k", "v")
        assert sync_redis.get(f"{namespace}:k") == b"v"
        assert client.get(f"{namespace}:k") == b"v"
        assert proxy.connections == 1
        assert proxy.stats.bytes_up > 0 and proxy.stats.bytes_down > 0
    finally:
        client.close()


def test_blackhole_holds_both_directions_without_closing_and_heal_delivers_late(proxy, sync_redis, namespace):
    key = f"{namespace}:n"
    sock = raw(proxy)
    try:
        sock.sendall(command("PING"))
        assert reply(sock) == b"+PONG\r\n"
        proxy.blackhole()
        sock.sendall(command("INCR", key))
        assert not readable(sock, 1.0), "a blackhole sends nothing: no reply, no FIN, no RST"
        assert sync_redis.get(key) is None, "the command is held, not delivered"
        assert proxy.connections == 1
        proxy.heal()
        assert reply(sock) == b":1\r\n"
        assert sync_redis.get(key) == b"1"
    finally:
        sock.close()


def test_blackhole_accepts_new_connections_but_answers_nothing(proxy):
    proxy.blackhole()
    sock = raw(proxy)  # the handshake completes, as with a real half-open path's kernel
    try:
        sock.sendall(command("PING"))
        assert not readable(sock, 0.5)
        proxy.heal()
        assert reply(sock) == b"+PONG\r\n"
    finally:
        sock.close()


def test_blackhole_times_a_client_out_and_after_heal_it_reconnects(proxy):
    client = no_retry_client(proxy.url, 0.3)
    try:
        assert client.ping()
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started >= 0.3
        proxy.heal()
        assert client.ping()  # a new connection: redis-py dropped the timed-out one
    finally:
        client.close()


def test_command_written_into_a_blackhole_runs_after_heal_even_if_its_client_gave_up(proxy, sync_redis,
                                                                                    namespace):
    key = f"{namespace}:late"
    sock = raw(proxy)
    proxy.blackhole()
    sock.sendall(command("INCR", key))
    time.sleep(0.2)
    sock.close()  # the client times out and closes; its bytes are still on the way
    time.sleep(0.2)
    assert sync_redis.get(key) is None
    proxy.heal()
    deadline = time.monotonic() + 5
    while sync_redis.get(key) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sync_redis.get(key) == b"1"


def test_delay_replies_runs_commands_at_once_and_answers_late(proxy, sync_redis, namespace):
    key = f"{namespace}:d"
    sock = raw(proxy)
    try:
        sock.sendall(command("PING"))
        assert reply(sock) == b"+PONG\r\n"
        proxy.delay_replies(700)
        started = time.monotonic()
        sock.sendall(command("INCR", key))
        deadline = time.monotonic() + 0.5
        while sync_redis.get(key) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sync_redis.get(key) == b"1", "the request is not delayed: the command ran"
        assert not readable(sock, max(0.0, 0.6 - (time.monotonic() - started))), "the reply came early"
        assert reply(sock) == b":1\r\n"
        assert time.monotonic() - started >= 0.7
        proxy.heal()
        sock.sendall(command("INCR", key))
        assert reply(sock, within_s=0.5) == b":2\r\n"
    finally:
        sock.close()


def test_delay_past_the_socket_timeout_fails_the_command_that_ran(proxy, sync_redis, namespace):
    key = f"{namespace}:t"
    client = no_retry_client(proxy.url, 0.3)
    try:
        client.ping()
        proxy.delay_replies(600)
        with pytest.raises(redis.TimeoutError):
            client.incr(key)
        assert sync_redis.get(key) == b"1"
    finally:
        client.close()


@pytest.mark.parametrize("reset", [False, True])
def test_cut_closes_every_connection_and_accepts_new_ones(proxy, reset):
    socks = [raw(proxy) for _ in range(2)]
    try:
        for sock in socks:
            sock.sendall(command("PING"))
            assert reply(sock) == b"+PONG\r\n"
        assert proxy.cut(reset=reset) == 2
        for sock in socks:
            assert readable(sock, 2.0)
            if reset:
                with pytest.raises(ConnectionResetError):
                    sock.recv(10)
            else:
                assert sock.recv(10) == b""
        assert proxy.connections == 0
        client = redis.Redis.from_url(proxy.url)
        try:
            assert client.ping()
        finally:
            client.close()
    finally:
        for sock in socks:
            sock.close()


def test_cut_during_a_command_fails_it_with_a_connection_error(proxy):
    client = no_retry_client(proxy.url, 5)
    outcome: list[BaseException | bool] = []
    try:
        client.ping()
        proxy.delay_replies(3000)
        waiter = threading.Thread(target=lambda: outcome.append(_ping(client)))
        waiter.start()
        time.sleep(0.3)
        assert not outcome, "the reply is delayed"
        proxy.cut()
        waiter.join(5)
        assert len(outcome) == 1 and isinstance(outcome[0], redis.ConnectionError), outcome
    finally:
        client.close()


def _ping(client: redis.Redis) -> BaseException | bool:
    try:
        return client.ping()
    except Exception as exc:
        return exc


def test_stop_closes_connections_and_frees_the_port(redis_url):
    proxy = FaultProxy.for_url(redis_url).start()
    sock = raw(proxy)
    proxy.stop()
    try:
        assert readable(sock, 2.0) and sock.recv(10) == b""
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=2).close()


def test_url_keeps_auth_and_db():
    proxy = FaultProxy.for_url("redis://user:pw@127.0.0.1:6390/3")
    proxy.listen_port = 7001
    assert proxy.url == "redis://user:pw@127.0.0.1:7001/3"
