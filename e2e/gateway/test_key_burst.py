"""A burst of connections that all use the same unknown key: each gets −404,
and the key source sees one lookup (single-flight plus the negative cache)."""

import os
import socket
import struct
import urllib.request

from conftest import free_port, start_gateway
from mtclient import closed_by_server, intermediate_frame


def lookups(admin_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("mtproto_auth_key_lookups_total "):
            return float(line.split()[-1])
    raise AssertionError(text)


def test_1000_connections_with_one_unknown_key_cause_one_lookup(tmp_path):
    admin = free_port()
    gateway = start_gateway(tmp_path, ["--admin-listen", f"127.0.0.1:{admin}"])
    key_id = struct.unpack("<q", os.urandom(8))[0] | 1
    frame = intermediate_frame(struct.pack("<q", key_id) + os.urandom(16 + 48))
    try:
        socks = []
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
            s.sendall(b"\xee\xee\xee\xee" + frame)
            socks.append(s)
        for s in socks:
            assert closed_by_server(s, timeout=30) == b"\x04\x00\x00\x00\x6c\xfe\xff\xff"
            s.close()
        assert lookups(admin) == 1
    finally:
        assert gateway.stop() == 0
