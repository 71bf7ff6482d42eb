"""The reference session's rules for client msg_ids and seq_nos
(bad_msg_notification codes 19, 20, 32, 35, duplicates) and destroy_session,
with Telethon and with hand-made messages (mtclient.Session) that a real
client would not send."""

import asyncio
import struct

from telethon.tl.functions import DestroySessionRequest, PingRequest
from telethon.tl.types import BadMsgNotification, DestroySessionNone

from mtclient import (
    Session,
    connect,
    create_auth_key,
    encrypt_client_message,
    intermediate_frame,
    pin_server_key,
    ping,
    raw_intermediate,
    recv_intermediate,
)

MSG_CONTAINER = 0x73F1F8DC
DESTROY_SESSION = 0xE7512126
DESTROY_SESSION_OK = 0xE22045FC
DESTROY_SESSION_NONE = 0x62D350C9
# The session remembers this many msg_ids (reference::MSG_WINDOW).
MSG_WINDOW = 128


def container(messages: list[tuple[int, int, bytes]]) -> bytes:
    body = struct.pack("<II", MSG_CONTAINER, len(messages))
    for msg_id, seq_no, inner in messages:
        body += struct.pack("<qiI", msg_id, seq_no, len(inner)) + inner
    return body


class Raw:
    """One session on one raw connection, past its first bad_server_salt."""

    def __init__(self, port: int, session: Session):
        self.session = session
        self.sock = raw_intermediate(port)
        self.sock.settimeout(10)
        self.send(ping(0))
        salt = self.session.read(recv_intermediate(self.sock))
        assert type(salt).__name__ == "BadServerSalt"
        self.session.salt = salt.new_server_salt
        self.send(ping(1))
        assert [type(o).__name__ for o in self.replies()] == ["NewSessionCreated", "Pong"]

    def send(self, body: bytes, content_related: bool = True) -> bytes:
        payload = self.session.message(body, content_related)
        self.sock.sendall(intermediate_frame(payload))
        return payload

    def resend(self, payload: bytes) -> None:
        self.sock.sendall(intermediate_frame(payload))

    def replies(self) -> list:
        return self.session.read_all(recv_intermediate(self.sock))

    def next_id(self) -> int:
        self.session.next_msg_id += 4
        return self.session.next_msg_id

    def close(self) -> None:
        self.sock.close()


def names(objs: list) -> list[str]:
    return [type(o).__name__ for o in objs]


def test_a_replayed_message_is_not_processed_again(gateway):
    pin_server_key(gateway.public_key.read_text())
    raw = Raw(gateway.port, Session(create_auth_key(gateway.port)))
    try:
        first = raw.send(ping(7))
        assert [o.ping_id for o in raw.replies()] == [7]
        raw.resend(first)
        raw.send(ping(8))
        # The session handles a session's messages in order: had the replay
        # been answered, its pong would come first.
        assert [(type(o).__name__, o.ping_id) for o in raw.replies()] == [("Pong", 8)]
    finally:
        raw.close()


def test_a_container_reusing_a_msg_id_gets_19(gateway):
    pin_server_key(gateway.public_key.read_text())
    raw = Raw(gateway.port, Session(create_auth_key(gateway.port)))
    try:
        raw.send(ping(2))
        raw.replies()
        used = raw.session.next_msg_id
        inner = [(raw.next_id(), raw.session.seq_no(), ping(3))]
        body = container(inner)
        # The container takes the id of the ping already answered.
        payload, _ = encrypt_client_message(raw.session.key, raw.session.salt, raw.session.id, body,
                                            used, raw.session.seq_no(False))
        raw.resend(payload)
        [bad] = raw.replies()
        assert isinstance(bad, BadMsgNotification)
        assert (bad.bad_msg_id, bad.error_code) == (used, 19)
    finally:
        raw.close()


def test_a_msg_id_below_the_remembered_window_gets_20(gateway):
    """Within the 300 s time window but older than the last MSG_WINDOW ids:
    the session cannot tell whether it saw it."""
    pin_server_key(gateway.public_key.read_text())
    raw = Raw(gateway.port, Session(create_auth_key(gateway.port)))
    try:
        early = raw.session.next_msg_id - 2 * MSG_WINDOW * 4
        inner = [(raw.next_id(), raw.session.seq_no(), ping(100 + i)) for i in range(MSG_WINDOW)]
        raw.send(container(inner), content_related=False)
        pongs = []
        while len(pongs) < MSG_WINDOW:
            pongs += [o.ping_id for o in raw.replies() if type(o).__name__ == "Pong"]
        assert sorted(pongs) == list(range(100, 100 + MSG_WINDOW))
        payload, _ = encrypt_client_message(raw.session.key, raw.session.salt, raw.session.id, ping(9),
                                            early, 1)
        raw.resend(payload)
        [bad] = raw.replies()
        assert isinstance(bad, BadMsgNotification)
        assert (bad.bad_msg_id, bad.error_code) == (early, 20)
    finally:
        raw.close()


