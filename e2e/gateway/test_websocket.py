"""WebSocket listener: GramJS (a real web client library, under Node) runs the
handshake and a ping over ws:// with obfuscated2 and plain abridged; raw
WebSocket frames check reassembly across message boundaries, ping/pong, and
the refusals (path, Origin, text frames, oversized messages)."""

import base64
import os
import shutil
import socket
import struct
import subprocess
import warnings

import pytest

from conftest import LOG_FILTER, REPO, Process, free_port
from mtclient import recv_exactly
from test_limits import req_pq_multi

GRAMJS = subprocess.run([str(REPO / "scripts" / "install-deps.sh"), "--print-gramjs"],
                        capture_output=True, text=True, check=True).stdout.strip()


def count_gramjs_retries(result: subprocess.CompletedProcess) -> None:
    """ws_ping.js retries GramJS's own 1-in-256 `invalid new nonce hash` once;
    each retry shows as a warning in the test summary."""
    for line in result.stderr.splitlines():
        if line.startswith("gramjs-retry:"):
            warnings.warn(f"GramJS handshake retried once ({line})")
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10


@pytest.fixture(scope="module")
def ws_gateway(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ws")
    ws_port, open_port = free_port(), free_port()
    config = workdir / "gateway.toml"
    config.write_text(f"""
[[listeners]]
address = "127.0.0.1:{open_port}"
transport = "websocket"

[[listeners]]
address = "127.0.0.1:{ws_port}"
transport = "websocket"
allowed_origins = ["https://web.example"]

[limits]
max_frame_bytes = 4096
""")
    data = workdir / "data"
    gw = Process(workdir, ["--config", str(config), "--data-dir", str(data), "--log-level", LOG_FILTER],
                 ws_port, data / "server-rsa-public.pem")
    gw.ws_port = ws_port
    # GramJS under Node sends no Origin: it uses the listener that allows any.
    gw.open_port = open_port
    yield gw
    assert gw.alive(), gw.log_text()[-4000:]
    gw.stop()


class RawWs:
    """A minimal masked WebSocket client over a socket."""

    def __init__(self, port: int, path: str = "/apiws", origin: str | None = "https://web.example",
                 sock: socket.socket | None = None):
        """`sock`: an already connected socket (e.g. TLS-wrapped) instead of a new plain one."""
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
        self.stream = b""
        key = base64.b64encode(os.urandom(16)).decode()
        headers = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                   "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                   "Sec-WebSocket-Protocol: binary"]
        if origin:
            headers.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            response += chunk
        head, _, self.buffer = response.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0
        self.headers = head.decode(errors="replace").lower()

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self.read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", self.read(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self.read(8))
        return b0 & 0x0F, self.read(n)

    def recv_binary(self, n: int) -> bytes:
        """Reads n bytes of the binary stream, whatever the message boundaries."""
        while len(self.stream) < n:
            opcode, payload = self.recv()
            assert opcode == OP_BINARY, (opcode, payload)
            self.stream += payload
        out, self.stream = self.stream[:n], self.stream[n:]
        return out

    def close_code(self) -> int:
        while True:
            opcode, payload = self.recv()
            if opcode == OP_CLOSE:
                # 1005: "no status code present" (RFC 6455 7.4.1).
                return struct.unpack(">H", payload[:2])[0] if payload else 1005


@pytest.fixture(scope="module")
def wss_gateway(tmp_path_factory):
    """A WebSocket listener serving TLS itself, with a self-signed certificate for 127.0.0.1."""
    workdir = tmp_path_factory.mktemp("wss")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    config = workdir / "gateway.toml"
    config.write_text(f"""
[[listeners]]
address = "127.0.0.1:{port}"
transport = "websocket"
tls_cert = "{cert}"
tls_key = "{key}"
""")
    data = workdir / "data"
    gw = Process(workdir, ["--config", str(config), "--data-dir", str(data), "--log-level", LOG_FILTER],
                 port, data / "server-rsa-public.pem")
    gw.cert = cert
    yield gw
    assert gw.alive(), gw.log_text()[-4000:]
    gw.stop()


@pytest.mark.parametrize("transport", ["obfuscated", "abridged"])
def test_gramjs_over_wss(wss_gateway, transport):
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=str(wss_gateway.cert))
    result = subprocess.run(["node", str(REPO / "e2e/gateway/gramjs/ws_ping.js"), GRAMJS, str(wss_gateway.port),
                             str(wss_gateway.public_key), transport, "wss"],
                            capture_output=True, text=True, timeout=90, env=env)
    count_gramjs_retries(result)
    assert result.returncode == 0, result.stdout + result.stderr + wss_gateway.log_text()[-3000:]
    assert "pong 4242" in result.stdout


