"""Measures what idle connections cost: opens N idle connections (intermediate
transport tag, then nothing) from one loopback address to a fresh gateway,
counts how many the gateway keeps, and reads its RSS. Not a test: numbers go
into docs. Bounded: at most 20,000 connections, each run under a minute.

    python measure_idle.py [N] [max_connections_per_ip]
"""

import os
import resource
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

from conftest import start_gateway


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
    per_ip = sys.argv[2] if len(sys.argv) > 2 else None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1000)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        extra = []
        if per_ip:
            (workdir / "gw.toml").write_text(f"[limits]\nmax_connections_per_ip = {per_ip}\n")
            extra += ["--config", str(workdir / "gw.toml")]
        gw = start_gateway(workdir, extra)
        try:
            time.sleep(1)
            base = rss_kib(gw.proc.pid)
            sockets = []
            deadline = time.monotonic() + 60
            for _ in range(n):
                if time.monotonic() > deadline:
                    break
                s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
                s.sendall(b"\xee\xee\xee\xee")
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