def test_seq_no_parity_and_order_are_checked(gateway):
    pin_server_key(gateway.public_key.read_text())
    raw = Raw(gateway.port, Session(create_auth_key(gateway.port)))
    try:
        # A ping (content-related) with an even seq_no: 35.
        raw.send(ping(4), content_related=False)
        [bad] = raw.replies()
        assert (bad.bad_msg_id, bad.error_code) == (raw.session.next_msg_id, 35)
        # A later ping reusing an earlier odd seq_no: 32.
        raw.session.content_sent -= 1
        raw.send(ping(5))
        [bad] = raw.replies()
        assert (bad.bad_msg_id, bad.error_code) == (raw.session.next_msg_id, 32)
        # The session goes on.
        raw.session.content_sent += 1
        raw.send(ping(6))
        assert [o.ping_id for o in raw.replies()] == [6]
    finally:
        raw.close()


def test_telethon_gets_32_and_its_ping_answered_and_destroy_session_answers(gateway):
    """Telethon answers code 32 by raising its seq_no and sending again."""
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        sender = await connect(gateway.port)
        codes = []
        handle = sender._handlers[BadMsgNotification.CONSTRUCTOR_ID]

        async def record(message):
            codes.append(message.obj.error_code)
            await handle(message)

        sender._handlers[BadMsgNotification.CONSTRUCTOR_ID] = record
        assert (await asyncio.wait_for(sender.send(PingRequest(1)), 20)).ping_id == 1
        # Telethon's own counter, wound back: its next ping reuses seq_no 1.
        sender._state._sequence = 0
        assert (await asyncio.wait_for(sender.send(PingRequest(2)), 20)).ping_id == 2
        # 32 for the ping (or for the container Telethon put it in with an ack).
        assert codes and set(codes) == {32}, codes
        # destroy_session: none for an id the session never saw.
        none = await asyncio.wait_for(sender.send(DestroySessionRequest(0x5EED)), 20)
        assert isinstance(none, DestroySessionNone) and none.session_id == 0x5EED
        await sender.disconnect()

    asyncio.run(scenario())


def test_destroy_session_ok_for_another_live_session_then_none(gateway):
    pin_server_key(gateway.public_key.read_text())
    key = create_auth_key(gateway.port)
    other = Raw(gateway.port, Session(key))
    raw = Raw(gateway.port, Session(key))
    try:
        target = other.session.id
        # The first call forgets the other session, the second finds none;
        # its own id gets none too (destroy_session is for other sessions).
        for session_id, expected in ((target, DESTROY_SESSION_OK), (target, DESTROY_SESSION_NONE),
                                     (raw.session.id, DESTROY_SESSION_NONE)):
            raw.send(struct.pack("<Iq", DESTROY_SESSION, session_id))
            [result] = raw.replies()
            assert type(result).__name__ == "RpcResult"
            assert result.req_msg_id == raw.session.next_msg_id
            assert struct.unpack_from("<Iq", result.body) == (expected, session_id)
    finally:
        other.close()
        raw.close()


GZIP_PACKED = 0x3072CFA1


def gzip_packed(body: bytes) -> bytes:
    """gzip_packed#3072cfa1 packed_data:bytes (TL bytes: a long length prefix, padded to 4)."""
    import gzip

    packed = gzip.compress(body, compresslevel=9)
    header = struct.pack("<I", GZIP_PACKED) + b"\xfe" + struct.pack("<I", len(packed))[:3]
    return header + packed + b"\0" * (-len(packed) % 4)


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_gzip_bomb_is_cut_at_the_frame_budget(gateway):
    """A container of 48 gzip_packed pings, each inflating to 4 MiB (192 MiB in all, about
    200 KiB on the wire): the session inflates at most limits.max_frame_bytes (1 MiB) of the
    whole message, so the gateway's peak memory barely moves, only the first ping (cut to
    the budget) is answered, and the connection goes on working."""
    pin_server_key(gateway.public_key.read_text())
    raw = Raw(gateway.port, Session(create_auth_key(gateway.port)))
    try:
        before = vm_hwm_kib(gateway.proc.pid)
        bomb = gzip_packed(ping(500) + b"\0" * (4 << 20))
        inner = [(raw.next_id(), raw.session.seq_no(), bomb) for _ in range(48)]
        raw.send(container(inner), content_related=False)
        raw.send(ping(501))
        answered = []
        while 501 not in answered:
            answered += [o.ping_id for o in raw.replies() if type(o).__name__ == "Pong"]
        assert answered == [500, 501], answered
        grown_mib = (vm_hwm_kib(gateway.proc.pid) - before) / 1024
        assert grown_mib < 64, f"peak memory grew {grown_mib:.0f} MiB for a 192 MiB bomb"
    finally:
        raw.close()
