"""Redis URLs: the schemes tokiwa accepts and what each one means.

====================================================================  ===========================
URL                                                                   what it reaches
====================================================================  ===========================
``redis://[user:pass@]host[:port][/db]``, ``rediss://`` (TLS),         one Redis server
``unix://[user:pass@]/path/to.sock[?db=N]``
``redis+sentinel://[user:pass@]host:port[,host:port...]/service[/db]``  the master of ``service``,
``rediss+sentinel://...`` (TLS to the sentinels and the Redis nodes)    found through Sentinel
``redis+cluster://[user:pass@]host:port[,host:port...]``,               a Redis Cluster (any nodes
``rediss+cluster://...`` (TLS to every node)                            of it as seeds)
====================================================================  ===========================

The user and password of a Sentinel or Cluster URL log in to the Redis nodes, as in
``redis://``. Sentinels that require a login of their own take the query options
``sentinel_username`` and ``sentinel_password``. Sentinel ports default to 26379, cluster
ports to 6379. Query options are those of ``redis://`` (``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``, ``client_name``, ``protocol``...),
parsed as redis-py parses them; an unknown one is refused, naming it.

:func:`parse_redis_url` checks a URL and raises :class:`~orchestrator.errors.InvalidArgumentError`
naming the part that is wrong (never echoing a password); :func:`redact` hides the password.
The clients themselves are built in :mod:`orchestrator.broker.connection`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from orchestrator.errors import InvalidArgumentError


class Topology(enum.Enum):
    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


#: scheme -> (topology, TLS)
SCHEMES: dict[str, tuple[Topology, bool]] = {
    "redis": (Topology.SINGLE, False),
    "rediss": (Topology.SINGLE, True),
    "unix": (Topology.SINGLE, False),
    "redis+sentinel": (Topology.SENTINEL, False),
    "rediss+sentinel": (Topology.SENTINEL, True),
    "redis+cluster": (Topology.CLUSTER, False),
    "rediss+cluster": (Topology.CLUSTER, True),
}
SENTINEL_PORT, CLUSTER_PORT = 26379, 6379
#: query options of Sentinel and Cluster URLs besides redis-py's typed ones (kept as text)
_TEXT_OPTIONS = frozenset({
    "client_name", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile",
    "ssl_keyfile", "ssl_password", "ssl_ciphers", "sentinel_username", "sentinel_password",
})
#: typed query options tokiwa sets itself on every client (timeouts, pool, retries)
_OWN_OPTIONS = frozenset({"retry_on_error", "retry_on_timeout"})
_SCHEME_LIST = ", ".join(f"{s}://" for s in SCHEMES)


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A checked Redis URL. For ``SINGLE`` only ``url``, ``topology`` and ``tls`` are filled
    (redis-py's ``from_url`` reads the rest); Sentinel and Cluster URLs are taken apart."""

    url: str
    topology: Topology
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or the cluster's seed nodes
    service: str | None = None  # the Sentinel service (master) name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)  # query options, typed

    @property
    def sentinel_auth(self) -> dict[str, str]:
        """username / password for the sentinels themselves (from the query options)."""
        names = {"sentinel_username": "username", "sentinel_password": "password"}
        return {names[k]: str(v) for k, v in self.options.items() if k in names}

    @property
    def node_options(self) -> dict[str, Any]:
        """The query options for the Redis nodes (the sentinels' own login left out)."""
        return {k: v for k, v in self.options.items() if not k.startswith("sentinel_")}


def _fail(url: str, part: str, problem: str, usage: str | None = None) -> InvalidArgumentError:
    tail = f"; write {usage}" if usage else ""
    return InvalidArgumentError(f"Redis URL {redact(url)}: {part} {problem}{tail}")


def _usage(topology: Topology) -> str:
    if topology is Topology.SENTINEL:
        return "redis+sentinel://[user:pass@]host:port[,host:port...]/service_name[/db]"
    return "redis+cluster://[user:pass@]host:port[,host:port...]"


