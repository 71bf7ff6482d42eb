"""A mass disconnect (a load balancer restart, a network blip): thousands of
connections, each the last of its MTProto session on the gateway, close at
once. The gateway reports every closed session to the session service
(`session_closeSession`) with no failed call: the reports queue behind a
gateway-wide bound instead of opening thousands of HTTP/2 streams that time
out and get reset."""

import resource
import socket
import time

from conftest import free_port, start_gateway, start_session
from mtclient import Session, create_auth_key, intermediate_frame, pin_server_key, ping
from promtext import metric, scrape

CONNECTIONS = 10_000


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` with these labels (0 when there is none)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    found = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        base, _, label_text = series.partition("{")
        if not line.startswith("#") and base in (name, name + "_total") and all(w in label_text for w in wanted):
            found += float(value)
    return found


def wait_for(what, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what.__doc__ or what}"
        time.sleep(step)


def test_thousands_of_sessions_closing_at_once_are_all_reported(tmp_path):
    # The gateway and this test each hold one descriptor per connection.
    raise_fd_limit(CONNECTIONS * 2 + 1024)
    session = start_session(tmp_path)
    admin = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
admin_listen = "127.0.0.1:{admin}"

[limits]
max_connections_per_ip = {CONNECTIONS * 2}
max_sessions_per_auth_key = {CONNECTIONS * 2}
""")
    gateway = start_gateway(tmp_path, ["--config", str(config), "--session-mode", "unary",
                                       "--grpc-listen", f"127.0.0.1:{free_port()}",
                                       "--session", f"grpc://127.0.0.1:{session.port}"])
    socks: list[socket.socket] = []
    try:
        pin_server_key(gateway.public_key.read_text())
        key = create_auth_key(gateway.port)
        # One key, a session per connection: each connection is the only one
        # of its session, so each close is a session to report.
        for _ in range(CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            mt = Session(key)
            s.sendall(b"\xee\xee\xee\xee" + intermediate_frame(mt.message(ping(1))))
            socks.append(s)

        def all_attached():
            """every session attached on the gateway"""
            return metric(scrape(admin), "mtproto_sessions") >= CONNECTIONS
        wait_for(all_attached, 120)

        for s in socks:
            s.close()
        socks.clear()

        def all_detached():
            """every session detached"""
            return metric(scrape(admin), "mtproto_sessions") == 0
        wait_for(all_detached, 120)

        def all_reported():
            """the session service saw every close"""
            return session.log_text().count("session closed by its gateway") >= CONNECTIONS
        wait_for(all_reported, 120, step=1.0)

        text = scrape(admin)
        errors = total(text, "mtproto_session_rpc_errors")
        assert errors == 0, f"{errors} session calls failed:\n" + "\n".join(
            line for line in text.splitlines() if "rpc_errors" in line)
        assert gateway.alive() and session.alive()
    finally:
        for s in socks:
            s.close()
        assert gateway.stop() == 0
        session.stop()
