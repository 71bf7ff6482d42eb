"""The command line: pinned keys (PKCS#1 and PKCS#8, rotation), the embedded
default with no flags, configuration errors that name the field, and the log format."""

import asyncio
import json
import socket
import subprocess

import pytest
from telethon.tl.functions import PingRequest

from conftest import Gateway, free_port, gateway_binary, start_gateway, start_remote_gateway, start_session
from mtclient import connect, pin_server_key


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def ping_once(port: int, transport: str = "intermediate") -> int:
    async def run():
        sender = await connect(port, transport)
        try:
            return (await asyncio.wait_for(sender.send(PingRequest(11)), 20)).ping_id
        finally:
            await sender.disconnect()

    return asyncio.run(run())


def test_rsa_private_key_flags_serve_clients_pinning_that_key(tmp_path):
    pkcs1 = tmp_path / "old.pem"
    pkcs8 = tmp_path / "new.pem"
    openssl("genrsa", "-traditional", "-out", str(pkcs1), "2048")
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pkcs8))
    assert "BEGIN PRIVATE KEY" in pkcs8.read_text()
    public = tmp_path / "new.pub.pem"
    openssl("rsa", "-in", str(pkcs8), "-RSAPublicKey_out", "-out", str(public))
    gw = start_gateway(tmp_path, ["--rsa-private-key", str(pkcs1), "--rsa-private-key", str(pkcs8)])
    try:
        # The client knows only the second (rotation) key; the server offers both.
        pin_server_key(public.read_text())
        assert ping_once(gw.port, "full") == 11
        assert not (tmp_path / "data" / "server-rsa-private.pem").exists()
    finally:
        assert gw.stop() == 0


def test_embedded_default_with_no_flags_keeps_its_key(tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 10443)) == 0:
            pytest.skip("port 10443 is taken on this machine")
    data = tmp_path / "mtproto-gateway-data"
    gw = Gateway(tmp_path, [], 10443, data / "server-rsa-public.pem")
    try:
        pin_server_key(gw.public_key.read_text())
        assert ping_once(10443, "obfuscated_abridged") == 11
        first_key = (data / "server-rsa-private.pem").read_text()
    finally:
        assert gw.stop() == 0
    gw = Gateway(tmp_path, [], 10443, data / "server-rsa-public.pem")
    try:
        assert (data / "server-rsa-private.pem").read_text() == first_key
        assert ping_once(10443, "abridged") == 11
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--listen", "not-an-address"], "--listen"),
        (["--rsa-private-key", "/nonexistent/key.pem"], "rsa_private_keys"),
        (["--config", "/nonexistent/gw.toml"], "--config"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, args, expected):
    port = free_port()
    proc = subprocess.run(
        [str(gateway_binary()), "--data-dir", str(tmp_path), *args] + (["--listen", f"127.0.0.1:{port}"] if "--listen" not in args else []),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr


def log_lines(process) -> list[str]:
    """The non-empty lines of a stopped process's stdout and stderr."""
    return [line for line in process.log_text().splitlines() if line.strip()]


def parses_as_json_event(line: str) -> bool:
    try:
        event = json.loads(line)
    except ValueError:
        return False
    return isinstance(event, dict) and bool(event.get("level")) and bool(event.get("fields", {}).get("message"))


def test_json_logs_from_gateway_and_session(tmp_path, monkeypatch):
    """The flag on the gateway, the environment variable on the session: after a real
    handshake and ping through both, every line either wrote is one JSON event."""
    monkeypatch.setenv("MTPROTO_LOG_FORMAT", "json")
    session = start_session(tmp_path)
    monkeypatch.delenv("MTPROTO_LOG_FORMAT")
    gw = start_remote_gateway(tmp_path, [session.port], "unary")
    gw.stop()
    text_lines = log_lines(gw)
    gw.args += ["--log-format", "json"]
    gw.restart()
    try:
        pin_server_key(gw.public_key.read_text())
        assert ping_once(gw.port) == 11
    finally:
        assert gw.stop() == 0
        assert session.stop() == 0
    json_lines = log_lines(gw)[len(text_lines):]
    # The first run was in text mode (the default), the restart in JSON.
    assert text_lines and not any(parses_as_json_event(line) for line in text_lines), text_lines[:3]
    for process, lines in (("gateway", json_lines), ("session", log_lines(session))):
        assert len(lines) > 3, f"{process}: too few log lines: {lines}"
        bad = [line for line in lines if not parses_as_json_event(line)]
        assert not bad, f"{process}: not JSON events with level and fields.message: {bad[:3]}"
        events = [json.loads(line) for line in lines]
        assert all(e.get("timestamp") and e.get("target") for e in events), events[0]
    messages = [json.loads(line)["fields"]["message"] for line in json_lines]
    assert "shutting down" in messages, messages


@pytest.mark.parametrize("binary", ["mtproto-gateway", "mtproto-session"])
def test_an_unknown_log_format_names_the_choices(binary):
    program = gateway_binary().parent / binary
    proc = subprocess.run([str(program), "--log-format", "xml"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--log-format" in proc.stderr and "text, json" in proc.stderr, proc.stderr
