"""Measures what idle connections cost: opens N idle connections (intermediate
transport tag, then nothing; with `ws`, a WebSocket upgrade first and the tag
in one binary message) from one loopback address to a fresh gateway, counts
how many the gateway keeps, and reads its RSS. With `keyed`, each connection
also sends one encrypted ping in a session of its own, as a client that
has connected and gone quiet, so the gateway holds the key and the embedded
session holds each session. One auth key serves all of them (made first;
`limits.max_sessions_per_auth_key` raised to N), so each key's own cache
entry, a few hundred bytes, is not in the figure. Not a test: numbers go
into docs. Bounded: at most 20,000 connections, each run under a minute.

    python measure_idle.py [N] [max_connections_per_ip] [tcp|ws] [keyed]
"""

import os
import resource
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

from conftest import free_port, start_gateway
from mtclient import Session, create_auth_key, intermediate_frame, pin_server_key, ping, raw_intermediate, \
    recv_intermediate


def ws_binary(data: bytes) -> bytes:
    """One masked binary WebSocket frame (a client's), up to 64 KiB."""
    mask = os.urandom(4)
    head = b"\x82" + (bytes([0x80 | len(data)]) if len(data) < 126 else b"\xfe" + len(data).to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def server_salt(port: int, key) -> int:
    """The salt the gateway's session wants, from its bad_server_salt answer to salt 0."""
    sock = raw_intermediate(port)
    try:
        session = Session(key)
        sock.sendall(intermediate_frame(session.message(ping(0))))
        for obj in session.read_all(recv_intermediate(sock)):
            if type(obj).__name__ == "BadServerSalt":
                return obj.new_server_salt
        raise RuntimeError("no bad_server_salt for salt 0")
    finally:
        sock.close()


def open_websocket(port: int) -> socket.socket:
    """A WebSocket to /apiws whose first binary message is the intermediate tag."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /apiws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1024)
        if not chunk:
            raise EOFError("upgrade refused")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    mask = os.urandom(4)
    tag = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\xee\xee\xee\xee"))
    s.sendall(b"\x82\x84" + mask + tag)
    return s


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def still_open(sockets: list[socket.socket]) -> tuple[int, int]:
    """Sockets the server has not closed (no EOF/reset readable), and how
    many of those have bytes from it waiting (answers)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in sockets}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    closed = answered = 0
    for fd, _ in poller.poll(0):
        sock = by_fd[fd]
        sock.setblocking(False)
        try:
            if sock.recv(1 << 16) == b"":
                closed += 1
                continue
            answered += 1
            # The answers read, what follows them must not be an EOF.
            if sock.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except ConnectionResetError:
            closed += 1
        except BlockingIOError:
            pass
    return len(sockets) - closed, answered


def main() -> None:
    n = min(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000, 20_000)
    per_ip = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    websocket = len(sys.argv) > 3 and sys.argv[3] == "ws"
    keyed = len(sys.argv) > 4 and sys.argv[4] == "keyed"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        extra = []
        limits = f"max_connections_per_ip = {per_ip}\n" if per_ip else ""
        if keyed:
            # One key stands in for N clients' keys: its sessions may be N.
            limits += f"max_sessions_per_auth_key = {n + 1}\n"
        if limits:
            (workdir / "gw.toml").write_text("[limits]\n" + limits)
            extra += ["--config", str(workdir / "gw.toml")]
        ws_port = free_port()
        if websocket:
            extra += ["--listen-ws", f"127.0.0.1:{ws_port}"]
        gw = start_gateway(workdir, extra)
        try:
            key = salt = None
            if keyed:
                pin_server_key(gw.public_key.read_text())
                key = create_auth_key(gw.port)
                salt = server_salt(gw.port, key)
            time.sleep(1)
            base = rss_kib(gw.proc.pid)
            sockets = []
            deadline = time.monotonic() + 60
            for _ in range(n):
                if time.monotonic() > deadline:
                    break
                try:
                    if websocket:
                        s = open_websocket(ws_port)
                    else:
                        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
                        s.sendall(b"\xee\xee\xee\xee")
                    if keyed:
                        session = Session(key)
                        session.salt = salt
                        frame = intermediate_frame(session.message(ping(len(sockets))))
                        s.sendall(ws_binary(frame) if websocket else frame)
                except (EOFError, ConnectionResetError):
                    # Over the per-address cap: closed at once (WebSocket: before the upgrade answer).
                    continue
                sockets.append(s)
            time.sleep(2)
            kept, answered = still_open(sockets)
            rss = rss_kib(gw.proc.pid)
            print(f"{'keyed ' if keyed else ''}opened={len(sockets)} kept_open={kept} answered={answered} "
                  f"rss_idle_gateway_kib={base} rss_with_connections_kib={rss} per_kept_connection_bytes="
                  f"{(rss - base) * 1024 // max(kept, 1)}")
            for s in sockets:
                s.close()
        finally:
            gw.stop()


if __name__ == "__main__":
    main()
