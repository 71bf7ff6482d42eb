"""Listener TLS (`wss://`, `https://`) picks up renewed certificate files without a
restart, as cert-manager renews them: the mounted Secret's files are swapped the way the
kubelet does it (a new timestamped directory behind the `..data` symlink). New TLS
connections see the new certificate, an open WebSocket carries on, and a bad new pair is
logged while the previous certificate keeps serving."""

import hashlib
import http.client
import os
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import LOG_FILTER, Process, free_port, wait_for_port
from test_limits import req_pq_multi
from test_websocket import OP_BINARY, OP_PING, OP_PONG, RawWs

RES_PQ = 0x05162463


def make_certificate(path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM text."""
    cert, key = path.with_suffix(".crt"), path.with_suffix(".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={path.name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert.read_text(), key.read_text()


def fingerprint(pem: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


class SecretVolume:
    """A directory laid out like a mounted Kubernetes Secret: `tls.crt` and `tls.key` are
    symlinks through `..data`, which each update points at a new directory atomically."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.revision = 0
        for name in ("tls.crt", "tls.key"):
            (root / name).symlink_to(Path("..data") / name)

    def write(self, cert: str, key: str) -> None:
        self.revision += 1
        target = self.root / f"..rev_{self.revision}"
        target.mkdir()
        (target / "tls.crt").write_text(cert)
        (target / "tls.key").write_text(key)
        link = self.root / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.root / "..data")


def tls_context(*certs: str) -> ssl.SSLContext:
    """Verifies the gateway against any of `certs` (self-signed), for 127.0.0.1."""
    context = ssl.create_default_context(cadata="".join(certs))
    context.check_hostname = True
    return context


def served_fingerprint(sock: ssl.SSLSocket) -> str:
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


def wss_connect(port: int, context: ssl.SSLContext) -> RawWs:
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                               server_hostname="127.0.0.1")
    ws = RawWs(port, origin=None, sock=sock)
    assert ws.status == 101, ws.headers
    ws.send(OP_BINARY, b"\xee\xee\xee\xee")
    return ws


def still_serves(ws: RawWs) -> None:
    """A WebSocket ping and an MTProto req_pq_multi are both answered on `ws`."""
    ws.send(OP_PING, b"alive")
    assert ws.recv() == (OP_PONG, b"alive")
    ws.send(OP_BINARY, struct.pack("<I", 40) + req_pq_multi())
    (length,) = struct.unpack("<I", ws.recv_binary(4))
    answer = ws.recv_binary(length)
    assert struct.unpack("<I", answer[20:24])[0] == RES_PQ


def https_fingerprint(port: int, context: ssl.SSLContext) -> str:
    """Runs one HTTP-transport request over a new TLS connection; the certificate it saw."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("POST", "/api", body=req_pq_multi())
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert struct.unpack("<I", response.read()[20:24])[0] == RES_PQ
        return served_fingerprint(conn.sock)
    finally:
        conn.close()


@pytest.fixture
def tls_gateway(tmp_path):
    secret = SecretVolume(tmp_path / "secret")
    first = make_certificate(tmp_path / "first")
    secret.write(*first)
    wss_port, https_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    tls = f'tls_cert = "{secret.root / "tls.crt"}"\ntls_key = "{secret.root / "tls.key"}"\n'
    config.write_text(f"""
[[listeners]]
address = "127.0.0.1:{wss_port}"
transport = "websocket"
{tls}
[[listeners]]
address = "127.0.0.1:{https_port}"
transport = "http"
{tls}""")
    data = tmp_path / "data"
    gw = Process(tmp_path, ["--config", str(config), "--data-dir", str(data), "--log-level", LOG_FILTER],
                 wss_port, data / "server-rsa-public.pem")
    wait_for_port(https_port, gw.proc)
    gw.https_port, gw.secret, gw.first = https_port, secret, first
    yield gw
    assert gw.alive(), gw.log_text()[-4000:]
    gw.stop()


def test_renewed_certificate_serves_new_connections_and_open_ones_carry_on(tls_gateway, tmp_path):
    gw = tls_gateway
    second = make_certificate(tmp_path / "second")
    context = tls_context(gw.first[0], second[0])
    old = wss_connect(gw.port, context)
    assert served_fingerprint(old.sock) == fingerprint(gw.first[0])
    still_serves(old)
    assert https_fingerprint(gw.https_port, context) == fingerprint(gw.first[0])

    gw.secret.write(*second)
    new = wss_connect(gw.port, context)
    assert served_fingerprint(new.sock) == fingerprint(second[0])
    still_serves(new)
    assert https_fingerprint(gw.https_port, context) == fingerprint(second[0])
    # The connection made on the first certificate is untouched.
    still_serves(old)
    assert served_fingerprint(old.sock) == fingerprint(gw.first[0])
    assert gw.log_text().count("tls_cert/tls_key changed: reloaded") == 2  # both listeners
    old.sock.close()
    new.sock.close()


def test_a_bad_new_pair_is_logged_and_the_previous_certificate_stays(tls_gateway, tmp_path):
    gw = tls_gateway
    other = make_certificate(tmp_path / "other")
    third = make_certificate(tmp_path / "third")
    context = tls_context(gw.first[0], other[0], third[0])
    # A certificate with another certificate's key, then a key file that is not PEM.
    for cert, key in [(other[0], third[1]), (other[0], "not a key\n")]:
        gw.secret.write(cert, key)
        ws = wss_connect(gw.port, context)
        assert served_fingerprint(ws.sock) == fingerprint(gw.first[0])
        still_serves(ws)
        ws.sock.close()
        assert https_fingerprint(gw.https_port, context) == fingerprint(gw.first[0])
    log = gw.log_text()
    assert log.count("changed but cannot be loaded, keeping the previous ones") == 4, log[-3000:]
    assert " ERROR " in log.split("changed but cannot be loaded")[0].rsplit("\n", 1)[-1]
    # Fixed: the next connection gets the good new pair.
    gw.secret.write(*third)
    ws = wss_connect(gw.port, context)
    assert served_fingerprint(ws.sock) == fingerprint(third[0])
    ws.sock.close()
