"""Redis URLs into clients: the Sentinel URL parser, plain URLs unchanged, the worker's settings."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from redis.asyncio import Redis

from llm_router.client.connections import (
    DEFAULT_SENTINEL_PORT,
    FollowingSentinelPool,
    is_sentinel_url,
    parse_sentinel_url,
    redis_from_url,
)

SECRET = "s3cr3t:p@ss/w#rd%+?"
ENCODED = quote(SECRET, safe="")


def test_hosts_master_db_and_password() -> None:
    info = parse_sentinel_url("redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/3")
    assert info.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert info.master == "mymaster"
    assert info.db == 3
    assert info.username is None
    assert info.password == "pw"
    assert info.sentinel_password is None
    assert info.ssl is False
    assert info.server_kwargs() == {"db": 3, "password": "pw"}
    assert info.sentinel_kwargs() == {}


def test_defaults_port_db_and_takes_names_and_ipv6() -> None:
    info = parse_sentinel_url("redis+sentinel://sentinel-1.lan,[::1]:26390,sentinel-3/cache")
    assert info.sentinels == (
        ("sentinel-1.lan", DEFAULT_SENTINEL_PORT),
        ("::1", 26390),
        ("sentinel-3", DEFAULT_SENTINEL_PORT),
    )
    assert (info.master, info.db, info.password) == ("cache", 0, None)
    assert parse_sentinel_url("redis+sentinel://h/m/").db == 0
    assert parse_sentinel_url("redis+sentinel://h/m?db=5").db == 5


def test_credentials_are_percent_decoded() -> None:
    info = parse_sentinel_url(
        f"redis+sentinel://us%40er:{ENCODED}@h1:1,h2:2/my%20master/0"
        f"?sentinel_password={ENCODED}&sentinel_username=watch%3Aer"
    )
    assert info.username == "us@er"
    assert info.password == SECRET
    assert info.master == "my master"
    assert info.sentinel_password == SECRET  # a '+' stays a '+'
    assert info.sentinel_username == "watch:er"
    assert info.sentinel_kwargs() == {"username": "watch:er", "password": SECRET}
    assert info.server_kwargs() == {"db": 0, "username": "us@er", "password": SECRET}


def test_repr_shows_no_password() -> None:
    info = parse_sentinel_url(f"redis+sentinel://:{ENCODED}@h/m?sentinel_password={ENCODED}")
    assert SECRET not in repr(info)
    assert ENCODED not in repr(info)
    assert "m" in repr(info)


def test_tls_scheme_and_options() -> None:
    info = parse_sentinel_url(
        "rediss+sentinel://:pw@h:26379/m/1?ssl_ca_certs=/etc/ca%20file.pem"
        "&ssl_cert_reqs=Optional&ssl_check_hostname=yes&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    )
    assert info.ssl is True
    assert info.ssl_ca_certs == "/etc/ca file.pem"
    assert info.ssl_cert_reqs == "optional"
    assert info.ssl_check_hostname is True
    tls = {
        "ssl": True,
        "ssl_cert_reqs": "optional",
        "ssl_ca_certs": "/etc/ca file.pem",
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
        "ssl_check_hostname": True,
    }
    assert info.sentinel_kwargs() == tls  # TLS to the sentinels too
    assert info.server_kwargs() == {"db": 1, "password": "pw", **tls}


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h/m",
        "REDIS+SENTINEL://h/m",
        "rediss+sentinel://h/m",
    ],
)
def test_sentinel_schemes(url: str) -> None:
    assert is_sentinel_url(url)
    assert parse_sentinel_url(url).master == "m"


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://h/0", "unix:///tmp/r.sock", "sentinel://h/m", "h/m", ""]
)
def test_plain_urls_are_not_sentinel_urls(url: str) -> None:
    assert not is_sentinel_url(url)
    with pytest.raises(ValueError, match="not a Sentinel URL"):
        parse_sentinel_url(url)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        (f"redis+sentinel://:{ENCODED}@h:1", "no master name"),
        (f"redis+sentinel://:{ENCODED}@h:1/", "no master name"),
        (f"redis+sentinel://:{ENCODED}@/m", "no sentinel host"),
        (f"redis+sentinel://:{ENCODED}@h:1,,h:2/m", "sentinel #2 has no valid host"),
        (f"redis+sentinel://:{ENCODED}@h:1,h:port/m", "sentinel #2 has an invalid port"),
        (f"redis+sentinel://:{ENCODED}@h:0/m", "sentinel #1 has an invalid port"),
        (f"redis+sentinel://:{ENCODED}@h:65536/m", "invalid port"),
        (f"redis+sentinel://:{ENCODED}@h:/m", "invalid port"),
        (f"redis+sentinel://:{ENCODED}@::1:26379/m", "IPv6 address in brackets"),
        (f"redis+sentinel://:{ENCODED}@[::1/m", "malformed IPv6"),
        (f"redis+sentinel://:{ENCODED}@[::1]x/m", "malformed IPv6"),
        (f"redis+sentinel://:{ENCODED}@h/m/x", "database must be a number"),
        (f"redis+sentinel://:{ENCODED}@h/m/-1", "database must be a number"),
        (f"redis+sentinel://:{ENCODED}@h/m/1/2", "nothing more"),
        (f"redis+sentinel://:{ENCODED}@h/m/1?db=2", "given twice"),
        (f"redis+sentinel://:{ENCODED}@h/m?sentinel_pasword={ENCODED}", "'sentinel_pasword'"),
        (f"redis+sentinel://:{ENCODED}@h/m?{ENCODED}", r"unknown option \(unnamed\)"),
        (f"redis+sentinel://:{ENCODED}@h/m?db=1&db=1", "'db' given twice"),
        (f"redis+sentinel://:{ENCODED}@h/m?ssl_ca_certs=/ca.pem", "use rediss"),
        (f"rediss+sentinel://:{ENCODED}@h/m?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        (f"rediss+sentinel://:{ENCODED}@h/m?ssl_check_hostname=2", "true or false"),
        (f"redis+sentinel://:{SECRET}@h/m", "percent-encode"),  # a raw '#' in the password
        ("redis+sentinel://:pa#ss@h/m", "'#'"),
    ],
)
def test_bad_urls_say_why_without_the_password(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as caught:
        parse_sentinel_url(url)
    message = str(caught.value)
    assert message.startswith("Sentinel URL: ")
    assert "s3cr3t" not in message
    assert "pa#ss" not in message
    assert "@" not in message  # no user information, no host list


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        f"redis://us%40er:{ENCODED}@example.org:6380/2",
        "rediss://:pw@example.org:6380/1?ssl_cert_reqs=none",
        "redis://h?db=4",
        "unix:///tmp/redis.sock?db=1",
    ],
)
def test_plain_urls_make_what_from_url_makes(url: str) -> None:
    """But for CLIENT SETINFO, which ours do not send (docs/protocol.md, "Redis ACLs")."""
    ours = redis_from_url(url, socket_connect_timeout=5, health_check_interval=30)
    theirs = Redis.from_url(
        url, socket_connect_timeout=5, health_check_interval=30, lib_name=None, lib_version=None
    )
    assert type(ours.connection_pool) is type(theirs.connection_pool)
    assert ours.connection_pool.connection_class is theirs.connection_pool.connection_class
    assert ours.connection_pool.connection_kwargs == theirs.connection_pool.connection_kwargs


def test_sentinel_url_makes_a_following_master_client() -> None:
    redis = redis_from_url(
        f"redis+sentinel://:{ENCODED}@127.0.0.1:26379,127.0.0.1:26380/mymaster/2"
        "?sentinel_password=watch",
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    pool = redis.connection_pool
    assert isinstance(pool, FollowingSentinelPool)
    assert pool.service_name == "mymaster"
    assert pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"]) == (2, SECRET)
    assert kwargs["socket_connect_timeout"] == 5
    assert kwargs["health_check_interval"] == 30
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    on_sentinel = sentinels[0].connection_pool.connection_kwargs
    assert on_sentinel["password"] == "watch"  # the sentinels' own password, not the master's
    assert on_sentinel["socket_connect_timeout"] == 5
    assert on_sentinel["socket_timeout"] == 2.0  # a hung sentinel does not hang a connect
    assert SECRET not in repr(redis)


class _Sentinels:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.asked = 0

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        self.asked += 1
        return self.address


class _Connection:
    """Just what the pool looks at: an address, connected or not; it connects where the
    sentinels say, as redis-py's SentinelManagedConnection does."""

    def __init__(self, sentinels: _Sentinels) -> None:
        self.sentinels = sentinels
        self.host, self.port = sentinels.address
        self.is_connected = True
        self.disconnects = 0

    async def disconnect(self) -> None:
        self.is_connected = False
        self.disconnects += 1

    async def connect(self) -> None:
        if not self.is_connected:
            self.host, self.port = self.sentinels.address
            self.is_connected = True

    async def can_read_destructive(self) -> bool:
        return False


