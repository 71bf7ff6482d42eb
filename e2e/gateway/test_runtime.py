"""The gateway's thread counts (`[runtime]`): by default they follow the CPUs the process
may use, and a single handshake thread still serves handshakes that arrive together, from
Telethon and from the load generator, each waiting its turn."""

import asyncio
import os
import re

from telethon.tl.functions import PingRequest

from conftest import free_port, limited_gateway, run_loadgen, start_gateway
from mtclient import connect, pin_server_key
from promtext import metric, scrape


def test_threads_default_to_the_cpus_the_gateway_may_use(tmp_path):
    admin = free_port()
    gateway = start_gateway(tmp_path, ["--admin-listen", f"127.0.0.1:{admin}"])
    try:
        text = scrape(admin)
        workers = metric(text, "mtproto_runtime_worker_threads")
        assert metric(text, "mtproto_runtime_handshake_threads") == workers
        assert 1 <= workers <= len(os.sched_getaffinity(gateway.proc.pid)), text
    finally:
        assert gateway.stop() == 0


def test_one_handshake_thread_serves_handshakes_that_arrive_together(tmp_path_factory):
    admin = free_port()
    gateway = limited_gateway(
        tmp_path_factory, "one-handshake-thread",
        "handshakes_per_ip_per_minute = 100000\n[runtime]\nworker_threads = 1\nhandshake_threads = 1\n",
        ["--admin-listen", f"127.0.0.1:{admin}"])
    try:
        text = scrape(admin)
        assert metric(text, "mtproto_runtime_worker_threads") == 1
        assert metric(text, "mtproto_runtime_handshake_threads") == 1
        pin_server_key(gateway.public_key.read_text())

        async def telethon(i: int):
            sender = await connect(gateway.port, ("intermediate", "abridged", "obfuscated_intermediate")[i % 3])
            assert (await asyncio.wait_for(sender.send(PingRequest(i)), 30)).ping_id == i
            await sender.disconnect()

        async def together():
            await asyncio.gather(*(telethon(i) for i in range(6)))

        asyncio.run(together())

        out = run_loadgen(gateway, "--connections", "8", "--duration-secs", "2", "--pings", "0")
        handshakes, errors = (int(n) for n in re.search(r"(\d+) handshakes.*?(\d+) errors", out).groups())
        assert handshakes >= 8 and errors == 0, out
        created = metric(scrape(admin), "mtproto_handshakes", outcome="created")
        assert created >= 6 + handshakes, (created, out)
    finally:
        assert gateway.stop() == 0
