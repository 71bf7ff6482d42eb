"""Continuous client traffic through MTProto gateways, with a real third-party
client (Telethon 1.45's MTProtoSender), for the fleet e2e (local and on kind).

    python e2e/fleet/traffic.py --server HOST:PORT [--server HOST:PORT ...] \\
        --rsa-public-key PEM_FILE --clients N --duration SECONDS \\
        [--report FILE.json] [--until-file PATH] [--ready-file PATH]

Each client makes its own auth key (so keys, and their owners on the session
ring, spread), then sends PingRequest after PingRequest on one connection and
waits for each pong before the next. Client i starts on server i mod count.

When a connection closes, the client does what MTProto clients do: it connects
again (the same server first, then the next one) with the same key and sends
the unanswered ping again ("resent_after_close"). A close is noticed when the
ping's request fails, or when the sender reports itself disconnected: Telethon
never resolves a request it had queued but not sent when its connection
dropped. With --resend-after S, a ping
unanswered for S seconds on a live connection is sent again on it
("resent_on_timeout"), as clients resend unacknowledged messages. A ping with
no pong within --ping-timeout, counting every resend, is lost.

Traffic runs until --duration elapses or --until-file exists (whichever comes
first; the report says which), then each client finishes its ping in flight.
--ready-file is written once every client has had its first pong.

Exit status: 0 when no ping was lost and every pong matched its ping, 1
otherwise, 2 on bad arguments or when no client could start.
"""

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from telethon.crypto import AuthKey, rsa
from telethon.errors import AuthKeyNotFound
from telethon.network import MTProtoSender
from telethon.network.connection import ConnectionTcpIntermediate
from telethon.tl.functions import PingRequest


class _Loggers(dict):
    def __missing__(self, key):
        return logging.getLogger(key)


LOGGERS = _Loggers()
CONNECT_TIMEOUT = 10.0
# How often a client waiting for a pong checks that its connection is still up.
CONNECTION_POLL = 0.25


@dataclass
class Stats:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    wrong_pong: int = 0
    reconnects: int = 0
    resent_after_close: int = 0
    resent_on_timeout: int = 0
    auth_key_not_found: int = 0
    max_rtt_ms: float = 0.0
    answered_by_server: dict = field(default_factory=dict)
    last_answer_by_server: dict = field(default_factory=dict)
    events: list = field(default_factory=list)

    def event(self, client: int, kind: str, server: str, **extra):
        self.events.append({"t": round(time.time(), 3), "client": client, "kind": kind,
                            "server": server, **extra})