async def test_pool_moves_connections_to_the_new_master() -> None:
    sentinels = _Sentinels(("10.0.0.1", 6379))
    pool = FollowingSentinelPool("mymaster", sentinels, check_interval=0.0)  # type: ignore[arg-type]
    pool.master_address = ("10.0.0.1", 6379)
    on_old = _Connection(sentinels)
    conn: Any = on_old
    await pool.ensure_connection(conn)  # asks the sentinels, in the background
    assert pool._check is not None
    await pool._check
    assert on_old.disconnects == 0  # still the master
    sentinels.address = ("10.0.0.2", 6379)  # a failover
    await pool.ensure_connection(conn)  # handed out as it is (the pool does not know yet)
    assert on_old.disconnects == 0
    assert pool._check is not None
    await pool._check
    assert pool.master_address == ("10.0.0.2", 6379)
    assert sentinels.asked == 2
    await pool.ensure_connection(conn)
    assert on_old.disconnects == 1  # dropped, then connected again (to the new master)
    assert (on_old.host, on_old.port, on_old.is_connected) == ("10.0.0.2", 6379, True)
    await pool.ensure_connection(conn)
    assert on_old.disconnects == 1
    await pool.disconnect()
    assert pool._check is None


async def test_pool_keeps_its_master_when_the_sentinels_do_not_answer() -> None:
    class Silent:
        async def discover_master(self, service_name: str) -> tuple[str, int]:
            from redis.exceptions import ConnectionError

            raise ConnectionError("no sentinel answers")

    pool = FollowingSentinelPool("m", Silent(), check_interval=0.0)  # type: ignore[arg-type]
    pool.master_address = ("10.0.0.1", 6379)
    conn: Any = _Connection(_Sentinels(("10.0.0.1", 6379)))
    await pool.ensure_connection(conn)
    assert pool._check is not None
    await pool._check  # swallowed: no answer is no news
    assert pool.master_address == ("10.0.0.1", 6379)
    assert conn.disconnects == 0
    await pool.disconnect()
