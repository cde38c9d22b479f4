"""Redis connections from a URL, in one place: plain, TLS, or through Redis Sentinel.

Plain URLs (``redis://``, ``rediss://``, ``unix://``) go to ``Redis.from_url``
unchanged. A Sentinel URL lists the sentinels and names the master::

    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB][?OPTIONS]
    rediss+sentinel://...       (TLS to the sentinels and to the Redis servers)

``USER``/``PASSWORD`` authenticate to the Redis master (and replicas), percent-
encoded as in a plain URL; a sentinel's port defaults to 26379; a bracketed
``[::1]:26379`` is an IPv6 sentinel. Options (percent-encoded values):
``sentinel_password`` and ``sentinel_username`` when the sentinels ask for
credentials of their own, ``db`` (instead of ``/DB``) and, with
``rediss+sentinel://`` only, ``ssl_cert_reqs``, ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``.

Nothing here puts a URL, a password or a host into an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
#: While a pool is in use, how often it asks the sentinels which server is the master.
CHECK_INTERVAL_S = 0.25
#: Sentinels answer at once or not at all: a hung one must not hold a connect for long.
SENTINEL_TIMEOUT_S = 2.0

_TLS_OPTIONS = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)
_OPTIONS = ("sentinel_password", "sentinel_username", "db", *_TLS_OPTIONS)
_CERT_REQS = ("none", "optional", "required")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

R = TypeVar("R", bound=Redis)


@dataclass(frozen=True)
class SentinelURL:
    """A parsed Sentinel URL (its ``repr`` shows no password)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    ssl_cert_reqs: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool | None = None

    def __repr__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"SentinelURL(sentinels={hosts!r}, master={self.master!r}, db={self.db})"

    def tls_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a redis-py connection for this URL's TLS settings."""
        if not self.ssl:
            return {}
        kwargs: dict[str, Any] = {"ssl": True}
        for name in _TLS_OPTIONS:
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs

    def server_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a connection to the master (or a replica)."""
        kwargs: dict[str, Any] = {"db": self.db, **self.tls_kwargs()}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a connection to one of the sentinels."""
        kwargs: dict[str, Any] = self.tls_kwargs()
        if self.sentinel_username is not None:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        return kwargs


