"""The SIGTERM drain delivers, or reports as undelivered, the answer to every
request it read (embedded session, real gateway process).

Clients keep several pings in flight on several raw connections and ask for
a QuickAck on each: the gateway sends a QuickAck when it has read and
decrypted a message, so the client knows exactly which pings the gateway
read. One more connection holds a request the session never answers (a
resent ping; the reference session drops duplicates), so the drain cannot
finish early and its grace end closes a connection with an answer owed.
After SIGTERM every ping the gateway acknowledged must have its pong, or be
counted in the drain's summary line: the sum matches exactly. Run once on
an idle box and once with CPU burners running through the drain."""

import asyncio
import hashlib
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from telethon.crypto import AuthKey

from conftest import start_gateway, start_remote_gateway, start_session
from mtclient import (
    Session,
    connect,
    encrypt_client_message,
    intermediate_frame,
    pin_server_key,
    ping,
    recv_exactly,
)

GRACE_SECS = 5
CONNECTIONS = 6
IN_FLIGHT = 8
BURNERS = 4


class Pinger:
    """One raw intermediate connection of one session: pings with QuickAck
    requested, up to `in_flight` unanswered at a time, until the gateway
    closes it. Counts QuickAcks and pongs per ping msg_id."""

    def __init__(self, port: int, key: AuthKey, in_flight: int):
        self.session = Session(key)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(b"\xee\xee\xee\xee")
        self.in_flight = threading.Semaphore(in_flight)
        self.lock = threading.Lock()
        self.tokens: dict[int, int] = {}
        self.acks: dict[int, int] = {}
        self.pongs: dict[int, int] = {}
        self.pongs_after_term = 0
        self.term_at: float | None = None
        self.closed = threading.Event()
        self.stop_sending = threading.Event()
        self.errors: list[str] = []
        self._salt()

    def _salt(self) -> None:
        """The first message gets bad_server_salt; take the salt from it."""
        self.sock.sendall(intermediate_frame(self.session.message(ping(0))))
        length = struct.unpack("<I", recv_exactly(self.sock, 4))[0]
        reply = self.session.read(recv_exactly(self.sock, length))
        assert type(reply).__name__ == "BadServerSalt", reply
        self.session.salt = reply.new_server_salt

    def payload(self, ping_id: int) -> tuple[int, bytes, int]:
        """A new ping: (msg_id, frame payload, QuickAck token)."""
        s = self.session
        s.next_msg_id += 4
        payload, plaintext = encrypt_client_message(s.key, s.salt, s.id, ping(ping_id), s.next_msg_id,
                                                    s.seq_no(True))
        token = struct.unpack("<I", hashlib.sha256(s.key.key[88:120] + plaintext).digest()[:4])[0]
        return s.next_msg_id, payload, token | 0x80000000

    def send(self, msg_id: int, payload: bytes, token: int) -> bool:
        with self.lock:
            self.tokens[token] = msg_id
        try:
            self.sock.sendall(intermediate_frame(payload, quick_ack=True))
            return True
        except OSError:
            return False

    def wait_pong(self, msg_id: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.pongs.get(msg_id, 0) == 0:
            assert time.monotonic() < deadline, f"no pong for {msg_id}"
            assert not self.closed.is_set(), "closed before the pong"
            time.sleep(0.01)

    def read_loop(self) -> None:
        try:
            while True:
                head = self.sock.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                word = struct.unpack("<I", head)[0]
                if word & 0x80000000:
                    with self.lock:
                        msg_id = self.tokens.get(word)
                        if msg_id is None:
                            self.errors.append(f"QuickAck {word:#x} for no ping")
                        else:
                            self.acks[msg_id] = self.acks.get(msg_id, 0) + 1
                    continue
                for obj in self.session.read_all(recv_exactly(self.sock, word)):
                    if type(obj).__name__ != "Pong":
                        continue
                    with self.lock:
                        self.pongs[obj.msg_id] = self.pongs.get(obj.msg_id, 0) + 1
                        if self.term_at is not None:
                            self.pongs_after_term += 1
                    self.in_flight.release()
        except (OSError, EOFError) as e:
            if not isinstance(e, (ConnectionResetError, EOFError)):
                self.errors.append(repr(e))
        finally:
            # As clients do when the server closes: close too.
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.closed.set()

    def send_loop(self) -> None:
        ping_id = 1
        while not self.closed.is_set() and not self.stop_sending.is_set():
            if not self.in_flight.acquire(timeout=0.2):
                continue
            ping_id += 1
            if not self.send(*self.payload(ping_id)):
                return

    def start(self, sending: bool = True) -> None:
        self.sock.settimeout(None)
        self.threads = [threading.Thread(target=self.read_loop, daemon=True)]
        if sending:
            self.threads.append(threading.Thread(target=self.send_loop, daemon=True))
        for t in self.threads:
            t.start()

    def unanswered(self) -> int:
        """Pings the gateway acknowledged (as often as it did) without a pong."""
        with self.lock:
            return sum(max(0, n - self.pongs.get(m, 0)) for m, n in self.acks.items())

    def close(self) -> None:
        self.stop_sending.set()
        self.sock.close()


def stuck_connection(port: int, key: AuthKey) -> Pinger:
    """A connection whose last request (a ping resent after its pong, which
    the reference session drops as a duplicate) is never answered."""
    p = Pinger(port, key, 1)
    p.start(sending=False)
    msg_id, payload, token = p.payload(1)
    assert p.send(msg_id, payload, token)
    p.wait_pong(msg_id)
    assert p.send(msg_id, payload, token)
    deadline = time.monotonic() + 30
    while p.acks.get(msg_id, 0) < 2:
        assert time.monotonic() < deadline, "no QuickAck for the resent ping"
        time.sleep(0.01)
    return p


def burn(seconds: float) -> subprocess.Popen:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def keys(port: int, n: int) -> list[AuthKey]:
    """`n` auth keys made by Telethon's handshake."""

    async def make() -> list[AuthKey]:
        out = []
        for _ in range(n):
            sender = await connect(port, "intermediate")
            out.append(AuthKey(sender.auth_key.key))
            await sender.disconnect()
        return out

    return asyncio.run(make())


def summary(log: str) -> dict[str, int]:
    # The last one: a restarted gateway appends to the same log.
    line = next((line for line in reversed(log.splitlines()) if "drain finished" in line), None)
    assert line is not None, "no drain summary in the log:\n" + log[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.mark.parametrize("loaded", [False, True], ids=["idle-box", "loaded-box"])
def test_drain_delivers_or_counts_every_reply_it_read(tmp_path, loaded):
    config = tmp_path / "gw.toml"
    config.write_text(f"[limits]\nshutdown_grace_secs = {GRACE_SECS}\n")
    gateway = start_gateway(tmp_path, ["--config", str(config)])
    pin_server_key(gateway.public_key.read_text())

    burners: list[subprocess.Popen] = []
    pingers: list[Pinger] = []
    try:
        all_keys = keys(gateway.port, CONNECTIONS + 1)
        stuck = stuck_connection(gateway.port, all_keys[0])
        pingers = [stuck] + [Pinger(gateway.port, k, IN_FLIGHT) for k in all_keys[1:]]
        for p in pingers[1:]:
            p.start()
        deadline = time.monotonic() + 60
        while min(len(p.pongs) for p in pingers[1:]) < 20:
            assert time.monotonic() < deadline, "pings are not answered"
            time.sleep(0.05)
        if loaded:
            burners = [burn(GRACE_SECS + 20) for _ in range(BURNERS)]
            time.sleep(1)
        term = time.monotonic()
        for p in pingers:
            p.term_at = term
        gateway.proc.send_signal(signal.SIGTERM)
        # A generous bound: the grace, the 10 s the gateway gives connections
        # after it, and a loaded box.
        assert gateway.proc.wait(timeout=GRACE_SECS + 30) == 0
        exit_secs = time.monotonic() - term
        for p in pingers:
            assert p.closed.wait(30), "the gateway exited and a client's connection is still open"
            p.close()
            for t in p.threads:
                t.join(10)
        log = gateway.log_text()
        counts = summary(log)
        unanswered = [p.unanswered() for p in pingers]
        errors = [e for p in pingers for e in p.errors]
        assert not errors, errors
        for p in pingers:
            # Every pong is for a ping the gateway acknowledged, once.
            assert all(p.acks.get(m, 0) >= 1 and n == 1 for m, n in p.pongs.items())
        # The exact account: each acknowledged ping without its pong is one
        # the gateway reports undelivered, and nothing else is reported.
        assert sum(unanswered) == counts["undelivered"], (unanswered, counts)
        assert counts["undelivered"] == counts["undelivered_in_flight"] + counts["undelivered_queued"]
        # The stuck connection lasted until the grace ended; the others
        # closed once they owed nothing (on a box too starved to deliver 8
        # pongs within the grace, some would close at its end instead, with
        # their pings in the count above).
        assert unanswered[0] == 1
        assert counts["undelivered_in_flight"] >= 1
        assert "grace period over" in log
        assert counts["closed_at_grace_end"] >= 1
        assert counts["closed_when_done"] >= 1
        assert counts["closed_otherwise"] == 0
        assert counts["closed_when_done"] + counts["closed_at_grace_end"] == len(pingers)
        print(f"\nloaded={loaded}: exit {exit_secs:.1f} s after SIGTERM; "
              f"pings acknowledged {sum(len(p.acks) for p in pingers)}, "
              f"pongs {sum(len(p.pongs) for p in pingers)} ({sum(p.pongs_after_term for p in pingers)} after SIGTERM); "
              f"summary {counts}")
    finally:
        for b in burners:
            b.kill()
            b.wait()
        for p in pingers:
            p.close()
        gateway.stop()


def test_a_stalled_session_leaves_every_request_read_counted(tmp_path):
    """Clients have requests in flight through a gateway in unary mode that
    the session took and will never answer (pings resent after their pong,
    which the reference session drops as duplicates), then the session stops
    (SIGSTOP); SIGTERM drains nothing: every connection is closed at the
    grace end, each request the gateway read is counted in flight, exactly,
    and the stopped session does not hold the gateway's exit. (Stopping the
    session alone cannot pin down what is unanswered: it answers within
    microseconds, so whether a reply was already on its way races the stop.)"""
    session = start_session(tmp_path)
    config = tmp_path / "gw.toml"
    config.write_text("[limits]\nshutdown_grace_secs = 2\n")
    gateway = start_remote_gateway(tmp_path, [session.port], "unary", extra=["--config", str(config)])
    pin_server_key(gateway.public_key.read_text())
    pingers: list[Pinger] = []
    stopped = False
    try:
        pingers = [Pinger(gateway.port, k, IN_FLIGHT) for k in keys(gateway.port, 3)]
        for p in pingers:
            p.start(sending=False)
            for ping_id in range(1, IN_FLIGHT + 1):
                msg_id, payload, token = p.payload(ping_id)
                assert p.send(msg_id, payload, token)
                p.wait_pong(msg_id)
                assert p.send(msg_id, payload, token)
        # Each resend is read (QuickAck) and never answered.
        deadline = time.monotonic() + 30
        while min(p.unanswered() for p in pingers) < IN_FLIGHT:
            assert time.monotonic() < deadline, [p.unanswered() for p in pingers]
            time.sleep(0.05)
        session.proc.send_signal(signal.SIGSTOP)
        stopped = True
        gateway.proc.send_signal(signal.SIGTERM)
        # The grace, then at most CLOSE_AFTER_GRACE_SECS (5 s), and a margin.
        assert gateway.proc.wait(timeout=40) == 0
        for p in pingers:
            assert p.closed.wait(30)
            p.close()
            for t in p.threads:
                t.join(10)
        counts = summary(gateway.log_text())
        unanswered = [p.unanswered() for p in pingers]
        assert unanswered == [IN_FLIGHT] * len(pingers), unanswered
        assert counts["undelivered_in_flight"] == sum(unanswered), (unanswered, counts)
        assert counts["undelivered_queued"] == 0
        assert counts["closed_at_grace_end"] == len(pingers)
        assert counts["closed_when_done"] == counts["closed_otherwise"] == 0
        print(f"\nstalled session: {counts}")
    finally:
        if stopped:
            session.proc.send_signal(signal.SIGCONT)
        for p in pingers:
            p.close()
        gateway.stop()
        session.stop()
