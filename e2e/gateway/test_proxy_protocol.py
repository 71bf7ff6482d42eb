"""PROXY protocol v1/v2 with HAProxy (Debian's) in front of a real gateway
that forwards to a real session process: the session sees the original
client address; `required` refuses direct and malformed connections."""

import asyncio
import re
import shutil
import socket
import struct
import subprocess
import time

import pytest
from telethon.tl.functions import PingRequest

from conftest import LOG_FILTER, free_port, start_gateway, start_session, wait_for_port
from mtclient import closed_by_server, connect, intermediate_frame, pin_server_key
from promtext import metric, scrape
from test_limits import answers_req_pq, req_pq_multi

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/install-deps.sh)")

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain_log(process) -> str:
    return ANSI.sub("", process.log_text())


class HAProxy:
    """haproxy in the foreground with one frontend per PROXY version."""

    def __init__(self, workdir, gateway_port: int):
        self.v1 = free_port()
        self.v2 = free_port()
        config = workdir / "haproxy.cfg"
        config.write_text(f"""
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend v1
    bind 127.0.0.1:{self.v1}
    default_backend gateway_v1
frontend v2
    bind 127.0.0.1:{self.v2}
    default_backend gateway_v2
backend gateway_v1
    server gw 127.0.0.1:{gateway_port} send-proxy
backend gateway_v2
    server gw 127.0.0.1:{gateway_port} send-proxy-v2
""")
        self.log = open(workdir / "haproxy.log", "ab")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.v1, self.proc)
        wait_for_port(self.v2, self.proc)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def behind_haproxy(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("proxy")
    session = start_session(workdir)
    gateway = start_gateway(workdir, ["--proxy-protocol", "required", "--session-mode", "unary",
                                      "--grpc-listen", f"127.0.0.1:{free_port()}",
                                      "--session", f"grpc://127.0.0.1:{session.port}"])
    haproxy = HAProxy(workdir, gateway.port)
    pin_server_key(gateway.public_key.read_text())
    yield gateway, session, haproxy
    haproxy.stop()
    assert gateway.alive(), gateway.log_text()[-4000:]
    gateway.stop()
    session.stop()


def ping_from(port: int, source: str) -> int:
    async def scenario():
        sender = await connect(port, "obfuscated_intermediate", local_addr=(source, 0))
        try:
            return (await asyncio.wait_for(sender.send(PingRequest(42)), 20)).ping_id
        finally:
            await sender.disconnect()

    return asyncio.run(scenario())


def wait_for_log(process, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in plain_log(process):
        assert time.monotonic() < deadline, f"{text!r} not in log:\n{plain_log(process)[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("version,source", [("v2", "127.0.0.5"), ("v1", "127.0.0.6")])
def test_session_sees_the_original_client(behind_haproxy, version, source):
    gateway, session, haproxy = behind_haproxy
    assert ping_from(getattr(haproxy, version), source) == 42
    wait_for_log(gateway, f"client={source}:")
    wait_for_log(session, f"client_ip={source} ")
    # The gateway's socket peer is HAProxy on 127.0.0.1, never the client address.
    assert "socket_peer=127.0.0.1:" in plain_log(gateway)


def test_direct_connection_to_required_listener_is_closed(behind_haproxy):
    gateway, _, _ = behind_haproxy
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"\xee\xee\xee\xee" + intermediate_frame(req_pq_multi()))
    assert closed_by_server(sock) == b""
    sock.close()
    wait_for_log(gateway, "no PROXY header on a listener that requires one")


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 300.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"A" * 120,
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),
    V2_SIGNATURE + b"\x21\x51\x00\x0c" + bytes(12),
])
def test_malformed_headers_are_refused_and_counted(behind_haproxy, header):
    gateway, _, haproxy = behind_haproxy
    before = plain_log(gateway).count("PROXY header refused")
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(header)
    assert closed_by_server(sock) == b""
    sock.close()
    wait_for_log(gateway, f"refused_total={before + 1}\n")
    assert plain_log(gateway).count("PROXY header refused") == before + 1
    # Others are unharmed.
    assert ping_from(haproxy.v2, "127.0.0.7") == 42


