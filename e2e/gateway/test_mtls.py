"""Mutual TLS between a real gateway and a real `mtproto-session`, with
certificates from the `openssl` CLI: Telethon is served through both gRPC
directions (unary and stream); certificates rotated on disk are served to new
connections without a restart while a connected client carries on; a peer
with a certificate of the wrong role or from another CA is refused."""

import asyncio
import re
import subprocess
from pathlib import Path

import pytest
from telethon.tl.functions import PingRequest

from conftest import free_port, start_gateway, start_session
from mtclient import connect, pin_server_key

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def openssl(*args: str, cwd: Path) -> str:
    return subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            cwd=d)


def make_leaf(d: Path, ca: str, name: str, dns: str) -> None:
    """Writes `name`.pem and `name`.key through renames (as a Secret update swaps files)."""
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f".{name}.key", "-out", f".{name}.csr", "-subj", f"/CN={dns}", cwd=d)
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{dns}\nextendedKeyUsage=serverAuth,clientAuth\n"
                               "keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", f".{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f".{name}.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    (d / f".{name}.key").rename(d / f"{name}.key")
    (d / f".{name}.pem").rename(d / f"{name}.pem")


def serial(d: Path, name: str) -> str:
    return openssl("x509", "-in", f"{name}.pem", "-noout", "-serial", cwd=d).strip()


def served_serial(d: Path, port: int, client: str, server_name: str) -> str:
    """The serial of the certificate a fresh TLS connection is served, or the failure."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
         "-CAfile", "ca.pem", "-cert", f"{client}.pem", "-key", f"{client}.key", "-verify_return_error",
         "-verify_hostname", server_name],
        cwd=d, input="", capture_output=True, text=True, timeout=30)
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", done.stdout, re.S)
    assert pem, done.stdout + done.stderr
    return subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.group(0),
                          capture_output=True, text=True, check=True).stdout.strip()


def refused_by(d: Path, port: int, client_args: list[str], server_name: str) -> str:
    """Runs a TLS client that then sends bytes; returns its output (the server's alert)."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
         "-CAfile", "ca.pem", "-ign_eof", *client_args],
        cwd=d, input="PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


@pytest.fixture(scope="module", params=["unary", "stream"])
def fleet(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"mtls-{request.param}")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_leaf(d, "ca", "gateway", "mtproto-gateway")
    make_leaf(d, "ca", "session", "mtproto-session")
    make_leaf(d, "other-ca", "stranger", "mtproto-gateway")
    session = start_session(d, extra=["--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / "session.pem"),
                                      "--tls-key", str(d / "session.key")])
    grpc_port = free_port()
    (d / "gateway.toml").write_text(f"""
[session]
mode = "{request.param}"
endpoints = ["127.0.0.1:{session.port}"]
grpc_listen = "127.0.0.1:{grpc_port}"
[session.tls]
ca_file = "{d / 'ca.pem'}"
cert_file = "{d / 'gateway.pem'}"
key_file = "{d / 'gateway.key'}"
""")
    gateway = start_gateway(d, ["--config", str(d / "gateway.toml")])
    gateway.grpc_port = grpc_port
    pin_server_key(gateway.public_key.read_text())
    yield d, gateway, session
    assert gateway.alive(), gateway.log_text()[-4000:]
    assert session.alive(), session.log_text()[-4000:]
    gateway.stop()
    session.stop()


def log(process) -> str:
    return ANSI.sub("", process.log_text())


def test_telethon_is_served_over_mutual_tls_and_rotation_needs_no_restart(fleet):
    d, gateway, session = fleet
    assert "session gRPC: mutual TLS" in log(gateway)
    assert "session gRPC: mutual TLS" in log(session)

    async def scenario():
        sender = await connect(gateway.port, "intermediate")
        try:
            # A ping travels gateway -> session and the pong session -> gateway.
            assert (await asyncio.wait_for(sender.send(PingRequest(1)), 20)).ping_id == 1
            before = {"session": serial(d, "session"), "gateway": serial(d, "gateway")}
            assert served_serial(d, session.port, "gateway", "mtproto-session") == before["session"]
            assert served_serial(d, gateway.grpc_port, "session", "mtproto-gateway") == before["gateway"]
            make_leaf(d, "ca", "session", "mtproto-session")
            make_leaf(d, "ca", "gateway", "mtproto-gateway")
            assert serial(d, "session") != before["session"]
            # New connections get the new certificates, same processes...
            assert served_serial(d, session.port, "gateway", "mtproto-session") == serial(d, "session")
            assert served_serial(d, gateway.grpc_port, "session", "mtproto-gateway") == serial(d, "gateway")
            # ...and the connected client carries on.
            assert (await asyncio.wait_for(sender.send(PingRequest(2)), 20)).ping_id == 2
        finally:
            await sender.disconnect()

    asyncio.run(scenario())
    assert "gRPC TLS files changed: reloaded" in log(session)
    assert "gRPC TLS files changed: reloaded" in log(gateway)
    # A second client after the rotation: both directions still prove each other.
    async def again():
        sender = await connect(gateway.port, "obfuscated_intermediate")
        try:
            assert (await asyncio.wait_for(sender.send(PingRequest(3)), 20)).ping_id == 3
        finally:
            await sender.disconnect()

    asyncio.run(again())


@pytest.mark.parametrize("client,why", [
    ([], "no certificate"),
    (["-cert", "stranger.pem", "-key", "stranger.key"], "another CA"),
])
def test_strangers_get_a_tls_alert(fleet, client, why):
    d, gateway, session = fleet
    for port, name in [(session.port, "mtproto-session"), (gateway.grpc_port, "mtproto-gateway")]:
        out = refused_by(d, port, client, name)
        assert re.search(r"alert (certificate required|unknown ca|bad certificate)", out), f"{why}: {out}"


def test_a_certificate_of_the_wrong_role_gets_a_tls_alert(fleet):
    d, gateway, session = fleet
    out = refused_by(d, session.port, ["-cert", "session.pem", "-key", "session.key"], "mtproto-session")
    assert re.search(r"alert (bad certificate|certificate unknown|access denied)", out), out
    out = refused_by(d, gateway.grpc_port, ["-cert", "gateway.pem", "-key", "gateway.key"], "mtproto-gateway")
    assert re.search(r"alert (bad certificate|certificate unknown|access denied)", out), out
