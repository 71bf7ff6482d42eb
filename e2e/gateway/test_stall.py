"""One client that stops reading hurts only itself.

A real gateway (embedded session, and unary mode in front of a separate
`mtproto-session` process) with small limits; 50 well-behaved clients
(hand-made MTProto sessions over raw TCP, threads) ping through it while one
client creates a key, shrinks its receive buffer, asks for ~5 MiB of replies
(`msgs_state_req` for 8192 ids in `gzip_packed`: ~120 bytes in, an 8 KiB
`msgs_state_info` out) and never reads. Every ping of the others must get its
pong while that client is stalled; the gateway closes the stalled connection
after `write_timeout_secs` without progress (`write_failed`) and counts the
replies it could not deliver (`outbox_full` / `connection_closed`)."""

import asyncio
import gzip
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from telethon.crypto import AuthKey

from conftest import free_port, start_gateway, start_session
from mtclient import Session, connect, intermediate_frame, pin_server_key, ping, recv_intermediate

MODES = ["embedded", "unary"]
CLIENTS = 50
KEYS = 10  # the 50 clients are 5 MTProto sessions (own connection, own session id) per key
WRITE_TIMEOUT = 3
OUTBOX = 16
PING_TIMEOUT = 10.0  # generous: a ping without its pong this long is lost
STALL_MESSAGES = int(__import__("os").environ.get("XFLOOD", "640"))  # x ~8.2 KiB of replies each
STALL_RCVBUF = 4096
# The stalled connection must be closed this long after its requests were sent.
CLOSE_MARGIN = 9.0

MSGS_STATE_REQ = 0xDA69FB52
GZIP_PACKED = 0x3072CFA1
VECTOR = 0x1CB5C415


def tl_bytes(data: bytes) -> bytes:
    if len(data) < 254:
        out = bytes([len(data)]) + data
    else:
        out = b"\xfe" + len(data).to_bytes(3, "little") + data
    return out + bytes(-len(out) % 4)


def big_reply_request() -> bytes:
    """gzip_packed(msgs_state_req with 8192 msg_ids): ~120 bytes whose answer
    (msgs_state_info, one byte per id) is ~8 KiB."""
    inner = struct.pack("<IIi", MSGS_STATE_REQ, VECTOR, 8192) + bytes(8 * 8192)
    return struct.pack("<I", GZIP_PACKED) + tl_bytes(gzip.compress(inner, 9))


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


def write_failed(admin_port: int) -> float:
    return counter(scrape(admin_port), "mtproto_connections_closed", reason="write_failed")


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
        "handshakes_per_ip_per_minute = 10000\n"
    )
    extra = ["--config", str(config)]
    session = None
    if mode == "unary":
        session = start_session(tmp_path)
        extra += ["--session-mode", "unary", "--grpc-listen", f"127.0.0.1:{free_port()}",
                  "--session", f"grpc://127.0.0.1:{session.port}"]
    gateway = start_gateway(tmp_path, extra)
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
    """n auth keys from Telethon handshakes, a few at a time."""

    async def one():
        sender = await connect(port, "intermediate")
        key = AuthKey(sender.auth_key.key)
        await sender.disconnect()
        return key

    async def run():
        return await asyncio.gather(*[one() for _ in range(n)])

    return asyncio.run(run())


