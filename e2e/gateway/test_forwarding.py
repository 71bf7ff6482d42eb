"""The gateway in front of separate `mtproto-session` processes over gRPC, in
unary and stream mode: the same client scenarios, a session restart, ring
redirects between two sessions, and a session that is down."""

import asyncio
import subprocess
import time

import pytest
from telethon.crypto import AuthKey
from telethon.errors import AuthKeyNotFound, RPCError
from telethon.tl.functions import PingRequest

from conftest import REPO, free_port, start_remote_gateway, start_session
from mtclient import connect, pin_server_key
from promtext import metric, scrape
from test_clients import API_NOT_SERVED, api_call
from test_websocket import GRAMJS, count_gramjs_retries

MODES = ["unary", "stream"]


@pytest.fixture(scope="module", params=MODES)
def fleet(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"fleet-{request.param}")
    session = start_session(workdir)
    gateway = start_remote_gateway(workdir, [session.port], request.param)
    yield gateway, session
    assert gateway.alive(), gateway.log_text()[-3000:]
    assert gateway.stop() == 0
    session.stop()


@pytest.mark.parametrize("transport", ["full", "abridged", "intermediate", "padded_intermediate", "obfuscated_abridged"])
def test_round_trips_through_both_processes(fleet, transport):
    gateway, _ = fleet
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        sender = await connect(gateway.port, transport)
        try:
            for i in range(3):
                assert (await asyncio.wait_for(sender.send(PingRequest(i)), 20)).ping_id == i
            with pytest.raises(RPCError) as err:
                await asyncio.wait_for(sender.send(api_call()), 20)
            assert err.value.code == 400 and API_NOT_SERVED in err.value.message
        finally:
            await sender.disconnect()

    asyncio.run(scenario())


def test_session_restart_is_survived(fleet):
    gateway, session = fleet
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        sender = await connect(gateway.port, "intermediate")
        key = AuthKey(sender.auth_key.key)
        assert (await asyncio.wait_for(sender.send(PingRequest(1)), 20)).ping_id == 1
        await sender.disconnect()
        # The gateway tells the session when the session's last connection closes.
        for _ in range(100):
            if "session closed by its gateway" in session.log_text():
                break
            await asyncio.sleep(0.05)
        assert "session closed by its gateway" in session.log_text()
        session.restart()
        # Reconnect with the same key: the gateway still holds it, the new
        # session process answers (after a bad_server_salt round the client handles).
        again = await connect(gateway.port, "abridged", auth_key=key)
        try:
            assert (await asyncio.wait_for(again.send(PingRequest(2)), 30)).ping_id == 2
        finally:
            await again.disconnect()

    asyncio.run(scenario())


def test_unknown_key_is_404_through_the_session(fleet):
    gateway, _ = fleet

    async def scenario():
        sender = await connect(gateway.port, "intermediate", auth_key=AuthKey(bytes(range(256))))
        with pytest.raises(AuthKeyNotFound):
            await asyncio.wait_for(sender.send(PingRequest(1)), 20)
        await sender.disconnect()

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", MODES)
def test_server_messages_ride_the_gateways_own_stream_in_stream_mode(tmp_path, mode):
    """In stream mode the gateway asks `mtproto-session` for server messages
    on its own session stream (our extension of teamgram's protocol), so
    they skip the reverse path; in unary mode they come through the reverse
    path as teamgram sends them. Telethon over TCP and GramJS over WebSocket
    both get their pongs either way; the counter shows which path carried
    them."""
    session = start_session(tmp_path)
    admin, ws_port = free_port(), free_port()
    gateway = start_remote_gateway(tmp_path, [session.port], mode,
                                   extra=["--admin-listen", f"127.0.0.1:{admin}",
                                          "--listen-ws", f"127.0.0.1:{ws_port}"])
    pin_server_key(gateway.public_key.read_text())

    def on_stream() -> float:
        return metric(scrape(admin), "mtproto_session_stream_replies")

    async def pings():
        sender = await connect(gateway.port, "intermediate")
        try:
            for i in range(3):
                assert (await asyncio.wait_for(sender.send(PingRequest(i)), 20)).ping_id == i
        finally:
            await sender.disconnect()

    try:
        asyncio.run(pings())
        gramjs = subprocess.run(["node", str(REPO / "e2e/gateway/gramjs/ws_ping.js"), GRAMJS, str(ws_port),
                                 str(gateway.public_key), "obfuscated"], capture_output=True, text=True, timeout=90)
        count_gramjs_retries(gramjs)
        assert gramjs.returncode == 0, gramjs.stdout + gramjs.stderr + gateway.log_text()[-3000:]
        assert "pong 4242" in gramjs.stdout
        if mode == "stream":
            # At least each pong: every ping waited for its own.
            assert on_stream() >= 4, gateway.log_text()[-3000:]
        else:
            assert on_stream() == 0
    finally:
        assert gateway.stop() == 0
        session.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_session_stops_on_sigterm_while_its_gateway_is_connected(tmp_path, mode):
    """Stream mode keeps a stream open each way (the gateway's requests, the
    session's replies); SIGTERM must still end the session by itself (exit 0,
    before `stop()` gives up and kills it), and the gateway carries on."""
    session = start_session(tmp_path)
    gateway = start_remote_gateway(tmp_path, [session.port], mode)
    pin_server_key(gateway.public_key.read_text())

    async def ping(ping_id):
        sender = await connect(gateway.port, "intermediate")
        try:
            assert (await asyncio.wait_for(sender.send(PingRequest(ping_id)), 20)).ping_id == ping_id
        finally:
            await sender.disconnect()

    try:
        asyncio.run(ping(1))
        assert session.stop() == 0, session.log_text()[-3000:]
        assert "stopped" in session.log_text()
        assert gateway.alive(), gateway.log_text()[-3000:]
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_redirects_between_two_sessions(tmp_path, mode):
    """Two sessions share a ring; this gateway knows only the first, so keys the
    second owns come back as REDIRECT_TO_<second> and are followed."""
    from conftest import free_port

    a_port, b_port = free_port(), free_port()
    members = [f"127.0.0.1:{a_port}", f"127.0.0.1:{b_port}"]
    a = start_session(tmp_path, a_port, members)
    b = start_session(tmp_path, b_port, members)
    gateway = start_remote_gateway(tmp_path, [a_port], mode)
    pin_server_key(gateway.public_key.read_text())

    async def one_client(i: int):
        sender = await connect(gateway.port, "intermediate")
        try:
            return (await asyncio.wait_for(sender.send(PingRequest(i)), 20)).ping_id
        finally:
            await sender.disconnect()

    try:
        for i in range(30):
            assert asyncio.run(one_client(i)) == i
            if "session redirect" in gateway.log_text():
                break
        assert "session redirect" in gateway.log_text(), "no key landed on the second session in 30 tries"
        assert "mtproto-session serving" in b.log_text()
    finally:
        gateway.stop()
        a.stop()
        b.stop()


@pytest.mark.parametrize("mode", MODES)
def test_session_down_gives_a_clean_failure_not_a_hang(tmp_path, mode):
    from conftest import free_port

    gateway = start_remote_gateway(tmp_path, [free_port()], mode)
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        started = time.monotonic()
        with pytest.raises(Exception):
            sender = await connect(gateway.port, "intermediate")
            await sender.disconnect()
        return time.monotonic() - started

    try:
        asyncio.run(scenario())
        assert gateway.alive()
        assert "storing new auth key failed" in gateway.log_text()
    finally:
        assert gateway.stop() == 0
