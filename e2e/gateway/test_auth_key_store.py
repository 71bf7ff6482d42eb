"""Auth keys kept in real stores: SQLite for the embedded default (keys
survive a restart), Redis in front of MariaDB shared by several gateways."""

import asyncio
import os
import subprocess
import uuid

import pytest
from telethon.crypto import AuthKey
from telethon.tl.functions import PingRequest

from conftest import start_gateway
from mtclient import connect, create_auth_key, pin_server_key


def service_url(name: str) -> str:
    url = os.environ.get(name)
    if not url:
        pytest.fail(f"{name} is not set: start the services with scripts/services.sh up and eval its env")
    return url


def ping_with_key(port: int, key: AuthKey, transport: str = "abridged") -> int:
    async def run():
        sender = await connect(port, transport, auth_key=key)
        try:
            return (await asyncio.wait_for(sender.send(PingRequest(5)), 20)).ping_id
        finally:
            await sender.disconnect()

    return asyncio.run(run())


def test_embedded_default_keeps_keys_across_a_restart(tmp_path):
    data = tmp_path / "data"
    first = start_gateway(tmp_path, data=data)
    try:
        pin_server_key(first.public_key.read_text())
        key = create_auth_key(first.port)
    finally:
        assert first.stop() == 0
    assert (data / "auth_keys.sqlite3").exists()
    second = start_gateway(tmp_path, data=data)
    try:
        assert ping_with_key(second.port, key) == 5
        log = second.log_text()
        assert "auth key created" not in log, "the client needed a new handshake"
    finally:
        assert second.stop() == 0


def mariadb(sql: str) -> None:
    url = service_url("MTPROTO_TEST_MYSQL_URL")  # mysql://user:pass@host:port
    creds, hostport = url.split("://", 1)[1].split("@", 1)
    user, password = creds.split(":", 1)
    host, port = hostport.rstrip("/").split(":")
    subprocess.run(["mariadb", "-h", host, "-P", port, "-u", user, f"-p{password}", "-e", sql], check=True)


def redis_flush(prefix: str) -> None:
    url = service_url("MTPROTO_TEST_REDIS_URL")
    port = url.rstrip("/").rsplit(":", 1)[1]
    keys = subprocess.run(
        ["redis-cli", "-p", port, "--scan", "--pattern", f"{prefix}*"], check=True, capture_output=True, text=True
    ).stdout.split()
    if keys:
        subprocess.run(["redis-cli", "-p", port, "del", *keys], check=True, capture_output=True)


def test_gateways_share_keys_through_redis_and_mariadb(tmp_path):
    db = f"mtproto_e2e_{uuid.uuid4().hex[:12]}"
    prefix = f"e2e{uuid.uuid4().hex[:8]}:"
    mariadb(f"CREATE DATABASE {db}")
    config = tmp_path / "stores.toml"
    config.write_text(
        "[auth_keys]\n"
        f'redis_url = "{service_url("MTPROTO_TEST_REDIS_URL")}"\n'
        f'redis_key_prefix = "{prefix}"\n'
        f'mysql_url = "{service_url("MTPROTO_TEST_MYSQL_URL")}/{db}"\n'
    )
    # All gateways serve the same RSA key, as a fleet does.
    data = tmp_path / "data"
    a = start_gateway(tmp_path, ["--config", str(config)], data=data)
    try:
        pin_server_key(a.public_key.read_text())
        key = create_auth_key(a.port)
    finally:
        assert a.stop() == 0

    b = start_gateway(tmp_path, ["--config", str(config)], data=data)
    try:
        assert ping_with_key(b.port, key) == 5
        assert "tier=\"redis\"" in b.log_text() or "tier=redis" in b.log_text()
    finally:
        assert b.stop() == 0

    redis_flush(prefix)
    c = start_gateway(tmp_path, ["--config", str(config)], data=data)
    try:
        assert ping_with_key(c.port, key, "obfuscated_intermediate") == 5
        assert "tier=mysql" in c.log_text() or "tier=\"mysql\"" in c.log_text()
    finally:
        assert c.stop() == 0


def test_remote_gateway_can_read_and_write_keys_in_its_own_store(tmp_path):
    """auth_keys.lookup/writer = store: the gateway keeps keys in its stores
    itself; the session service only sees the messages."""
    import sqlite3

    from conftest import free_port, start_session

    session = start_session(tmp_path)
    db = tmp_path / "gateway-keys.sqlite3"
    config = tmp_path / "gw.toml"
    config.write_text(f'[auth_keys]\nsqlite_path = "{db}"\nlookup = "store"\nwriter = "store"\n')
    gateway = start_gateway(
        tmp_path,
        ["--config", str(config), "--session", f"grpc://127.0.0.1:{session.port}",
         "--grpc-listen", f"127.0.0.1:{free_port()}"],
    )
    try:
        pin_server_key(gateway.public_key.read_text())
        key = create_auth_key(gateway.port)
        assert ping_with_key(gateway.port, key) == 5
        rows = sqlite3.connect(db).execute("SELECT count(*) FROM auth_keys").fetchone()[0]
        assert rows == 1
    finally:
        assert gateway.stop() == 0
        session.stop()