def open_raw(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(PING_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"\xee\xee\xee\xee")
    return sock


class Pinger:
    """A well-behaved client: one connection, one session, sequential pings."""

    def __init__(self, port: int, key: AuthKey, index: int):
        self.index = index
        self.session = Session(key)
        self.sock = open_raw(port)
        self.results: list[tuple[float, float]] = []  # (sent at, round trip)
        self.error: str | None = None
        self.next_ping = index * 1_000_000
        self.other: list = []

    def ping_once(self) -> None:
        self.next_ping += 1
        ping_id = self.next_ping
        sent = time.monotonic()
        deadline = sent + PING_TIMEOUT
        self.sock.sendall(intermediate_frame(self.session.message(ping(ping_id))))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no pong for ping {ping_id} in {PING_TIMEOUT}s")
            self.sock.settimeout(left)
            for obj in self.session.read_all(recv_intermediate(self.sock)):
                name = type(obj).__name__
                if name == "BadServerSalt":
                    self.session.salt = obj.new_server_salt
                    self.sock.sendall(intermediate_frame(self.session.message(ping(ping_id))))
                elif name == "Pong" and obj.ping_id == ping_id:
                    self.results.append((sent, time.monotonic() - sent))
                    return
                else:
                    self.other.append((time.monotonic(), ping_id, repr(obj)[:200]))

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.ping_once()
        except Exception as e:  # noqa: BLE001 - recorded and asserted on
            self.error = f"client {self.index}: {type(e).__name__}: {e}"

    def close(self) -> None:
        self.sock.close()


def drained_to_eof(sock: socket.socket, timeout: float) -> tuple[str, int]:
    """Reads what the gateway left in flight; ("eof"|"reset"|"timeout", bytes)."""
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

    pingers = [Pinger(gateway.port, keys[i % KEYS], i) for i in range(CLIENTS)]
    stalled = None
    try:
        for p in pingers:  # every session is set up (salt, new_session_created) before the stall
            p.ping_once()
        warmed = time.monotonic()

        # The stalled client: a tiny receive window, a salt, then ~5 MiB of
        # replies asked for and never read.
        stalled = open_raw(gateway.port, rcvbuf=STALL_RCVBUF)
        session = Session(stalled_key)
        stalled.sendall(intermediate_frame(session.message(ping(1))))
        session.salt = session.read(recv_intermediate(stalled)).new_server_salt
        request = big_reply_request()
        flood = b"".join(intermediate_frame(session.message(request)) for _ in range(STALL_MESSAGES))

        stop = threading.Event()
        threads = [threading.Thread(target=p.run, args=(stop,), daemon=True) for p in pingers]
        for t in threads:
            t.start()
        time.sleep(0.3)

        blast: dict = {}

        def send_flood():
            blast["start"] = time.monotonic()
            try:
                stalled.settimeout(WRITE_TIMEOUT + CLOSE_MARGIN)
                stalled.sendall(flood)
                blast["outcome"] = "sent"
            except OSError as e:  # the gateway may close it mid-flood, or stop reading it
                blast["outcome"] = f"{type(e).__name__}: {e}"
            blast["done"] = time.monotonic()

        sender = threading.Thread(target=send_flood, daemon=True)
        sender.start()

        # Until the gateway closes the stalled connection (bounded), plus a
        # second of pings after it.
        closed_at = None
        limit = time.monotonic() + WRITE_TIMEOUT + CLOSE_MARGIN + 3
        while time.monotonic() < limit and closed_at is None:
            if write_failed(gateway.admin_port) >= 1:
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
        eof = drained_to_eof(stalled, 10.0) if closed_at is not None else ("not closed", 0)
        metrics = scrape(gateway.admin_port)
    finally:
        for p in pingers:
            p.close()
        if stalled:
            stalled.close()

    rtts = [rtt for p in pingers for _, rtt in p.results]
    errors = [p.error for p in pingers if p.error]
    blast_start = blast.get("start", 0.0)
    during = [sum(1 for sent, _ in p.results if blast_start <= sent <= (closed_at or sent))
              for p in pingers]
    dropped = {r: counter(metrics, "mtproto_server_messages_dropped", reason=r)
               for r in ("outbox_full", "connection_closed", "not_written")}
    summary = (
        f"mode={gateway.mode} setup={warmed - started:.1f}s pings={len(rtts)} "
        f"max_rtt={max(rtts, default=0):.2f}s errors={len(errors)} hung={hung} "
        f"flood={blast.get('outcome')} after {blast.get('done', 0) - blast_start:.1f}s "
        f"closed_after={None if closed_at is None else round(closed_at - blast_start, 1)}s "
        f"stalled_socket={eof} dropped={dropped} "
        f"min_pings_during_stall={min(during)} total={time.monotonic() - started:.1f}s"
    )
    print(summary)

    # The others were served throughout: no ping lost or late, none stuck.
    assert not hung, summary
    assert not errors, summary + "\n" + "\n".join(errors[:5])
    assert all(n >= 1 for n in during), summary
    # The stalled connection was closed for its writes, in time...
    assert closed_at is not None, summary
    assert closed_at - blast.get("done", closed_at) <= WRITE_TIMEOUT + CLOSE_MARGIN, summary
    assert eof[0] in ("eof", "reset"), summary
    assert counter(metrics, "mtproto_connections_closed", reason="write_failed") >= 1, summary
    # ... and what it could not take was reported undelivered.
    assert dropped["outbox_full"] + dropped["connection_closed"] > 0, summary
