"""Gateway-wide budgets against a real gateway and many loopback addresses
(Linux routes all of 127.0.0.0/8 to lo, so each client socket binds its own
127.x.y.z): bytes buffered in partial frames, the frame deadline,
handshakes in progress, and the msg_id rule of unencrypted messages."""

import asyncio
import resource
import select
import socket
import struct
import threading
import time

import pytest
from telethon.tl.functions import PingRequest

from conftest import free_port, limited_gateway
from mtclient import (
    Session, closed_by_server, connect, create_auth_key, intermediate_frame, pin_server_key, ping,
    recv_exactly, recv_intermediate,
)
from promtext import metric, scrape
from test_http import post, start_http_gateway

REQ_PQ_MULTI = 0xBE7E8EF1
FLOOD = struct.pack("<Ii", 4, -429)


def budget_gateway(tmp_path_factory, name: str, limits: str):
    admin = free_port()
    return limited_gateway(tmp_path_factory, name, limits, ["--admin-listen", f"127.0.0.1:{admin}"]), admin


def address(i: int, net: int) -> str:
    """The i-th client address of 127.net.0.0/16 (250 per /24)."""
    return f"127.{net}.{i // 250}.{i % 250 + 1}"


def open_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def req_pq_multi(msg_id: int | None = None) -> bytes:
    body = struct.pack("<I", REQ_PQ_MULTI) + bytes(range(16))
    if msg_id is None:
        msg_id = int(time.time()) << 32
    return struct.pack("<qqI", 0, msg_id, len(body)) + body


def raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < n:
        pytest.skip(f"needs {n} file descriptors")


def gauge(admin: int, name: str) -> float:
    return metric(scrape(admin), name)


def limit_exceeded(admin: int, limit: str) -> float:
    try:
        return metric(scrape(admin), "mtproto_limit_exceeded", limit=limit)
    except AssertionError:
        return 0


def closed(admin: int, reason: str) -> float:
    try:
        return metric(scrape(admin), "mtproto_connections_closed", reason=reason)
    except AssertionError:
        return 0


TRICKLERS = 2000
# Each trickler starts a 512 KiB frame and sends 1,000 bytes of it at once:
# 2,000 of them ask for about 2 MB, twice the budget.
BUDGET = 1 << 20
FRAME_TIMEOUT = 6


@pytest.fixture(scope="module")
def trickle_gateway(tmp_path_factory):
    gw, admin = budget_gateway(
        tmp_path_factory, "trickle",
        f"max_buffered_bytes = {BUDGET}\nframe_timeout_secs = {FRAME_TIMEOUT}\n"
        "handshake_timeout_secs = 120\nidle_timeout_secs = 120\n")
    yield gw, admin
    assert gw.alive(), gw.log_text()[-4000:]
    gw.stop()


def test_trickling_partial_frames_stay_within_the_budget_and_meet_the_deadline(trickle_gateway):
    gw, admin = trickle_gateway
    raise_fd_limit(TRICKLERS + 1000)
    start = b"\xee\xee\xee\xee" + struct.pack("<I", 512 << 10) + bytes(996)
    socks = []
    peak = 0
    began = time.monotonic()
    for i in range(TRICKLERS):
        sock = open_from(address(i, 10), gw.port)
        sock.sendall(start)
        socks.append(sock)
        if i % 200 == 199:
            peak = max(peak, gauge(admin, "mtproto_buffered_bytes"))
    opened_in = time.monotonic() - began
    # Trickle a byte per connection while the deadline runs: it does not move.
    for _ in range(3):
        for sock in socks:
            try:
                sock.send(b"\0")
            except OSError:
                pass
        peak = max(peak, gauge(admin, "mtproto_buffered_bytes"))
        time.sleep(0.5)
    assert 0 < peak <= BUDGET, peak
    assert limit_exceeded(admin, "max_buffered_bytes") > 0, "2 MB of partial frames must pass a 1 MiB budget"

    # Every connection ends: -429 for those the budget refused, a plain close
    # at the frame deadline for the rest.
    got = []
    poller = select.poll()
    pending = {s.fileno(): s for s in socks}
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + FRAME_TIMEOUT + opened_in + 30
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(500):
            poller.unregister(fd)
            got.append(closed_by_server(pending.pop(fd), timeout=5))
    assert not pending, f"{len(pending)} trickling connections still open"
    assert set(got) <= {b"", FLOOD}, {a for a in got if a not in (b"", FLOOD)}
    refused, timed_out = got.count(FLOOD), got.count(b"")
    print(f"{TRICKLERS} trickling connections opened in {opened_in:.1f} s; buffered peak {peak:.0f} B; "
          f"{refused} refused by the budget, {timed_out} closed at the frame deadline")
    assert refused > 0 and timed_out > 0
    assert limit_exceeded(admin, "max_buffered_bytes") == refused
    assert closed(admin, "buffer_budget") == refused
    assert closed(admin, "frame_timeout") == timed_out
    assert limit_exceeded(admin, "frame_timeout_secs") == timed_out
    for sock in socks:
        sock.close()
    assert gauge(admin, "mtproto_buffered_bytes") == 0


def test_a_frame_completed_in_time_is_served(trickle_gateway):
    """The budget and the deadline leave an ordinary client alone: a frame
    sent in two pieces is answered."""
    gw, _ = trickle_gateway
    sock = open_from("127.10.200.1", gw.port)
    frame = intermediate_frame(req_pq_multi())
    sock.sendall(b"\xee\xee\xee\xee" + frame[:10])
    time.sleep(0.5)
    sock.sendall(frame[10:])
    (length,) = struct.unpack("<I", recv_exactly(sock, 4))
    assert length > 20
    sock.close()


CAP = 8
FLOODERS = 16


