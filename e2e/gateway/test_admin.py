"""Metrics, health and a graceful drain on SIGTERM (the account of what a
drain delivers is test_drain.py)."""

import asyncio
import signal
import socket
import time
import urllib.error
import urllib.request

from telethon.crypto import AuthKey
from telethon.tl.functions import PingRequest

from conftest import free_port, start_gateway, start_remote_gateway, start_session
from mtclient import connect, pin_server_key
from promtext import metric


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def wait_closed(sender, timeout: float = 20) -> None:
    """Until the gateway has closed the sender's connection (Telethon's
    reconnection is off in these tests)."""
    done, _ = await asyncio.wait([sender.disconnected], timeout=timeout)
    assert done, "the gateway did not close the connection"


def test_metrics_health_and_drain_with_remote_sessions(tmp_path):
    session = start_session(tmp_path)
    admin = free_port()
    config = tmp_path / "gw.toml"
    # A lame duck long enough to see readiness fall; a grace the test does
    # not wait out: the drain ends once nothing is owed.
    config.write_text("[limits]\ndrain_delay_secs = 5\nshutdown_grace_secs = 60\n")
    gateway = start_remote_gateway(tmp_path, [session.port], "unary",
                                   extra=["--admin-listen", f"127.0.0.1:{admin}", "--config", str(config)])
    pin_server_key(gateway.public_key.read_text())
    assert get(admin, "/healthz")[0] == 200
    assert get(admin, "/readyz")[0] == 200

    async def scenario():
        first = await connect(gateway.port, "intermediate")
        key = AuthKey(first.auth_key.key)
        assert (await asyncio.wait_for(first.send(PingRequest(1)), 20)).ping_id == 1
        await first.disconnect()
        sender = await connect(gateway.port, "abridged", auth_key=key)
        assert (await asyncio.wait_for(sender.send(PingRequest(2)), 20)).ping_id == 2
        status, text = get(admin, "/metrics")
        assert status == 200
        assert metric(text, "mtproto_sessions") >= 1
        assert metric(text, "mtproto_session_ring_members") == 1
        assert metric(text, "mtproto_auth_key_cache_hits") >= 1
        # Two clients and the fixture's readiness probe.
        assert metric(text, "mtproto_connections_accepted", listener="tcp") >= 2
        assert metric(text, "mtproto_connections_open", listener="tcp", transport="abridged") == 1
        assert metric(text, "mtproto_handshakes", outcome="created") == 1
        for step in ("req_pq", "req_DH_params", "set_client_DH_params"):
            assert metric(text, "mtproto_handshake_steps", step=step, outcome="ok") == 1
            assert metric(text, "mtproto_handshake_step_duration_seconds_count", step=step) == 1
        assert metric(text, "mtproto_handshake_duration_seconds_count") == 1
        assert metric(text, "mtproto_rsa_decrypt_duration_seconds_count") == 1
        assert metric(text, "mtproto_messages_forwarded") >= 2
        # Replies came back over the reverse path: new_session_created and pongs.
        assert metric(text, "mtproto_messages_sent") >= 2
        assert metric(text, "mtproto_received_bytes") > 0
        assert metric(text, "mtproto_sent_bytes") > 0
        assert metric(
            text, "mtproto_session_rpc_duration_seconds_count", method="session_sendDataToSession"
        ) >= 2
        assert metric(text, "mtproto_outbox_queued_messages") == 0

        # SIGTERM: not ready at once; after the lame duck the idle
        # connection owes nothing and is closed.
        gateway.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while get(admin, "/readyz")[0] != 503:
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            await asyncio.sleep(0.05)
        await wait_closed(sender)
        await sender.disconnect()

    try:
        asyncio.run(scenario())
        assert gateway.proc.wait(timeout=30) == 0
        log = gateway.log_text()
        assert "draining connections" in log
        assert "drain finished" in log
        assert "grace period over" not in log
        for _ in range(50):
            if session.log_text().count("session closed by its gateway") >= 2:
                break
            time.sleep(0.1)
        assert session.log_text().count("session closed by its gateway") >= 2
    finally:
        gateway.stop()
        session.stop()


def test_a_drained_connection_is_closed_and_reported(tmp_path):
    session = start_session(tmp_path)
    config = tmp_path / "gw.toml"
    config.write_text("[limits]\nshutdown_grace_secs = 1\n")
    gateway = start_remote_gateway(tmp_path, [session.port], "stream", extra=["--config", str(config)])
    pin_server_key(gateway.public_key.read_text())

    async def scenario():
        sender = await connect(gateway.port, "intermediate")
        assert (await asyncio.wait_for(sender.send(PingRequest(1)), 20)).ping_id == 1
        gateway.proc.send_signal(signal.SIGTERM)
        await wait_closed(sender)
        assert gateway.proc.wait(timeout=20) == 0
        await sender.disconnect()

    try:
        asyncio.run(scenario())
        assert "drain finished" in gateway.log_text()
        for _ in range(50):
            if "session closed by its gateway" in session.log_text():
                break
            time.sleep(0.1)
        assert "session closed by its gateway" in session.log_text()
    finally:
        gateway.stop()
        session.stop()


def test_lame_duck_keeps_accepting_while_not_ready_then_stops(tmp_path):
    """limits.drain_delay_secs: after SIGTERM the gateway reports not ready but
    still takes new clients (endpoints are catching up), then stops listening
    and drains."""
    admin = free_port()
    config = tmp_path / "gw.toml"
    # A delay long enough that the new client below connects within it even on
    # a loaded box; the test waits on log lines, not on the clock.
    config.write_text("[limits]\ndrain_delay_secs = 10\nshutdown_grace_secs = 2\n")
    gateway = start_gateway(tmp_path, ["--admin-listen", f"127.0.0.1:{admin}", "--config", str(config)])
    pin_server_key(gateway.public_key.read_text())

    def wait_for_log(text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in gateway.log_text():
            assert gateway.alive() or text in gateway.log_text(), f"exited before logging {text!r}"
            assert time.monotonic() < deadline, f"no {text!r} in the log"
            time.sleep(0.05)

    async def scenario():
        before = await connect(gateway.port, "intermediate")
        assert (await asyncio.wait_for(before.send(PingRequest(1)), 20)).ping_id == 1
        gateway.proc.send_signal(signal.SIGTERM)
        wait_for_log("lame duck")
        assert get(admin, "/readyz")[0] == 503
        # Not ready, yet a client that a stale endpoint still sends here gets in.
        late = await connect(gateway.port, "abridged")
        assert "draining connections" not in gateway.log_text(), "delay over before the client came"
        assert (await asyncio.wait_for(late.send(PingRequest(2)), 20)).ping_id == 2
        assert (await asyncio.wait_for(before.send(PingRequest(3)), 20)).ping_id == 3
        # After the delay: no more accepting, open connections drain.
        wait_for_log("draining connections")
        refused = False
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=1):
                    time.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
                break
            except ConnectionResetError:
                # Aborting the accept task closes the listener a moment after
                # the log line; a connection caught in its backlog is reset.
                time.sleep(0.05)
        assert refused, "still accepting after the lame-duck delay"
        # Then open connections drain: neither owes anything, both are closed.
        for sender in (late, before):
            await wait_closed(sender)
        await late.disconnect()
        await before.disconnect()

    try:
        asyncio.run(scenario())
        assert gateway.proc.wait(timeout=30) == 0
    finally:
        gateway.stop()
