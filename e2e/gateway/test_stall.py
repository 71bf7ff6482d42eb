"""One client that stops reading hurts only itself.

A real gateway (embedded session, and unary mode in front of a separate
`mtproto-session` process) with small limits: `write_timeout_secs = 8`,
`outbox_capacity = 16`, and `max_frame_bytes` low enough that a connection
holds at most 256 KiB of unwritten bytes. 50 well-behaved clients
(hand-made MTProto sessions over raw TCP, one thread each) ping through it
while one client creates a key, shrinks its socket receive buffer, asks for
more replies than every buffer on the way can hold (containers of
`help.getConfig`, which the reference session answers with as many
`rpc_error`s: ~20 KiB of replies per 5 KiB sent) and never reads.

Every ping of the others must get its pong within PING_TIMEOUT (generous,
but shorter than the write timeout: a gateway whose delivery waits on the
stalled socket holds up the sessions that share the stalled session's worker
in the reference session for that long, and those pings are lost), the
stalled connection must be closed for its writes (`write_failed`) within the
write timeout and a margin, and the replies it could not take must be counted
as dropped (`outbox_full` / `connection_closed`)."""

import asyncio
import ctypes
import hashlib
import math
import os
import socket
import struct
import threading
import time
import urllib.request

import pytest
from telethon.crypto import AES, AuthKey, libssl
from telethon.network.mtprotostate import MTProtoState

from conftest import free_port, start_gateway, start_session
from mtclient import LOGGERS, Session, connect, intermediate_frame, pin_server_key, ping, recv_intermediate

MODES = ["embedded", "unary"]
CLIENTS = 50
# Handshakes cost Telethon ~0.2 s of Python each, so the 50 clients are 5
# MTProto sessions (own connection, own session id) on each of 10 keys.
KEYS = 10
# A ping without its pong this long counts as lost: generous for a loaded
# machine, yet shorter than the write timeout (and than a session's 5 s
# delivery call), the time a delivery that waits on the stalled client's
# socket would hold up the other sessions sharing its session worker.
PING_TIMEOUT = 4.0
PING_INTERVAL = 0.1  # between a pong and the next ping, per client: ~500 pings/s offered, not saturating

WRITE_TIMEOUT = 8
OUTBOX = 16
MAX_FRAME = 128 * 1024  # unsent bytes per connection: max(256 KiB, max_frame_bytes)
UNSENT_BYTES = 256 * 1024
STALL_RCVBUF = 4096
STALL_MSS = 1024
CALLS_PER_CONTAINER = 250
REPLY_BYTES = 80 * CALLS_PER_CONTAINER  # container item header + rpc_result(rpc_error 400 ...)
FLOOD_SECONDS = 2.0  # paced, so the session's worker for that session never holds seconds of backlog
CLOSE_MARGIN = 9.0  # closed at most WRITE_TIMEOUT + this after the last request was sent

MSG_CONTAINER = 0x73F1F8DC
HELP_GET_CONFIG = 0xC4F9186B


def stalled_socket() -> socket.socket:
    """A client socket that keeps the gateway's side small: a tiny receive
    window, and a small MSS so the kernel does not grow the gateway's send
    buffer to megabytes (loopback's 64 KiB MSS lets it reach tcp_wmem's max)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALL_RCVBUF)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALL_MSS)
    except (AttributeError, OSError):
        pass
    return sock


def kernel_buffering() -> int:
    """Bytes a loopback sender can queue toward a `stalled_socket()` that never
    reads, measured here (a sender writes until it makes no progress)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with stalled_socket() as client:
            client.connect(server.getsockname())
            peer, _ = server.accept()
            with peer:
                peer.setblocking(False)
                total, chunk, last = 0, bytes(65536), time.monotonic()
                while time.monotonic() - last < 0.3:
                    try:
                        total += peer.send(chunk)
                        last = time.monotonic()
                    except BlockingIOError:
                        time.sleep(0.01)
                return total