def parse_server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--server {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class Client:
    def __init__(self, index: int, servers, args, stats: Stats, stop: asyncio.Event,
                 first_pong: asyncio.Event):
        self.index = index
        self.servers = servers
        self.args = args
        self.stats = stats
        self.stop = stop
        self.first_pong = first_pong
        self.server_i = index % len(servers)
        self.key: AuthKey | None = None
        self.sender: MTProtoSender | None = None

    @property
    def server(self) -> str:
        host, port = self.servers[self.server_i]
        return f"{host}:{port}"

    async def _open(self, server_i: int) -> MTProtoSender:
        host, port = self.servers[server_i]
        sender = MTProtoSender(self.key, loggers=LOGGERS, retries=0, auto_reconnect=False)
        conn = ConnectionTcpIntermediate(host, port, 2, loggers=LOGGERS)
        await asyncio.wait_for(sender.connect(conn), CONNECT_TIMEOUT)
        if self.key is None:
            self.key = AuthKey(sender.auth_key.key)
        return sender

    async def _close(self):
        if self.sender is not None:
            sender, self.sender = self.sender, None
            try:
                await asyncio.wait_for(sender.disconnect(), 5)
            except Exception:
                pass

    async def connect(self, deadline: float, first: bool = False) -> bool:
        """(Re)connects: the current server first, then the others in turn."""
        await self._close()
        attempt = 0
        while time.monotonic() < deadline:
            i = (self.server_i + attempt) % len(self.servers)
            try:
                self.sender = await self._open(i)
            except AuthKeyNotFound:
                self.stats.auth_key_not_found += 1
                self.stats.event(self.index, "auth_key_not_found", self.server)
                return False
            # EOFError: the gateway ended the handshake. Telethon's pq factorization
            # now and then returns (1, pq), which the gateway refuses by closing;
            # a real client starts a new handshake, and so does this one.
            except (OSError, asyncio.TimeoutError, ConnectionError, EOFError) as e:
                host, port = self.servers[i]
                self.stats.event(self.index, "connect_failed", f"{host}:{port}", error=type(e).__name__)
                attempt += 1
                if attempt % len(self.servers) == 0:
                    await asyncio.sleep(0.2)
                continue
            self.server_i = i
            if not first:
                self.stats.reconnects += 1
            self.stats.event(self.index, "connected", self.server)
            return True
        return False

    async def ping(self, ping_id: int) -> bool:
        """One ping until its pong, resending as described above; False if lost."""
        args, stats = self.args, self.stats
        started = time.monotonic()
        deadline = started + args.ping_timeout
        futures = []
        stats.sent += 1
        while time.monotonic() < deadline:
            if self.sender is None or not self.sender.is_connected():
                if self.sender is not None:
                    stats.event(self.index, "closed", self.server)
                if not await self.connect(deadline):
                    break
                if futures:
                    stats.resent_after_close += 1
                    stats.event(self.index, "resent_after_close", self.server, ping_id=ping_id)
                futures = []
            if not futures:
                try:
                    futures.append(self.sender.send(PingRequest(ping_id)))
                except ConnectionError:
                    continue
                last_sent = time.monotonic()
            wait = min(deadline - time.monotonic(), CONNECTION_POLL)
            done, _ = await asyncio.wait(futures, timeout=max(wait, 0.01),
                                         return_when=asyncio.FIRST_COMPLETED)
            pong = next((f.result() for f in done
                         if not f.cancelled() and f.exception() is None), None)
            if pong is not None:
                for f in futures:
                    f.cancel()
                rtt = (time.monotonic() - started) * 1000
                stats.max_rtt_ms = max(stats.max_rtt_ms, rtt)
                if pong.ping_id != ping_id:
                    stats.wrong_pong += 1
                    stats.event(self.index, "wrong_pong", self.server, ping_id=ping_id,
                                got=pong.ping_id)
                    return False
                stats.answered += 1
                stats.answered_by_server[self.server] = stats.answered_by_server.get(self.server, 0) + 1
                stats.last_answer_by_server[self.server] = round(time.time(), 3)
                return True
            if done or not self.sender.is_connected():
                # Every finished future failed, or the sender dropped its
                # connection with the ping still in its send queue (Telethon
                # then never resolves it): the connection is gone.
                stats.event(self.index, "closed", self.server, ping_id=ping_id)
                await self._close()
                futures = [None]  # a ping is outstanding: the next connection resends it
                continue
            now = time.monotonic()
            if args.resend_after > 0 and now - last_sent >= args.resend_after and now < deadline:
                last_sent = now
                stats.resent_on_timeout += 1
                stats.event(self.index, "resent_on_timeout", self.server, ping_id=ping_id)
                try:
                    futures.append(self.sender.send(PingRequest(ping_id)))
                except ConnectionError:
                    pass
        stats.lost += 1
        stats.event(self.index, "lost", self.server, ping_id=ping_id)
        await self._close()
        return False

    async def run(self):
        if not await self.connect(time.monotonic() + self.args.ping_timeout, first=True):
            raise RuntimeError(f"client {self.index}: could not connect to any server")
        seq = 0
        try:
            while True:
                seq += 1
                await self.ping((self.index << 32) | seq)
                if seq == 1:
                    self.first_pong.set()
                if self.stop.is_set():
                    return
                try:
                    await asyncio.wait_for(self.stop.wait(), self.args.interval)
                    return
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._close()


async def watch_stop(args, stop: asyncio.Event, outcome: dict):
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        if args.until_file and os.path.exists(args.until_file):
            outcome["stopped_by"] = "until_file"
            stop.set()
            return
        await asyncio.sleep(0.05)
    outcome["stopped_by"] = "duration"
    stop.set()


async def main_async(args) -> int:
    rsa.add_key(open(args.rsa_public_key).read(), old=False)
    stats = Stats()
    stop = asyncio.Event()
    outcome = {"stopped_by": None}
    started = time.time()
    firsts = [asyncio.Event() for _ in range(args.clients)]
    clients = [Client(i, args.server, args, stats, stop, firsts[i]) for i in range(args.clients)]
    tasks = [asyncio.create_task(c.run()) for c in clients]

    async def ready():
        await asyncio.gather(*(e.wait() for e in firsts))
        if args.ready_file:
            with open(args.ready_file, "w") as f:
                f.write(f"{time.time():.3f}\n")

    ready_task = asyncio.create_task(ready())
    stopper = asyncio.create_task(watch_stop(args, stop, outcome))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    ready_task.cancel()
    errors = [f"{r}" for r in results if isinstance(r, BaseException)]
    report = {
        "servers": [f"{h}:{p}" for h, p in args.server],
        "clients": args.clients,
        "started": round(started, 3),
        "seconds": round(time.time() - started, 3),
        "stopped_by": outcome["stopped_by"],
        "sent": stats.sent,
        "answered": stats.answered,
        "lost": stats.lost,
        "wrong_pong": stats.wrong_pong,
        "reconnects": stats.reconnects,
        "resent_after_close": stats.resent_after_close,
        "resent_on_timeout": stats.resent_on_timeout,
        "auth_key_not_found": stats.auth_key_not_found,
        "max_rtt_ms": round(stats.max_rtt_ms, 1),
        "answered_by_server": stats.answered_by_server,
        "last_answer_by_server": stats.last_answer_by_server,
        "client_errors": errors,
        "events": stats.events,
    }
    text = json.dumps(report, indent=1)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    summary = {k: v for k, v in report.items() if k != "events"}
    print(json.dumps(summary), flush=True)
    if errors and stats.answered == 0:
        return 2
    ok = (stats.lost == 0 and stats.wrong_pong == 0 and stats.auth_key_not_found == 0
          and not errors and stats.sent == stats.answered)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="append", required=True, type=parse_server,
                   help="gateway HOST:PORT (repeatable)")
    p.add_argument("--rsa-public-key", required=True, help="the gateway's RSA public key (PEM)")
    p.add_argument("--clients", type=int, required=True, help="clients, each with its own auth key")
    p.add_argument("--duration", type=float, required=True,
                   help="seconds of traffic (an upper bound with --until-file)")
    p.add_argument("--report", help="write the full report (with events) as JSON here")
    p.add_argument("--until-file", help="stop once this file exists")
    p.add_argument("--ready-file", help="write this file once every client has had a pong")
    p.add_argument("--interval", type=float, default=0.05, help="pause between pings of a client")
    p.add_argument("--ping-timeout", type=float, default=15.0,
                   help="a ping unanswered this long (resends included) is lost")
    p.add_argument("--resend-after", type=float, default=0.0,
                   help="resend a ping unanswered this long on a live connection (0: never)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args()
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients and --duration must be positive")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
