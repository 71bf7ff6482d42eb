"""Helpers around Telethon 1.45's public classes, plus raw-socket framing for
the bad-input tests."""

import asyncio
import hashlib
import logging
import os
import socket
import struct
import time

from telethon.crypto import AES, AuthKey, rsa
from telethon.network import MTProtoSender
from telethon.network.mtprotostate import MTProtoState
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


def encrypt_client_message(key: AuthKey, salt: int, session_id: int, body: bytes, msg_id: int,
                           seq_no: int = 1) -> tuple[bytes, bytes]:
    """Encrypts like Telethon's MTProtoState, returning (frame payload, plaintext)."""
    data = struct.pack("<qqqii", salt, session_id, msg_id, seq_no, len(body)) + body
    padding = os.urandom(-(len(data) + 12) % 16 + 12)
    plaintext = data + padding
    state = MTProtoState(key, LOGGERS)
    msg_key = hashlib.sha256(key.key[88:120] + plaintext).digest()[8:24]
    aes_key, aes_iv = state._calc_key(key.key, msg_key, True)
    return struct.pack("<Q", key.key_id) + msg_key + AES.encrypt_ige(plaintext, aes_key, aes_iv), plaintext


class Session:
    """Hand-made encrypted messages of one MTProto session."""

    def __init__(self, key: AuthKey):
        self.key = key
        self.id = struct.unpack("<q", os.urandom(8))[0]
        self.salt = 0
        self.next_msg_id = int(time.time()) << 32
        self.content_sent = 0

    def seq_no(self, content_related: bool = True) -> int:
        """The next seq_no, counted as clients do: odd for content-related
        messages (each counts), even for the others."""
        if content_related:
            self.content_sent += 1
            return 2 * self.content_sent - 1
        return 2 * self.content_sent

    def message(self, body: bytes, content_related: bool = True) -> bytes:
        """A message with the next msg_id and seq_no."""
        self.next_msg_id += 4
        payload, _ = encrypt_client_message(self.key, self.salt, self.id, body, self.next_msg_id,
                                            self.seq_no(content_related))
        return payload

    def read(self, payload: bytes):
        state = MTProtoState(self.key, LOGGERS)
        state.id = self.id
        return state.decrypt_message_data(payload).obj

    def read_all(self, payload: bytes) -> list:
        """The objects of one server message, a container's unpacked."""
        obj = self.read(payload)
        if type(obj).__name__ == "MessageContainer":
            return [m.obj for m in obj.messages]
        return [obj]


def ping(ping_id: int) -> bytes:
    """The TL body of ping#7abe77ec."""
    return struct.pack("<Iq", 0x7ABE77EC, ping_id)


def recv_intermediate(sock: socket.socket) -> bytes:
    length = struct.unpack("<I", recv_exactly(sock, 4))[0]
    return recv_exactly(sock, length)