def is_sentinel_url(url: str) -> bool:
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL; a ``ValueError`` says what is wrong, never the URL."""
    if not is_sentinel_url(url):
        raise ValueError("not a Sentinel URL (redis+sentinel:// or rediss+sentinel://)")
    if "#" in url:
        raise ValueError("Sentinel URL: contains '#'; percent-encode it (%23) in a password")
    # By hand, not urlsplit: it takes one host, and refuses "h1,[::1]:26379".
    scheme, _, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, (path, _, query) = rest[:cut], rest[cut:].partition("?")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    options = _options(query)
    ssl = scheme.lower() == "rediss+sentinel"
    tls_given = [name for name in _TLS_OPTIONS if name in options]
    if tls_given and not ssl:
        raise ValueError(f"Sentinel URL: {tls_given[0]} needs TLS: use rediss+sentinel://")
    master, db = _path(path, options.get("db"))
    check_hostname = options.get("ssl_check_hostname")
    cert_reqs = options.get("ssl_cert_reqs")
    if cert_reqs is not None and cert_reqs.lower() not in _CERT_REQS:
        raise ValueError(f"Sentinel URL: ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    return SentinelURL(
        sentinels=_hosts(hostlist),
        master=master,
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        ssl=ssl,
        ssl_cert_reqs=cert_reqs.lower() if cert_reqs is not None else None,
        ssl_ca_certs=options.get("ssl_ca_certs"),
        ssl_certfile=options.get("ssl_certfile"),
        ssl_keyfile=options.get("ssl_keyfile"),
        ssl_check_hostname=None if check_hostname is None else _flag(check_hostname),
    )


def redis_from_url(url: str, **kwargs: Any) -> Redis:
    """A client for ``url``: what ``Redis.from_url`` makes, or the master behind the sentinels.

    ``kwargs`` are redis-py connection arguments (``socket_connect_timeout``, ...);
    for a Sentinel URL the ``socket_*`` ones apply to the sentinels as well.

    No ``CLIENT SETINFO`` on connect (unless ``lib_name`` is given): on Redis 7.2+ it is
    one more command a least-privilege ACL user would have to be allowed, and an ACL line
    that allows it is refused by Redis 7.0 (docs/protocol.md, "Redis ACLs").
    """
    kwargs.setdefault("lib_name", None)
    kwargs.setdefault("lib_version", None)
    if is_sentinel_url(url):
        return sentinel_redis(parse_sentinel_url(url), redis_class=Redis, **kwargs)
    redis: Redis = Redis.from_url(url, **kwargs)
    return redis


def sentinel_redis(info: SentinelURL, *, redis_class: type[R], **kwargs: Any) -> R:
    """A ``redis_class`` client of the master the sentinels name, following failovers.

    Every connection asks a sentinel for the master's address when it connects;
    while the client is in use the pool also asks every ``CHECK_INTERVAL_S`` (in the
    background) and moves a connection to the new master when it is next taken.
    """
    on_sentinels = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    on_sentinels.setdefault("socket_timeout", SENTINEL_TIMEOUT_S)
    on_sentinels.setdefault("socket_connect_timeout", SENTINEL_TIMEOUT_S)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(info.sentinels), sentinel_kwargs={**on_sentinels, **info.sentinel_kwargs()}
    )
    pool = FollowingSentinelPool(info.master, sentinel, **{**kwargs, **info.server_kwargs()})
    client = redis_class(connection_pool=pool)
    client.auto_close_connection_pool = True  # the client closes the pool it owns
    return client


class FollowingSentinelPool(SentinelConnectionPool):
    """A connection pool for a Sentinel-managed master that follows a failover promptly.

    redis-py asks the sentinels for the master only when a connection (re)connects,
    so a pooled connection keeps talking to a master the sentinels have replaced. After
    a controlled ``SENTINEL FAILOVER`` the old master stays writable until the
    sentinel reconfigures it as a replica (about 10 s later), and what it took
    meanwhile is then thrown away. This pool asks the sentinels every
    ``check_interval`` seconds while it is used and reconnects a connection to an
    old address before handing it out (one in use finishes its command first).
    """

    def __init__(
        self,
        service_name: str,
        sentinel_manager: Sentinel,
        *,
        check_interval: float = CHECK_INTERVAL_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self.check_interval = check_interval
        self._checked_at = 0.0
        self._check: asyncio.Task[None] | None = None

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        self._check_soon()
        address = self.master_address
        if (
            self.is_master
            and address is not None
            and connection.is_connected
            and (getattr(connection, "host", None), getattr(connection, "port", None)) != address
        ):
            await connection.disconnect()  # the next connect asks the sentinels
        await super().ensure_connection(connection)

    def _check_soon(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.check_interval:
            return
        if self._check is not None and not self._check.done():
            return
        self._checked_at = now
        self._check = asyncio.get_running_loop().create_task(
            self._ask_sentinels(), name="llm-router sentinel check"
        )

    async def _ask_sentinels(self) -> None:
        # A new address disconnects the idle connections (redis-py); the busy ones
        # are moved by ensure_connection. No answer: keep what we have.
        with contextlib.suppress(RedisError, OSError):
            await self.get_master_address()  # type: ignore[no-untyped-call]

    async def disconnect(self, inuse_connections: bool = True) -> None:
        check = self._check
        if inuse_connections and check is not None and check is not asyncio.current_task():
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await check
            self._check = None
        await super().disconnect(inuse_connections)


def _options(query: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in query.split("&") if query else []:
        name, _, value = pair.partition("=")
        if name not in _OPTIONS:
            # Named only when it looks like a name: a stray password must not be echoed.
            shown = repr(name) if name.isidentifier() and len(name) <= 40 else "(unnamed)"
            raise ValueError(f"Sentinel URL: unknown option {shown} (known: {', '.join(_OPTIONS)})")
        if name in options:
            raise ValueError(f"Sentinel URL: option {name!r} given twice")
        options[name] = unquote(value)
    return options


def _path(path: str, db_option: str | None) -> tuple[str, int]:
    segments = path[1:].split("/") if path.startswith("/") else [""]
    if len(segments) == 2 and segments[1] == "":
        segments = segments[:1]  # a trailing slash
    master = unquote(segments[0])
    if not master:
        raise ValueError("Sentinel URL: no master name (…/mymaster after the sentinels)")
    if len(segments) > 2:
        raise ValueError("Sentinel URL: the path is /<master name>[/<db>], nothing more")
    db_text = segments[1] if len(segments) == 2 else None
    if db_text is not None and db_option is not None:
        raise ValueError("Sentinel URL: the database is given twice (path and ?db=)")
    db_text = db_text if db_text is not None else db_option
    if db_text is None:
        return master, 0
    if not db_text.isascii() or not db_text.isdigit():
        raise ValueError("Sentinel URL: the database must be a number")
    return master, int(db_text)


def _hosts(hostlist: str) -> tuple[tuple[str, int], ...]:
    if not hostlist:
        raise ValueError("Sentinel URL: no sentinel host")
    return tuple(_host(item, n) for n, item in enumerate(hostlist.split(","), 1))


def _host(item: str, n: int) -> tuple[str, int]:
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"Sentinel URL: sentinel #{n} has a malformed IPv6 address")
        port_text = rest[1:] if rest else None
    elif item.count(":") > 1:
        raise ValueError(f"Sentinel URL: sentinel #{n}: put an IPv6 address in brackets")
    else:
        host, colon, port_text_ = item.partition(":")
        port_text = port_text_ if colon else None
    if not host or any(c in host for c in " /?#@[]"):
        raise ValueError(f"Sentinel URL: sentinel #{n} has no valid host")
    if port_text is None:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"Sentinel URL: sentinel #{n} has an invalid port")
    return host, int(port_text)


def _flag(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError("Sentinel URL: ssl_check_hostname must be true or false")
