"""The load generator keeps working: a short bounded run against a real gateway."""

import re
import subprocess

import pytest

from conftest import gateway_binary, limited_gateway


@pytest.fixture
def loadgen_gateway(tmp_path_factory):
    # The load generator makes all its handshakes from one address, faster than
    # the default per-address budget (120 a minute) allows: raised, as scripts/bench-lib.sh does.
    gw = limited_gateway(tmp_path_factory, "loadgen", "handshakes_per_ip_per_minute = 100000\n")
    yield gw
    gw.stop()


def test_loadgen_completes_handshakes_and_pings_without_errors(loadgen_gateway):
    loadgen = gateway_binary().parent / "mtproto-loadgen"
    run = subprocess.run(
        [str(loadgen), "--target", f"127.0.0.1:{loadgen_gateway.port}",
         "--public-key", str(loadgen_gateway.public_key),
         "--connections", "2", "--duration-secs", "2", "--pings", "20"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    out = run.stdout + run.stderr
    handshakes, pings, errors = (int(n) for n in re.search(r"(\d+) handshakes.*?(\d+) ping round trips.*?(\d+) errors", out).groups())
    assert handshakes > 0 and pings > 0, out
    assert errors == 0, out
