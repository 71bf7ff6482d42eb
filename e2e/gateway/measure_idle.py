"""Measures what idle connections cost: opens N idle connections (intermediate
transport tag, then nothing; with `ws`, a WebSocket upgrade first and the tag
in one binary message) from one loopback address to a fresh gateway, counts
how many the gateway keeps, and reads its RSS. Not a test: numbers go into
docs. Bounded: at most 20,000 connections, each run under a minute.

    python measure_idle.py [N] [max_connections_per_ip] [tcp|ws]
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


def still_open(sockets: list[socket.socket]) -> int:
    """Sockets the server has not closed (no EOF/reset readable)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in sockets}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    closed = 0
    for fd, _ in poller.poll(0):
        try:
            if by_fd[fd].recv(1, socket.MSG_DONTWAIT) == b"":
                closed += 1
        except (ConnectionResetError, BlockingIOError):
            closed += 1
    return len(sockets) - closed


def main() -> None:
    n = min(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000, 20_000)
    per_ip = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    websocket = len(sys.argv) > 3 and sys.argv[3] == "ws"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        extra = []
        if per_ip:
            (workdir / "gw.toml").write_text(f"[limits]\nmax_connections_per_ip = {per_ip}\n")
            extra += ["--config", str(workdir / "gw.toml")]
        ws_port = free_port()
        if websocket:
            extra += ["--listen-ws", f"127.0.0.1:{ws_port}"]
        gw = start_gateway(workdir, extra)
        try:
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
                except (EOFError, ConnectionResetError):
                    # Over the per-address cap: closed at once (WebSocket: before the upgrade answer).
                    continue
                sockets.append(s)
            time.sleep(2)
            kept = still_open(sockets)
            rss = rss_kib(gw.proc.pid)
            print(f"opened={len(sockets)} kept_open={kept} rss_idle_gateway_kib={base} "
                  f"rss_with_connections_kib={rss} per_kept_connection_bytes="
                  f"{(rss - base) * 1024 // max(kept, 1)}")
            for s in sockets:
                s.close()
        finally:
            gw.stop()


if __name__ == "__main__":
    main()