def flood_containers(buffered: int) -> int:
    """Enough containers to fill the kernel's buffers (twice what was
    measured), the connection's unsent budget and its outbox, and then some
    that can only be dropped."""
    needed = 2 * buffered + UNSENT_BYTES + (OUTBOX + 16) * REPLY_BYTES
    return math.ceil(needed / REPLY_BYTES)


def fast_ige_encrypt(data: bytes, key: bytes, iv: bytes) -> bytes:
    """AES-256-IGE through the libssl Telethon loaded, without Telethon's
    per-byte ctypes copies (the flood is megabytes); Telethon's own otherwise."""
    lib = getattr(libssl, "_libssl", None)
    if lib is None:
        return AES.encrypt_ige(data, key, iv)
    aes_key = libssl.AES_KEY()
    lib.AES_set_encrypt_key(key, ctypes.c_int(256), ctypes.byref(aes_key))
    out = ctypes.create_string_buffer(len(data))
    lib.AES_ige_encrypt(data, out, ctypes.c_size_t(len(data)), ctypes.byref(aes_key),
                        ctypes.create_string_buffer(iv, 32), ctypes.c_int(1))
    return out.raw


def encrypt_fast(session: Session, body: bytes, content_related: bool = True) -> bytes:
    """`Session.message(body)` (MTProto 2.0, client to server) with fast_ige_encrypt."""
    session.next_msg_id += 4
    key = session.key
    seq_no = session.seq_no(content_related)
    data = struct.pack("<qqqii", session.salt, session.id, session.next_msg_id, seq_no, len(body)) + body
    plaintext = data + os.urandom(-(len(data) + 12) % 16 + 12)
    msg_key = hashlib.sha256(key.key[88:120] + plaintext).digest()[8:24]
    aes_key, aes_iv = MTProtoState(key, LOGGERS)._calc_key(key.key, msg_key, True)
    return struct.pack("<Q", key.key_id) + msg_key + fast_ige_encrypt(plaintext, aes_key, aes_iv)


def api_call_container(session: Session) -> bytes:
    """One encrypted msg_container of CALLS_PER_CONTAINER help.getConfig calls
    (~5 KiB). The reference session serves no API method: it answers with one
    container of as many rpc_result(rpc_error 400) (~20 KiB), cheap for the
    session, large for the connection."""
    body = struct.pack("<II", MSG_CONTAINER, CALLS_PER_CONTAINER)
    for _ in range(CALLS_PER_CONTAINER):
        session.next_msg_id += 4
        body += struct.pack("<qiII", session.next_msg_id, session.seq_no(), 4, HELP_GET_CONFIG)
    return encrypt_fast(session, body, content_related=False)


