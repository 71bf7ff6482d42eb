"""A real client (Telethon 1.45) against the gateway on every transport it has."""

import asyncio
import hashlib
import os
import struct

import pytest
from telethon.crypto import AuthKey
from telethon.errors import AuthKeyNotFound, RPCError
from telethon.network.mtprotostate import MTProtoState
from telethon.tl.functions import (
    GetFutureSaltsRequest,
    InitConnectionRequest,
    InvokeWithLayerRequest,
    PingDelayDisconnectRequest,
    PingRequest,
)
from telethon.tl.functions.help import GetConfigRequest
from telethon.tl.types import FutureSalts

from mtclient import (
    LOGGERS,
    TRANSPORTS,
    closed_by_server,
    connect,
    create_auth_key,
    Session,
    encrypt_client_message,
    intermediate_frame,
    pin_server_key,
    ping,
    raw_intermediate,
    recv_exactly,
    recv_intermediate,
)

API_NOT_SERVED = "API_METHOD_NOT_SERVED_BY_REFERENCE_SESSION"


def api_call(padding: str = "") -> InvokeWithLayerRequest:
    return InvokeWithLayerRequest(
        200,
        InitConnectionRequest(1, "e2e" + padding, "linux", "1.0", "en", "", "en", GetConfigRequest()),
    )


async def pings_and_rpc_error(sender) -> None:
    """A fresh key, two kinds of ping answered, and an API call refused by the reference session."""
    assert len(sender.auth_key.key) == 256
    pong = await asyncio.wait_for(sender.send(PingRequest(0x1234)), 20)
    assert pong.ping_id == 0x1234
    pong = await asyncio.wait_for(sender.send(PingDelayDisconnectRequest(77, 75)), 20)
    assert pong.ping_id == 77
    with pytest.raises(RPCError) as err:
        await asyncio.wait_for(sender.send(api_call()), 20)
    assert err.value.code == 400
    assert API_NOT_SERVED in err.value.message


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_handshake_ping_and_rpc_error(gateway, transport):
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        sender = await connect(gateway.port, transport)
        try:
            await pings_and_rpc_error(sender)
        finally:
            await sender.disconnect()

    asyncio.run(scenario())


def test_container_gzip_and_future_salts(gateway):
    """Several requests at once travel in one msg_container; a large one gzip_packed."""
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        sender = await connect(gateway.port, "obfuscated_intermediate")
        try:
            futures = [sender.send(PingRequest(i)) for i in range(5)]
            futures.append(sender.send(api_call(padding="x" * 4000)))
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 20)
            assert [r.ping_id for r in results[:5]] == list(range(5))
            assert isinstance(results[5], RPCError) and results[5].code == 400
            salts = await asyncio.wait_for(sender.send(GetFutureSaltsRequest(3)), 20)
            assert isinstance(salts, FutureSalts) and len(salts.salts) == 3
            assert salts.salts[0].salt == sender._state.salt
        finally:
            await sender.disconnect()

    asyncio.run(scenario())


def test_reconnect_reuses_the_auth_key_without_a_handshake(gateway):
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        first = await connect(gateway.port, "abridged")
        key = AuthKey(first.auth_key.key)
        await first.disconnect()
        for transport in ("full", "obfuscated_padded"):
            again = await connect(gateway.port, transport, auth_key=key)
            try:
                pong = await asyncio.wait_for(again.send(PingRequest(9)), 20)
                assert pong.ping_id == 9
            finally:
                await again.disconnect()

    asyncio.run(scenario())
    created = gateway.log_text().count("auth key created")
    assert created >= 1


def test_unknown_auth_key_gets_transport_error_404(gateway):
    async def scenario():
        sender = await connect(gateway.port, "intermediate", auth_key=AuthKey(os.urandom(256)))
        with pytest.raises(AuthKeyNotFound):
            await asyncio.wait_for(sender.send(PingRequest(1)), 20)
        await sender.disconnect()

    asyncio.run(scenario())


def test_new_session_created_comes_with_the_first_accepted_message(gateway):
    """A session whose first message is refused for its salt (bad_server_salt)
    still gets new_session_created: with its first accepted message, once."""
    pin_server_key(gateway.public_key.read_text())
    session = Session(create_auth_key(gateway.port))
    sock = raw_intermediate(gateway.port)
    try:
        sock.sendall(intermediate_frame(session.message(ping(1))))
        bad = session.read(recv_intermediate(sock))
        assert type(bad).__name__ == "BadServerSalt"
        session.salt = bad.new_server_salt
        sock.sendall(intermediate_frame(session.message(ping(2))))
        created, pong = session.read_all(recv_intermediate(sock))
        assert type(created).__name__ == "NewSessionCreated"
        assert created.first_msg_id == session.next_msg_id
        assert created.server_salt == session.salt
        assert pong.ping_id == 2
        sock.sendall(intermediate_frame(session.message(ping(3))))
        assert [type(r).__name__ for r in session.read_all(recv_intermediate(sock))] == ["Pong"]
    finally:
        sock.close()


def test_quick_ack_token_is_over_the_plaintext(gateway):
    """The client asks for a QuickAck; the 4 bytes that come back first must be
    the token tdlib and Telethon compute: SHA256(auth_key[88:120] + plaintext)[0:4] | 2^31."""
    pin_server_key(gateway.public_key.read_text())

    key = create_auth_key(gateway.port)
    sock = raw_intermediate(gateway.port)
    try:
        import time

        msg_id = int(time.time()) << 32
        ping = struct.pack("<Iq", 0x7ABE77EC, 5)
        payload, plaintext = encrypt_client_message(key, 0, 42, ping, msg_id)
        sock.sendall(intermediate_frame(payload, quick_ack=True))
        token = struct.unpack("<I", recv_exactly(sock, 4))[0]
        expected = struct.unpack("<I", hashlib.sha256(key.key[88:120] + plaintext).digest()[:4])[0] | 0x80000000
        assert token == expected
        # Then an encrypted reply (bad_server_salt for salt 0) that the client can decrypt.
        length = struct.unpack("<I", recv_exactly(sock, 4))[0]
        reply = recv_exactly(sock, length)
        state = MTProtoState(key, LOGGERS)
        state.id = 42
        message = state.decrypt_message_data(reply)
        assert type(message.obj).__name__ == "BadServerSalt"
    finally:
        sock.close()


def test_a_connection_is_bound_to_one_key(gateway):
    pin_server_key(gateway.public_key.read_text())

    first, second = create_auth_key(gateway.port), create_auth_key(gateway.port)
    import time

    sock = raw_intermediate(gateway.port)
    try:
        payload, _ = encrypt_client_message(first, 0, 1, struct.pack("<Iq", 0x7ABE77EC, 1), int(time.time()) << 32)
        sock.sendall(intermediate_frame(payload))
        length = struct.unpack("<I", recv_exactly(sock, 4))[0]
        recv_exactly(sock, length)
        payload, _ = encrypt_client_message(second, 0, 1, struct.pack("<Iq", 0x7ABE77EC, 2), (int(time.time()) << 32) + 4)
        sock.sendall(intermediate_frame(payload))
        assert closed_by_server(sock) == b""
    finally:
        sock.close()
