"""The load generator keeps working: a short bounded run against a real gateway."""

import re
import subprocess

from conftest import gateway_binary


def test_loadgen_completes_handshakes_and_pings_without_errors(gateway):
    loadgen = gateway_binary().parent / "mtproto-loadgen"
    out = subprocess.run(
        [str(loadgen), "--target", f"127.0.0.1:{gateway.port}", "--public-key", str(gateway.public_key),
         "--connections", "2", "--duration-secs", "2", "--pings", "20"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    handshakes, pings, errors = (int(n) for n in re.search(r"(\d+) handshakes.*?(\d+) ping round trips.*?(\d+) errors", out).groups())
    assert handshakes > 0 and pings > 0, out
    assert errors == 0, out