def test_optional_listener_takes_both(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("optional"), ["--proxy-protocol", "optional"])
    try:
        direct = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        direct.sendall(b"\xee\xee\xee\xee")
        assert answers_req_pq(direct)
        direct.close()
        proxied = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        body = struct.pack(">HH", 40000, gw.port)
        proxied.sendall(V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([198, 51, 100, 7, 127, 0, 0, 1]) + body
                        + b"\xee\xee\xee\xee")
        assert answers_req_pq(proxied)
        proxied.close()
        wait_for_log(gw, "client=198.51.100.7:40000")
    finally:
        assert gw.alive()
        gw.stop()


def raw_ping_req_pq(port: int, source: str, header: bytes) -> socket.socket:
    """A connection from `source` that sends `header`, then the intermediate tag."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(header + b"\xee\xee\xee\xee")
    return sock


def v2_header(client: str, client_port: int, gateway_port: int) -> bytes:
    address = socket.inet_aton(client) + socket.inet_aton("127.0.0.1")
    return (V2_SIGNATURE + b"\x21\x11\x00\x0c" + address
            + struct.pack(">HH", client_port, gateway_port))


def test_optional_listener_honours_only_trusted_sources(tmp_path_factory):
    admin = free_port()
    gw = start_gateway(tmp_path_factory.mktemp("trusted-optional"),
                       ["--proxy-protocol", "optional", "--proxy-trusted-source", "127.0.0.2/32",
                        "--admin-listen", f"127.0.0.1:{admin}"])
    try:
        trusted = raw_ping_req_pq(gw.port, "127.0.0.2", v2_header("198.51.100.7", 40000, gw.port))
        assert answers_req_pq(trusted)
        trusted.close()
        wait_for_log(gw, "client=198.51.100.7:40000")
        # From elsewhere the header is skipped, the socket peer stays the client, and it is counted.
        untrusted = raw_ping_req_pq(gw.port, "127.0.0.3", v2_header("198.51.100.8", 40001, gw.port))
        assert answers_req_pq(untrusted)
        untrusted.close()
        wait_for_log(gw, "PROXY header from an untrusted source ignored")
        assert "client=198.51.100.8" not in plain_log(gw)
        assert metric(scrape(admin), "mtproto_proxy_headers_untrusted") == 1
        direct = raw_ping_req_pq(gw.port, "127.0.0.3", b"")
        assert answers_req_pq(direct)
        direct.close()
    finally:
        assert gw.alive()
        gw.stop()


def test_required_listener_closes_untrusted_sources(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trusted-required")
    admin = free_port()
    gw = start_gateway(workdir, ["--proxy-protocol", "required", "--proxy-trusted-source", "127.0.0.2/32",
                                 "--admin-listen", f"127.0.0.1:{admin}"])
    try:
        untrusted = raw_ping_req_pq(gw.port, "127.0.0.3", v2_header("198.51.100.9", 40002, gw.port))
        assert closed_by_server(untrusted) == b""
        untrusted.close()
        wait_for_log(gw, "socket_peer=127.0.0.3:")
        assert "client=198.51.100.9" not in plain_log(gw)
        trusted = raw_ping_req_pq(gw.port, "127.0.0.2", v2_header("198.51.100.10", 40003, gw.port))
        assert answers_req_pq(trusted)
        trusted.close()
        wait_for_log(gw, "client=198.51.100.10:40003")
        # Each refusal (this one and the start-up probe's, from 127.0.0.1) is logged and counted.
        deadline = time.monotonic() + 10
        while plain_log(gw).count("not a trusted PROXY source") < 2:
            assert time.monotonic() < deadline, plain_log(gw)[-3000:]
            time.sleep(0.05)
        assert plain_log(gw).count("not a trusted PROXY source") == 2
        assert metric(scrape(admin), "mtproto_refused", reason="proxy_header") == 2
    finally:
        assert gw.alive()
        gw.stop()