def test_handshake_flood_stays_at_the_cap_and_telethon_gets_through(tmp_path_factory):
    gw, admin = budget_gateway(
        tmp_path_factory, "flood",
        f"max_handshakes_in_progress = {CAP}\nhandshakes_per_ip_per_minute = 100000\n")
    stop = threading.Event()
    answers = {"res_pq": 0, "429": 0}
    lock = threading.Lock()

    def flood(i: int) -> None:
        """req_pq from its own address, holds the handshake a while, again."""
        while not stop.is_set():
            try:
                sock = open_from(address(i, 20), gw.port)
                sock.sendall(b"\xee\xee\xee\xee" + intermediate_frame(req_pq_multi()))
                (length,) = struct.unpack("<I", recv_exactly(sock, 4))
                recv_exactly(sock, length)
                kind = "429" if length == 4 else "res_pq"
                with lock:
                    answers[kind] += 1
                # Holds a slot a while, or tries again soon (as often as
                # the Telethon client below: it competes for freed slots).
                stop.wait(1.0 if kind == "res_pq" else 0.1)
                sock.close()
            except (OSError, EOFError):
                pass

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(FLOODERS)]
    try:
        for t in threads:
            t.start()
        peak = 0
        samples = []
        for _ in range(20):
            value = gauge(admin, "mtproto_handshakes_in_progress")
            samples.append(value)
            peak = max(peak, value)
            time.sleep(0.1)
        assert peak == CAP, samples

        pin_server_key(gw.public_key.read_text())

        async def telethon_ping() -> tuple[int, int]:
            refused = 0
            give_up = time.monotonic() + 120
            while True:
                try:
                    sender = await connect(gw.port, "intermediate")
                    break
                except Exception:  # -429 ends Telethon's connect; a client retries later
                    refused += 1
                    assert time.monotonic() < give_up, f"Telethon refused {refused} times"
                    await asyncio.sleep(0.1)
            try:
                return (await asyncio.wait_for(sender.send(PingRequest(7)), 20)).ping_id, refused
            finally:
                await sender.disconnect()

        ping_id, refused = asyncio.run(telethon_ping())
        assert ping_id == 7
        for _ in range(10):
            assert gauge(admin, "mtproto_handshakes_in_progress") <= CAP
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    print(f"flood answers {answers}; Telethon refused {refused} times before its handshake")
    assert answers["429"] > 0 and answers["res_pq"] > 0
    deadline = time.monotonic() + 10
    while gauge(admin, "mtproto_handshakes_in_progress") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gauge(admin, "mtproto_handshakes_in_progress") == 0
    busy = metric(scrape(admin), "mtproto_handshakes", outcome="busy")
    assert busy == limit_exceeded(admin, "max_handshakes_in_progress") >= answers["429"]
    assert gw.alive(), gw.log_text()[-4000:]
    gw.stop()


@pytest.mark.parametrize("offset_secs, low_bits", [(-3600, 0), (120, 0), (0, 2)])
def test_plain_msg_id_outside_the_spec_window_is_closed_without_a_code(tmp_path_factory, offset_secs, low_bits):
    gw, admin = budget_gateway(tmp_path_factory, "msgid", "")
    try:
        sock = open_from("127.30.0.1", gw.port)
        msg_id = ((int(time.time()) + offset_secs) << 32) | low_bits
        sock.sendall(b"\xee\xee\xee\xee" + intermediate_frame(req_pq_multi(msg_id)))
        assert closed_by_server(sock) == b""
        sock.close()
        assert closed(admin, "bad_msg_id") == 1
    finally:
        assert gw.alive()
        gw.stop()


def test_sessions_of_one_key_beyond_the_cap_get_429(tmp_path_factory):
    gw, admin = budget_gateway(tmp_path_factory, "key-sessions", "max_sessions_per_auth_key = 2\n")
    try:
        pin_server_key(gw.public_key.read_text())
        key = create_auth_key(gw.port)
        held = []
        # Two sessions of the key, each on its own connection and address.
        for i in range(2):
            sock = open_from(f"127.40.0.{i + 1}", gw.port)
            sock.sendall(b"\xee\xee\xee\xee" + intermediate_frame(Session(key).message(ping(i))))
            assert recv_intermediate(sock)
            held.append(sock)
        extra = open_from("127.40.0.3", gw.port)
        extra.sendall(b"\xee\xee\xee\xee" + intermediate_frame(Session(key).message(ping(3))))
        assert closed_by_server(extra) == FLOOD
        extra.close()
        assert closed(admin, "key_sessions_full") == 1
        assert limit_exceeded(admin, "max_sessions_per_auth_key") == 1
        # A session given back makes room.
        held.pop().close()
        deadline = time.monotonic() + 10
        while metric(scrape(admin), "mtproto_sessions") > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        again = open_from("127.40.0.4", gw.port)
        again.sendall(b"\xee\xee\xee\xee" + intermediate_frame(Session(key).message(ping(4))))
        assert recv_intermediate(again)
        again.close()
        for sock in held:
            sock.close()
    finally:
        assert gw.alive(), gw.log_text()[-4000:]
        gw.stop()


def test_http_requests_over_the_per_address_rate_get_429(tmp_path_factory):
    gw = start_http_gateway(tmp_path_factory.mktemp("http-rate"), "http_requests_per_ip_per_minute = 3")
    try:
        # Within the burst: answered on their merits (an empty body is a bad message).
        assert [post(gw.port, b"")[0] for _ in range(3)] == [400, 400, 400]
        status, _, body = post(gw.port, b"")
        assert (status, body) == (429, struct.pack("<i", -429))
        assert limit_exceeded(gw.admin_port, "http_requests_per_ip_per_minute") == 1
    finally:
        assert gw.alive(), gw.log_text()[-4000:]
        gw.stop()
