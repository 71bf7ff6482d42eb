"""Fixtures: a real `mtproto-gateway` process per test module, on loopback."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def gateway_binary() -> Path:
    path = os.environ.get("MTPROTO_GATEWAY_BIN")
    if path:
        return Path(path)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "mtproto-gateway"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"gateway did not listen on {port} within {timeout}s")


class Gateway:
    """A running gateway process and what a client needs to reach it."""

    def __init__(self, workdir: Path, args: list[str], port: int, public_key: Path):
        self.port = port
        self.public_key = public_key
        self.log_path = workdir / "gateway.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(gateway_binary()), *args],
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, self.proc)
        except Exception:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def start_gateway(workdir: Path, extra: list[str] | None = None) -> Gateway:
    port = free_port()
    data = workdir / "data"
    args = ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--log-level", "debug"]
    return Gateway(workdir, args + (extra or []), port, data / "server-rsa-public.pem")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    assert gw.alive(), "gateway died during the tests:\n" + gw.log_text()[-4000:]
    gw.stop()
