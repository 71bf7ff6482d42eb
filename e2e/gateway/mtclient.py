"""Helpers around Telethon 1.45's public classes, plus raw-socket framing for
the bad-input tests."""

import asyncio
import logging
import socket
import struct

from telethon.crypto import AuthKey, rsa
from telethon.network import MTProtoSender
from telethon.network.connection import (
    ConnectionTcpAbridged,
    ConnectionTcpFull,
    ConnectionTcpIntermediate,
    ConnectionTcpObfuscated,
)
from telethon.network.connection.connection import Connection, ObfuscatedConnection
from telethon.network.connection.tcpintermediate import (
    IntermediatePacketCodec,
    RandomizedIntermediatePacketCodec,
)
from telethon.network.connection.tcpobfuscated import ObfuscatedIO

_added_keys: set[str] = set()


class Loggers(dict):
    def __missing__(self, key):
        return logging.getLogger(key)


LOGGERS = Loggers()


class PaddedIntermediateCodec(RandomizedIntermediatePacketCodec):
    """Telethon's padded codec only runs inside MTProxy obfuscation, where the
    tag is encrypted; plain padded intermediate sends the 0xdddddddd tag itself."""

    tag = b"\xdd\xdd\xdd\xdd"


class ConnectionTcpPaddedIntermediate(Connection):
    """Plain padded intermediate, from Telethon's own codec."""

    packet_codec = PaddedIntermediateCodec


class ConnectionTcpObfuscatedIntermediate(ObfuscatedConnection):
    obfuscated_io = ObfuscatedIO
    packet_codec = IntermediatePacketCodec


class ConnectionTcpObfuscatedPadded(ObfuscatedConnection):
    obfuscated_io = ObfuscatedIO
    packet_codec = RandomizedIntermediatePacketCodec


TRANSPORTS = {
    "full": ConnectionTcpFull,
    "abridged": ConnectionTcpAbridged,
    "intermediate": ConnectionTcpIntermediate,
    "padded_intermediate": ConnectionTcpPaddedIntermediate,
    "obfuscated_abridged": ConnectionTcpObfuscated,
    "obfuscated_intermediate": ConnectionTcpObfuscatedIntermediate,
    "obfuscated_padded": ConnectionTcpObfuscatedPadded,
}


def pin_server_key(public_key_pem: str) -> None:
    """Makes Telethon trust this server key (its public `add_key` API)."""
    if public_key_pem not in _added_keys:
        rsa.add_key(public_key_pem, old=False)
        _added_keys.add(public_key_pem)


async def connect(port: int, transport: str = "intermediate", auth_key: AuthKey | None = None,
                  local_addr: tuple[str, int] | None = None) -> MTProtoSender:
    """Connects an MTProtoSender; without `auth_key` it runs the handshake.
    `local_addr` binds the client socket (e.g. another loopback address)."""
    sender = MTProtoSender(auth_key, loggers=LOGGERS, retries=3, auto_reconnect=False)
    conn = TRANSPORTS[transport]("127.0.0.1", port, 2, loggers=LOGGERS, local_addr=local_addr)
    await asyncio.wait_for(sender.connect(conn), 60)
    return sender


def create_auth_key(port: int, transport: str = "intermediate") -> AuthKey:
    """Runs one handshake with Telethon and returns the key it made."""

    async def run():
        sender = await connect(port, transport)
        key = AuthKey(sender.auth_key.key)
        await sender.disconnect()
        return key

    return asyncio.run(run())


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Reads until EOF; returns everything the server sent before closing."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def intermediate_frame(payload: bytes, quick_ack: bool = False) -> bytes:
    length = len(payload) | (0x80000000 if quick_ack else 0)
    return struct.pack("<I", length) + payload


def raw_intermediate(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"\xee\xee\xee\xee")
    return sock
