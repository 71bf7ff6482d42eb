"""The load generator keeps working: a short bounded run against a real gateway."""

import re

import pytest

from conftest import limited_gateway, run_loadgen


@pytest.fixture
def loadgen_gateway(tmp_path_factory):
    # The load generator makes all its handshakes from one address, faster than
    # the default per-address budget (120 a minute) allows: raised, as scripts/bench-lib.sh does.
    gw = limited_gateway(tmp_path_factory, "loadgen", "handshakes_per_ip_per_minute = 100000\n")
    yield gw
    gw.stop()


def test_loadgen_completes_handshakes_and_pings_without_errors(loadgen_gateway):
    out = run_loadgen(loadgen_gateway, "--connections", "2", "--duration-secs", "2", "--pings", "20")
    handshakes, pings, errors = (int(n) for n in re.search(r"(\d+) handshakes.*?(\d+) ping round trips.*?(\d+) errors", out).groups())
    assert handshakes > 0 and pings > 0, out
    assert errors == 0, out


def test_loadgen_measures_pairs_after_every_key_and_reports_the_gateways_cpu(loadgen_gateway):
    """The pair figures perf.sh divides carry no handshakes: the window opens
    once each connection has its key, and the gateway's CPU is read over it."""
    pid = loadgen_gateway.proc.pid
    out = run_loadgen(loadgen_gateway, "--connections", "3", "--duration-secs", "1", "--pings", "1000000000",
                      "--in-flight", "2", "--dh-secret-bits", "256", "--measure-pid", str(pid))
    handshakes, pings, errors = (int(n) for n in re.search(r"(\d+) handshakes.*?(\d+) ping round trips.*?(\d+) errors", out).groups())
    assert (handshakes, errors) == (0, 0) and pings > 0, out
    assert "3 handshakes before the window" in out, out
    gateway_cpu, gateway_switches = (
        float(n) for n in re.search(rf"pid {pid} CPU ([0-9.]+) us/pair, ([0-9.]+) switches/pair", out).groups())
    assert gateway_cpu > 0, out
    # Its runtime's threads sleep between the load generator's messages.
    assert gateway_switches > 0, out
    assert re.search(r"loadgen CPU [0-9.]+ us/pair, [0-9.]+ switches/pair", out), out
    assert re.search(r"machine busy [0-9.]+ CPU s", out), out