def counter(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` (or `name_total`) with these labels; 0 if none."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        base, _, label_text = series.partition("{")
        if base in (name, name + "_total") and all(w in label_text for w in wanted):
            total += float(value)
    return total


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


@pytest.fixture(params=MODES)
def stall_gateway(request, tmp_path):
    mode = request.param
    admin = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'admin_listen = "127.0.0.1:{admin}"\n'
        "[limits]\n"
        f"write_timeout_secs = {WRITE_TIMEOUT}\n"
        f"outbox_capacity = {OUTBOX}\n"
        f"max_frame_bytes = {MAX_FRAME}\n"
        "handshakes_per_ip_per_minute = 10000\n"
    )
    extra = ["--config", str(config)]
    session = None
    if mode == "unary":
        session = start_session(tmp_path)
        extra += ["--session-mode", "unary", "--grpc-listen", f"127.0.0.1:{free_port()}",
                  "--session", f"grpc://127.0.0.1:{session.port}"]
    try:
        gateway = start_gateway(tmp_path, extra)
    except Exception:
        if session:
            session.stop()
        raise
    gateway.admin_port = admin
    gateway.mode = mode
    try:
        yield gateway
        assert gateway.alive(), "gateway died:\n" + gateway.log_text()[-3000:]
    finally:
        gateway.stop()
        if session:
            session.stop()


def create_keys(port: int, n: int) -> list[AuthKey]:
    """n auth keys from concurrent Telethon handshakes."""

    async def one():
        sender = await connect(port, "intermediate")
        key = AuthKey(sender.auth_key.key)
        await sender.disconnect()
        return key

    async def run():
        return await asyncio.gather(*[one() for _ in range(n)])

    return asyncio.run(run())


def open_raw(port: int) -> socket.socket:
    """An intermediate-transport connection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(PING_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"\xee\xee\xee\xee")
    return sock


class Pinger:
    """A well-behaved client: one connection, one session, one ping at a time."""

    def __init__(self, port: int, key: AuthKey, index: int):
        self.index = index
        self.session = Session(key)
        self.sock = open_raw(port)
        self.results: list[tuple[float, float]] = []  # (sent at, round trip)
        self.unexpected: list[str] = []
        self.error: str | None = None
        self.next_ping = index * 1_000_000

    def ping_once(self) -> None:
        self.next_ping += 1
        ping_id = self.next_ping
        sent = time.monotonic()
        deadline = sent + PING_TIMEOUT
        self.sock.sendall(intermediate_frame(self.session.message(ping(ping_id))))
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise socket.timeout
                self.sock.settimeout(left)
                objects = self.session.read_all(recv_intermediate(self.sock))
            except socket.timeout:
                raise TimeoutError(f"no pong for ping {ping_id} (#{len(self.results) + 1}) in "
                                   f"{PING_TIMEOUT}s; other replies: {self.unexpected[-3:]}") from None
            for obj in objects:
                name = type(obj).__name__
                if name == "BadServerSalt":  # the first message of a session
                    self.session.salt = obj.new_server_salt
                    self.sock.sendall(intermediate_frame(self.session.message(ping(ping_id))))
                elif name == "Pong" and obj.ping_id == ping_id:
                    self.results.append((sent, time.monotonic() - sent))
                    return
                elif name != "NewSessionCreated":
                    self.unexpected.append(repr(obj)[:160])

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(PING_INTERVAL):
                self.ping_once()
        except Exception as e:  # noqa: BLE001 - recorded and asserted on
            self.error = f"client {self.index}: {type(e).__name__}: {e}"

    def close(self) -> None:
        self.sock.close()


def read_to_eof(sock: socket.socket, timeout: float) -> tuple[str, int]:
    """Reads what the gateway left in flight: ("eof" | "reset" | "timeout", bytes read)."""
    deadline = time.monotonic() + timeout
    total = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout", total
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            return "reset", total
        except socket.timeout:
            return "timeout", total
        if not chunk:
            return "eof", total
        total += len(chunk)


def test_a_client_that_stops_reading_hurts_only_itself(stall_gateway):
    gateway = stall_gateway
    started = time.monotonic()
    pin_server_key(gateway.public_key.read_text())
    keys = create_keys(gateway.port, KEYS + 1)
    stalled_key = keys.pop()

    pingers: list[Pinger] = []
    stalled = None
    blast: dict = {}
    closed_at = None
    try:
        pingers = [Pinger(gateway.port, keys[i % KEYS], i) for i in range(CLIENTS)]
        for p in pingers:  # every session set up (salt, new_session_created) before the stall
            p.ping_once()
        warmed = time.monotonic()

        # The stalled client: a tiny receive window, a salt, then far more
        # replies asked for than can be buffered, and nothing read.
        buffered = kernel_buffering()
        stalled = stalled_socket()
        stalled.settimeout(PING_TIMEOUT)
        stalled.connect(("127.0.0.1", gateway.port))
        stalled.sendall(b"\xee\xee\xee\xee")
        session = Session(stalled_key)
        stalled.sendall(intermediate_frame(session.message(ping(1))))
        session.salt = session.read(recv_intermediate(stalled)).new_server_salt
        flood = [intermediate_frame(api_call_container(session)) for _ in range(flood_containers(buffered))]

        stop = threading.Event()
        threads = [threading.Thread(target=p.run, args=(stop,), daemon=True) for p in pingers]
        for t in threads:
            t.start()
        time.sleep(0.3)

        def send_flood():
            start = blast["start"] = time.monotonic()
            stalled.settimeout(WRITE_TIMEOUT + CLOSE_MARGIN)
            try:
                for i, frame in enumerate(flood):
                    delay = start + FLOOD_SECONDS * i / len(flood) - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    stalled.sendall(frame)
                    blast["sent"] = i + 1
                blast["outcome"] = "all sent"
            except OSError as e:  # closed by the gateway mid-flood, or not read any more
                blast["outcome"] = f"{type(e).__name__}: {e}"
            blast["done"] = time.monotonic()

        sender = threading.Thread(target=send_flood, daemon=True)
        sender.start()

        # Until the gateway closes the stalled connection (bounded), then a
        # second more of pings.
        limit = time.monotonic() + FLOOD_SECONDS + WRITE_TIMEOUT + CLOSE_MARGIN + 3
        while time.monotonic() < limit and closed_at is None:
            text = scrape(gateway.admin_port)
            if counter(text, "mtproto_connections_closed", reason="write_failed") >= 1:
                closed_at = time.monotonic()
            else:
                time.sleep(0.1)
        if closed_at is not None:
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(PING_TIMEOUT + 5)
        sender.join(WRITE_TIMEOUT + CLOSE_MARGIN + 5)
        hung = [p.index for p, t in zip(pingers, threads) if t.is_alive()]
        stalled_end = read_to_eof(stalled, 10.0) if closed_at is not None else ("not closed", 0)
        metrics = scrape(gateway.admin_port)
    finally:
        for p in pingers:
            p.close()
        if stalled:
            stalled.close()

    rtts = [rtt for p in pingers for _, rtt in p.results]
    errors = [p.error for p in pingers if p.error]
    blast_start = blast.get("start", 0.0)
    during_stall = [sum(1 for sent, _ in p.results if blast_start <= sent <= (closed_at or sent))
                    for p in pingers]
    dropped = {r: counter(metrics, "mtproto_server_messages_dropped", reason=r)
               for r in ("outbox_full", "connection_closed", "not_written")}
    summary = (
        f"mode={gateway.mode} setup={warmed - started:.1f}s pings={len(rtts)} "
        f"max_rtt={max(rtts, default=0):.2f}s over_1s={sum(r > 1 for r in rtts)} "
        f"clients_over_1s={[p.index for p in pingers if any(r > 1 for _, r in p.results)]} "
        f"errors={len(errors)} hung={hung} flood={blast.get('sent')}/{len(flood)} "
        f"({blast.get('outcome')}) in {blast.get('done', 0) - blast_start:.1f}s "
        f"closed_after={None if closed_at is None else round(closed_at - blast_start, 1)}s "
        f"kernel_buffering={buffered} stalled_socket={stalled_end} dropped={dropped} "
        f"min_pings_during_stall={min(during_stall)} total={time.monotonic() - started:.1f}s"
    )
    print(summary)

    # The others were served throughout: no ping lost or late, no client stuck,
    # every client answered while the stalled one was stalled.
    assert not hung, summary
    assert not errors, summary + "\n" + "\n".join(errors[:5])
    assert all(n >= 1 for n in during_stall), summary
    # The stalled connection was closed for its writes, in time ...
    assert closed_at is not None, summary
    assert closed_at - blast.get("done", closed_at) <= WRITE_TIMEOUT + CLOSE_MARGIN, summary
    assert stalled_end[0] in ("eof", "reset"), summary
    assert counter(metrics, "mtproto_connections_closed", reason="write_failed") >= 1, summary
    # ... and what it could not take was reported undelivered.
    assert dropped["outbox_full"] + dropped["connection_closed"] > 0, summary