def scheme_of(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def parse_redis_url(url: str) -> RedisUrl:
    """Check ``url`` and take it apart; :class:`InvalidArgumentError` names what is wrong."""
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        shown = f"scheme {scheme + '://'!r}" if scheme else "scheme"
        raise _fail(url, shown, "is not one tokiwa knows", f"one of {_SCHEME_LIST}")
    topology, tls = SCHEMES[scheme]
    if topology is Topology.SINGLE:
        return RedisUrl(url, topology, tls)
    usage = _usage(topology)
    rest = url.split("://", 1)[1]
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    nodes = _nodes(url, hostlist, SENTINEL_PORT if topology is Topology.SENTINEL else CLUSTER_PORT, usage)
    service, db = _path(url, topology, path if slash else "", usage)
    return RedisUrl(url, topology, tls, nodes=nodes, service=service, db=db, username=username,
                    password=password, options=_query(url, query))


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon and password else None)


def _nodes(url: str, hostlist: str, default_port: int, usage: str) -> tuple[tuple[str, int], ...]:
    if not hostlist.strip():
        raise _fail(url, "the host list", "is empty", usage)
    nodes: list[tuple[str, int]] = []
    for n, item in enumerate(hostlist.split(","), 1):
        item = item.strip()
        if not item:
            raise _fail(url, f"host {n} of the host list", "is empty", usage)
        nodes.append(_node(url, n, item, default_port))
    return tuple(nodes)


def _node(url: str, n: int, item: str, default_port: int) -> tuple[str, int]:
    where = f"host {n} ({item!r})"
    if item.startswith("["):  # [IPv6]:port
        host, bracket, tail = item[1:].partition("]")
        if not bracket or not host:
            raise _fail(url, where, "has an unclosed or empty [IPv6] address")
        if tail and not tail.startswith(":"):
            raise _fail(url, where, "must be [address]:port")
        port_text = tail[1:]
    else:
        host, colon, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise _fail(url, where, "has no host name")
        if ":" in host:
            raise _fail(url, where, "has more than one ':'; write an IPv6 address as [address]:port")
        if colon and not port_text:
            raise _fail(url, where, "has an empty port")
    if not port_text:
        return unquote(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(url, where, f"has port {port_text!r}, not a number from 1 to 65535")
    return unquote(host), int(port_text)


def _path(url: str, topology: Topology, path: str, usage: str) -> tuple[str | None, int]:
    parts = path.split("/") if path else []
    while parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if topology is Topology.CLUSTER:
        if parts and parts != ["0"]:
            raise _fail(url, f"the path /{'/'.join(parts)}", "is not allowed: a Redis Cluster has only db 0", usage)
        return None, 0
    if not parts or not parts[0]:
        raise _fail(url, "the service name", "is missing", usage)
    if len(parts) > 2:
        raise _fail(url, f"the path /{'/'.join(parts)}", "has more than service_name/db", usage)
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise _fail(url, f"the db {parts[1]!r}", "is not a number", usage)
        db = int(parts[1])
    return unquote(parts[0]), db


def _query(url: str, query: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        parser = cast("Callable[[str], Any] | None", URL_QUERY_ARGUMENT_PARSERS.get(name))
        if name in _OWN_OPTIONS or (parser is None and name not in _TEXT_OPTIONS):
            raise _fail(url, f"the query option {name!r}", "is not one tokiwa passes on (see docs/scaling.md)")
        if parser is None:
            options[name] = value
            continue
        try:
            options[name] = parser(value)
        except (TypeError, ValueError) as exc:
            raise _fail(url, f"the query option {name!r}", f"has an invalid value {value!r}") from exc
    if "db" in options:
        raise _fail(url, "the query option 'db'", "is not allowed here: put the db in the path")
    return options


def redact(url: str) -> str:
    """``url`` with its password (and any ``*_password`` query option) replaced by ``***``;
    works for every scheme, host lists included."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc_end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    if "password=" in tail:
        path, _, query = tail.partition("?")
        pairs = [p.split("=", 1) for p in query.split("&")] if query else []
        query = "&".join(f"{p[0]}=***" if len(p) == 2 and p[0].endswith("password") else "=".join(p)
                         for p in pairs)
        tail = f"{path}?{query}"
    return f"{scheme}://{netloc}{tail}"
