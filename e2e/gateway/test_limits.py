"""Admission limits against a real gateway: per-address and per-listener
connection caps, and the handshake rate answered with transport error -429."""

import asyncio
import os
import socket
import struct
import time

import pytest
from telethon.tl.functions import PingRequest

from conftest import free_port, limited_gateway
from mtclient import closed_by_server, connect, intermediate_frame, pin_server_key, recv_exactly
from promtext import metric, scrape

REQ_PQ_MULTI = 0xBE7E8EF1


@pytest.fixture(scope="module")
def per_ip_gateway(tmp_path_factory):
    gw = limited_gateway(tmp_path_factory, "per-ip", "max_connections_per_ip = 3\n")
    yield gw
    assert gw.alive(), gw.log_text()[-4000:]
    gw.stop()


def req_pq_multi() -> bytes:
    body = struct.pack("<I", REQ_PQ_MULTI) + os.urandom(16)
    return struct.pack("<qqI", 0, int(time.time()) << 32, len(body)) + body


def open_intermediate(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\xee\xee\xee\xee")
    return sock


def answers_req_pq(sock: socket.socket) -> bool:
    """Sends req_pq_multi; true when a resPQ frame comes back. A connection
    the gateway already closed may fail the send itself (broken pipe)."""
    try:
        sock.sendall(intermediate_frame(req_pq_multi()))
        (length,) = struct.unpack("<I", recv_exactly(sock, 4))
        return length > 20 and len(recv_exactly(sock, length)) == length
    except (EOFError, ConnectionError):
        return False


def open_admitted(port: int) -> socket.socket:
    """Opens a connection that the gateway serves, retrying while the slot of
    a just-closed connection (the fixture's port probe) is still held."""
    for _ in range(100):
        sock = open_intermediate(port)
        if answers_req_pq(sock):
            return sock
        sock.close()
        time.sleep(0.05)
    raise AssertionError("no connection admitted")


def test_per_ip_cap_closes_the_extra_connection(per_ip_gateway):
    port = per_ip_gateway.port
    held = [open_admitted(port) for _ in range(3)]
    extra = open_intermediate(port)
    assert closed_by_server(extra) == b""
    extra.close()
    assert "too many connections from this client address" in per_ip_gateway.log_text()
    # A slot given back is usable again, by a real client.
    held.pop().close()
    pin_server_key(per_ip_gateway.public_key.read_text())

    async def ping():
        for _ in range(50):
            try:
                sender = await connect(port, "intermediate")
                break
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                # The gateway may not have noticed the close yet.
                await asyncio.sleep(0.1)
        try:
            return (await asyncio.wait_for(sender.send(PingRequest(9)), 20)).ping_id
        finally:
            await sender.disconnect()

    assert asyncio.run(ping()) == 9
    for sock in held:
        assert answers_req_pq(sock)
        sock.close()


def test_listener_cap(tmp_path_factory):
    gw = limited_gateway(tmp_path_factory, "listener", "max_connections = 2\n")
    try:
        held = [open_admitted(gw.port) for _ in range(2)]
        extra = open_intermediate(gw.port)
        assert closed_by_server(extra) == b""
        extra.close()
        for sock in held:
            sock.close()
        assert "listener at limits.max_connections" in gw.log_text()
    finally:
        assert gw.alive()
        gw.stop()


def test_handshake_rate_answers_429_then_closes(tmp_path_factory):
    admin = free_port()
    gw = limited_gateway(tmp_path_factory, "rate", "handshakes_per_ip_per_minute = 2\n",
                         ["--admin-listen", f"127.0.0.1:{admin}"])
    try:
        sock = open_intermediate(gw.port)
        assert answers_req_pq(sock)
        assert answers_req_pq(sock)
        sock.sendall(intermediate_frame(req_pq_multi()))
        # Intermediate frame of 4 bytes carrying int32 -429, then EOF.
        assert closed_by_server(sock) == struct.pack("<Ii", 4, -429)
        sock.close()
        # Also on a fresh connection from the same address.
        sock = open_intermediate(gw.port)
        sock.sendall(intermediate_frame(req_pq_multi()))
        assert closed_by_server(sock) == struct.pack("<Ii", 4, -429)
        sock.close()
        assert "handshake rate exceeded" in gw.log_text()
        assert metric(scrape(admin), "mtproto_refused", reason="handshake_flood") == 2
        assert metric(scrape(admin), "mtproto_handshakes", outcome="flood") == 2
    finally:
        assert gw.alive()
        gw.stop()
