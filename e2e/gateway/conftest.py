"""Fixtures: a real `mtproto-gateway` process per test module, on loopback."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "e2e" / "tools"))
from free_ports import pick as pick_free_ports  # noqa: E402

# Our debug logs, without the HTTP/2 frame traces of the gRPC stack.
LOG_FILTER = "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info"


def binary(name: str) -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / name


def gateway_binary() -> Path:
    path = os.environ.get("MTPROTO_GATEWAY_BIN")
    return Path(path) if path else binary("mtproto-gateway")


def session_binary() -> Path:
    return gateway_binary().parent / "mtproto-session"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now, below the ephemeral range, and not handed out before
    in this run (so a restarted process never inherits another's port, or its
    log file). Above the range the operator and fleet scripts pick from."""
    return pick_free_ports(1, low=26000, high=32000, taken=_HANDED_OUT)[0]


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


class Process:
    """A running gateway or session process listening on `port`."""

    def __init__(self, workdir: Path, args: list[str], port: int, public_key: Path | None = None,
                 program: Path | None = None, log_name: str = "gateway.log"):
        self.port = port
        self.public_key = public_key
        self.args = args
        self.workdir = workdir
        self.program = program or gateway_binary()
        self.log_path = workdir / log_name
        self.log = open(self.log_path, "ab")
        # The file may hold an earlier process's lines (a port, and so the
        # name, can come round again): this process's text starts here.
        self.log_start = self.log.tell()
        self.proc = subprocess.Popen(
            [str(self.program), *args],
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
        """What this process wrote, restarts included."""
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def restart(self) -> None:
        """Starts the same program again with the same arguments."""
        if self.proc.poll() is None:
            self.kill()
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.program), *self.args], cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, self.proc)

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


Gateway = Process


def start_gateway(workdir: Path, extra: list[str] | None = None, data: Path | None = None) -> Process:
    port = free_port()
    data = data or workdir / "data"
    args = ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data), "--log-level", LOG_FILTER]
    return Process(workdir, args + (extra or []), port, data / "server-rsa-public.pem",
                   log_name=f"gateway-{port}.log")


def run_loadgen(gateway: "Process", *args: str) -> str:
    """Runs `mtproto-loadgen` against `gateway` with `args` (bounded: 60 s) and returns
    what it printed."""
    run = subprocess.run(
        [str(gateway_binary().parent / "mtproto-loadgen"), "--target", f"127.0.0.1:{gateway.port}",
         "--public-key", str(gateway.public_key), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return run.stdout + run.stderr


def limited_gateway(tmp_path_factory, name: str, limits: str, extra: list[str] | None = None) -> Process:
    """A gateway of its own whose config file's `[limits]` table is `limits` (TOML lines)."""
    workdir = tmp_path_factory.mktemp(name)
    config = workdir / "gateway.toml"
    config.write_text("[limits]\n" + limits)
    return start_gateway(workdir, ["--config", str(config), *(extra or [])])


def start_session(workdir: Path, port: int | None = None, members: list[str] | None = None,
                  extra: list[str] | None = None) -> Process:
    port = port or free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--log-level", LOG_FILTER, *(extra or [])]
    for member in members or []:
        args += ["--member", member]
    return Process(workdir, args, port, program=session_binary(), log_name=f"session-{port}.log")


def start_remote_gateway(workdir: Path, sessions: list[int], mode: str, data: Path | None = None,
                         extra: list[str] | None = None) -> Process:
    args = ["--session-mode", mode, "--grpc-listen", f"127.0.0.1:{free_port()}"]
    for port in sessions:
        args += ["--session", f"grpc://127.0.0.1:{port}"]
    return start_gateway(workdir, args + (extra or []), data)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    assert gw.alive(), "gateway died during the tests:\n" + gw.log_text()[-4000:]
    gw.stop()