def test_plain_websocket_on_a_tls_listener_is_refused(wss_gateway):
    ws = socket.create_connection(("127.0.0.1", wss_gateway.port), timeout=10)
    ws.sendall(b"GET /apiws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
    ws.settimeout(10)
    try:
        # The TLS server answers a plaintext request with an alert (or nothing) and closes.
        data = ws.recv(4096)
        assert not data.startswith(b"HTTP/1.1 101")
    except ConnectionResetError:
        pass
    finally:
        ws.close()


@pytest.mark.parametrize("transport", ["obfuscated", "abridged"])
def test_gramjs_handshake_and_ping(ws_gateway, transport):
    result = subprocess.run(["node", str(REPO / "e2e/gateway/gramjs/ws_ping.js"), GRAMJS, str(ws_gateway.open_port),
                             str(ws_gateway.public_key), transport], capture_output=True, text=True, timeout=90)
    count_gramjs_retries(result)
    assert result.returncode == 0, result.stdout + result.stderr + ws_gateway.log_text()[-3000:]
    assert "pong 4242" in result.stdout


def test_frames_reassembled_across_messages_and_ping(ws_gateway):
    ws = RawWs(ws_gateway.ws_port)
    assert ws.status == 101
    assert "sec-websocket-protocol: binary" in ws.headers
    stream = b"\xee\xee\xee\xee" + struct.pack("<I", 40) + req_pq_multi()
    # One byte at a time, then an empty message, then a ping in between.
    for i, byte in enumerate(stream):
        ws.send(OP_BINARY, bytes([byte]))
        if i == 10:
            ws.send(OP_BINARY, b"")
            ws.send(OP_PING, b"hi")
    opcode, payload = ws.recv()
    assert (opcode, payload) == (OP_PONG, b"hi")
    (length,) = struct.unpack("<I", ws.recv_binary(4))
    assert length > 40
    ws.recv_binary(length)
    # Two frames in one message are both answered.
    ws.send(OP_BINARY, (struct.pack("<I", 40) + req_pq_multi()) * 2)
    for _ in range(2):
        (n,) = struct.unpack("<I", ws.recv_binary(4))
        assert n == length
        ws.recv_binary(n)
    ws.sock.close()


def test_each_server_packet_is_one_message(ws_gateway):
    """Web clients (Telegram's own web apps) parse one transport packet per
    WebSocket message: two replies made at once still go out as two messages."""
    ws = RawWs(ws_gateway.ws_port)
    assert ws.status == 101
    ws.send(OP_BINARY, b"\xee\xee\xee\xee" + (struct.pack("<I", 40) + req_pq_multi()) * 3)
    for _ in range(3):
        opcode, payload = ws.recv()
        assert opcode == OP_BINARY
        (length,) = struct.unpack("<I", payload[:4])
        assert len(payload) == 4 + length, "one intermediate packet, whole, per message"
    ws.sock.close()


def test_wrong_path_and_origin_are_refused(ws_gateway):
    assert RawWs(ws_gateway.ws_port, path="/other").status == 404
    assert RawWs(ws_gateway.ws_port, origin="https://evil.example").status == 403
    assert RawWs(ws_gateway.ws_port, origin=None).status == 403
    assert "WebSocket upgrade refused" in ws_gateway.log_text()


@pytest.mark.parametrize("text,code", [(b"hello", 1003), (b"\xee\xee\xee\xee", 1007)])
def test_text_frames_are_refused(ws_gateway, text, code):
    ws = RawWs(ws_gateway.ws_port)
    ws.send(OP_TEXT, text)
    assert ws.close_code() == code
    ws.sock.close()


def test_partial_frame_then_close_and_unmasked_frames(ws_gateway):
    # A WebSocket frame header promising more than is sent, then the client goes away.
    ws = RawWs(ws_gateway.ws_port)
    ws.sock.sendall(bytes([0x82, 0x80 | 100]) + os.urandom(4) + b"abc")
    ws.sock.close()
    # Client frames must be masked (RFC 6455 5.1): protocol error 1002.
    ws = RawWs(ws_gateway.ws_port)
    ws.sock.sendall(bytes([0x82, 4]) + b"\xee\xee\xee\xee")
    assert ws.close_code() == 1002
    ws.sock.close()


def test_oversized_messages_are_refused(ws_gateway):
    ws = RawWs(ws_gateway.ws_port)
    ws.send(OP_BINARY, bytes(4096 + 2048))
    assert ws.close_code() == 1009
    ws.sock.close()


def test_oversized_mtproto_frame_across_messages_is_refused(ws_gateway):
    # Each message is small; the MTProto frame they announce is over max_frame_bytes.
    ws = RawWs(ws_gateway.ws_port)
    ws.send(OP_BINARY, b"\xee\xee\xee\xee" + struct.pack("<I", 8192))
    assert ws.close_code() == 1005
    assert "frame of 8192 bytes is larger than the 4096-byte limit" in ws_gateway.log_text()
    ws.sock.close()
