"""Malformed input ends only the offending connection, cleanly; the gateway
and its other connections carry on."""

import asyncio
import os
import socket
import struct
import time

import pytest
from telethon.tl.functions import PingRequest

from conftest import start_gateway
from mtclient import (
    closed_by_server,
    create_auth_key,
    connect,
    encrypt_client_message,
    intermediate_frame,
    pin_server_key,
    raw_intermediate,
)


@pytest.fixture(scope="module")
def known_key(gateway):
    pin_server_key(gateway.public_key.read_text())
    return create_auth_key(gateway.port)


def still_serves(gateway):
    async def ping():
        sender = await connect(gateway.port, "abridged")
        try:
            return (await asyncio.wait_for(sender.send(PingRequest(3)), 20)).ping_id
        finally:
            await sender.disconnect()

    assert asyncio.run(ping()) == 3


def plain_message(body: bytes) -> bytes:
    return struct.pack("<qqI", 0, int(time.time()) << 32, len(body)) + body


@pytest.mark.parametrize("length", [4, 8, 12, 16, 20, 23])
def test_short_frames_close_the_connection(gateway, known_key, length):
    sock = raw_intermediate(gateway.port)
    payload = (struct.pack("<Q", known_key.key_id) + os.urandom(16))[:length]
    sock.sendall(intermediate_frame(payload))
    assert closed_by_server(sock) == b""
    sock.close()


def test_sixteen_byte_ciphertext_bad_msg_key_and_short_padding(gateway, known_key):
    # 16-byte encrypted_data (teamgram panicked on it).
    sock = raw_intermediate(gateway.port)
    sock.sendall(intermediate_frame(struct.pack("<Q", known_key.key_id) + os.urandom(16 + 16)))
    assert closed_by_server(sock) == b""
    sock.close()
    # A flipped bit: msg_key no longer matches.
    payload, _ = encrypt_client_message(known_key, 0, 7, struct.pack("<Iq", 0x7ABE77EC, 1), int(time.time()) << 32)
    bad = bytearray(payload)
    bad[-1] ^= 1
    sock = raw_intermediate(gateway.port)
    sock.sendall(intermediate_frame(bytes(bad)))
    assert closed_by_server(sock) == b""
    sock.close()
    still_serves(gateway)


@pytest.mark.parametrize("padding", [0, 4])
def test_padding_below_12_bytes_is_refused(gateway, known_key, padding):
    import hashlib

    from telethon.crypto import AES
    from telethon.network.mtprotostate import MTProtoState

    from mtclient import LOGGERS

    body = struct.pack("<Iq", 0x7ABE77EC, 1) + b"\0" * (4 - padding)
    plaintext = struct.pack("<qqqii", 0, 1, int(time.time()) << 32, 1, len(body)) + body + os.urandom(padding)
    assert len(plaintext) == 48
    msg_key = hashlib.sha256(known_key.key[88:120] + plaintext).digest()[8:24]
    aes_key, aes_iv = MTProtoState(known_key, LOGGERS)._calc_key(known_key.key, msg_key, True)
    frame = struct.pack("<Q", known_key.key_id) + msg_key + AES.encrypt_ige(plaintext, aes_key, aes_iv)
    sock = raw_intermediate(gateway.port)
    sock.sendall(intermediate_frame(frame))
    assert closed_by_server(sock) == b""
    sock.close()
    assert "padding of %d bytes" % padding in gateway.log_text()


def test_oversized_length_is_refused_without_reading_it(gateway):
    sock = raw_intermediate(gateway.port)
    sock.sendall(struct.pack("<I", 64 << 20) + b"\0" * 64)
    assert closed_by_server(sock) == b""
    sock.close()


def test_handshake_out_of_order_and_unknown_fingerprint(gateway):
    # set_client_DH_params with no handshake before it.
    body = struct.pack("<I", 0xF5045F1F) + os.urandom(32) + b"\x10" + os.urandom(16) + b"\0" * 3
    sock = raw_intermediate(gateway.port)
    sock.sendall(intermediate_frame(plain_message(body)))
    assert closed_by_server(sock) == b""
    sock.close()

    # req_pq_multi, then req_DH_params naming a fingerprint the server never offered.
    sock = raw_intermediate(gateway.port)
    nonce = os.urandom(16)
    sock.sendall(intermediate_frame(plain_message(struct.pack("<I", 0xBE7E8EF1) + nonce)))
    sock.settimeout(10)
    length = struct.unpack("<I", sock.recv(4))[0]
    res_pq = b""
    while len(res_pq) < length:
        res_pq += sock.recv(length - len(res_pq))
    server_nonce = res_pq[20 + 4 + 16 : 20 + 4 + 32]
    req = (
        struct.pack("<I", 0xD712E4BE) + nonce + server_nonce
        + b"\x04" + b"\0\0\0\x05" + b"\0\0\0"
        + b"\x04" + b"\0\0\0\x07" + b"\0\0\0"
        + struct.pack("<q", 0x1122334455667788)
        + b"\xfe\x00\x01\x00" + os.urandom(256)
    )
    sock.sendall(intermediate_frame(plain_message(req)))
    assert closed_by_server(sock) == b""
    sock.close()
    still_serves(gateway)


def test_http_on_the_tcp_port_is_closed(gateway):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"POST /api HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_server(sock) == b""
    sock.close()


def test_garbage_never_kills_the_gateway(gateway):
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        sock.sendall(os.urandom(int.from_bytes(os.urandom(2), "little") % 300 + 1))
        sock.close()
    still_serves(gateway)
    assert "panicked" not in gateway.log_text()


def test_silent_connection_hits_the_handshake_deadline(tmp_path):
    config = tmp_path / "gw.toml"
    config.write_text("[limits]\nhandshake_timeout_secs = 1\nshutdown_grace_secs = 1\n")
    gw = start_gateway(tmp_path, ["--config", str(config)])
    try:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        sock.sendall(b"\xee\xee\xee\xee")
        assert closed_by_server(sock, timeout=15) == b""
        sock.close()
        assert "no auth key within the handshake deadline" in gw.log_text()
    finally:
        assert gw.stop() == 0
