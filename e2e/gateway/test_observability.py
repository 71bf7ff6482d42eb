"""The chart's observability bundle against real metrics: the Grafana dashboards name only
metrics that exist, and the alert rules pass `promtool check rules` and, evaluated by
`promtool test rules` over a scrape of a running gateway, stay quiet on a healthy fleet and
fire on the failure each one is written for."""

import asyncio
import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from telethon.tl.functions import PingRequest

from conftest import free_port, start_remote_gateway, start_session
from mtclient import connect, pin_server_key
from promtext import scrape

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mtproto-operator"
RULES = CHART / "rules" / "mtproto-alerts.yaml"
METRIC_NAME = re.compile(r"\b(mtproto_[a-z0-9_]+)")
# Labels the Prometheus operator's scrape adds; the rules group by them.
TARGET = {"namespace": "edge", "job": "gateway", "instance": "10.0.0.7:9090"}
STEPS = 40  # minutes of synthetic history; alerts are evaluated at the end


def promtool() -> str:
    path = os.environ.get("MTPROTO_PROMTOOL")
    assert path, "set MTPROTO_PROMTOOL to a promtool binary (scripts/test.sh builds one)"
    return path


def base_name(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total", "_info"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def documented_metrics() -> set[str]:
    """Metric names in docs/metrics.md and docs/operator.md, with `{a,b}` families expanded."""
    names = set()
    for doc in ("metrics.md", "operator.md"):
        for token in re.findall(r"`(mtproto_[^`]+)`", (ROOT / "docs" / doc).read_text()):
            token = token.split("{")[0] if "{" in token and "," not in token else token
            match = re.fullmatch(r"(mtproto_[a-z0-9_]*)\{([a-z0-9_,]+)\}([a-z0-9_]*)", token)
            variants = ([match[1] + v + match[3] for v in match[2].split(",")] if match else [token])
            names.update(base_name(v) for v in variants if re.fullmatch(r"mtproto_[a-z0-9_]+", v))
    return names


def scraped_families(text: str) -> set[str]:
    """Metric families a scrape declares (`# TYPE`), with or without samples yet."""
    return {base_name(line.split(" ")[2]) for line in text.splitlines() if line.startswith("# TYPE ")}


def parse_scrape(text: str) -> list[tuple[str, dict[str, str], float, str]]:
    """(sample name, labels, value, family type) for every sample of an OpenMetrics scrape."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
            continue
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, label_text = series.partition("{")
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', label_text))
        kind = types.get(name) or types.get(base_name(name), "gauge")
        samples.append((name, labels, float(value), kind))
    return samples


@pytest.fixture(scope="module")
def fleet_scrape(tmp_path_factory):
    """A remote-session gateway's /metrics after a real Telethon handshake and pings."""
    work = tmp_path_factory.mktemp("observability")
    session = start_session(work)
    admin = free_port()
    gateway = start_remote_gateway(work, [session.port], "unary", extra=["--admin-listen", f"127.0.0.1:{admin}"])
    pin_server_key(gateway.public_key.read_text())

    async def traffic():
        client = await connect(gateway.port, "intermediate")
        for ping_id in range(3):
            await client.send(PingRequest(ping_id=ping_id))
        await client.disconnect()

    asyncio.run(traffic())
    text = scrape(admin)
    gateway.stop()
    session.stop()
    return text


def test_dashboards_name_only_real_metrics(fleet_scrape):
    known = documented_metrics() | scraped_families(fleet_scrape)
    dashboards = sorted((CHART / "dashboards").glob("*.json"))
    assert [d.name for d in dashboards] == ["mtproto-gateway.json", "mtproto-operator.json"]
    for path in dashboards:
        board = json.loads(path.read_text())
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
        assert exprs, f"{path.name} has no queries"
        for expr in exprs:
            names = {base_name(n) for n in METRIC_NAME.findall(expr)}
            assert names, f"{path.name}: a query names no metric: {expr}"
            unknown = names - known
            assert not unknown, f"{path.name}: {sorted(unknown)} neither documented nor scraped ({expr})"
        for var in board["templating"]["list"][1:]:
            for name in METRIC_NAME.findall(var["definition"]):
                assert base_name(name) in known, f"{path.name}: variable {var['name']} reads {name}"


REFUSAL_REASONS = {"listener_full", "client_full", "handshake_flood", "proxy_header", "websocket_upgrade",
                   "tls_handshake", "http_method", "http_path", "http_too_large", "http_bad_body"}


def test_refusals_are_one_counter_with_every_reason_from_the_start(fleet_scrape):
    samples = parse_scrape(fleet_scrape)
    refused = {labels["reason"]: value for name, labels, value, _ in samples if name == "mtproto_refused_total"}
    assert set(refused) == REFUSAL_REASONS
    assert not any(refused.values()), refused
    old = [name for name, *_ in samples if name.startswith(("mtproto_refused_", "mtproto_http_refused_"))
           and name != "mtproto_refused_total"]
    assert not old, old


def test_alert_rules_pass_promtool_check():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def series_from(samples):
    """promtool input series: counters grow by their value each minute, gauges hold it."""
    out = []
    for name, labels, value, kind in samples:
        full = {**labels, **TARGET}
        selector = name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(full.items())) + "}"
        growing = kind in ("counter", "histogram") or name.endswith("_total")
        out.append({"series": selector, "values": f"0+{format(value, 'f')}x{STEPS}" if growing else f"{format(value, 'f')}x{STEPS}"})
    return out


def changed(samples, name, value, **match):
    """The samples with each `name` sample whose labels include `match` set to `value`; if
    none matched, a new counter sample with those labels (a failure a healthy scrape lacks)."""
    out, hit = [], False
    for s_name, labels, s_value, kind in samples:
        if s_name == name and all(labels.get(k) == v for k, v in match.items()):
            s_value, hit = value, True
        out.append((s_name, labels, s_value, kind))
    assert hit or name.endswith("_total"), f"{name} {match} not in the scrape"
    return out if hit else out + [(name, match, value, "counter")]


def operator_series(leader: float, errors_per_minute: float):
    labels = {"namespace": "mtproto-system", "job": "mtproto-operator", "instance": "10.0.0.9:8080"}

    def sel(name, extra=None):
        return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted({**labels, **(extra or {})}.items())) + "}"

    return [
        {"series": sel("mtproto_operator_reconciles_total"), "values": f"0+10x{STEPS}"},
        {"series": sel("mtproto_operator_reconcile_errors_total", {"error": "missing_secret"}),
         "values": f"0+{errors_per_minute}x{STEPS}"},
        {"series": sel("mtproto_operator_leader"), "values": f"{leader}x{STEPS}"},
    ]


def run_rule_tests(tmp_path, rules, tests):
    stripped = copy.deepcopy(rules)
    # Annotations are templates over the firing value; check rules validated them above.
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(stripped))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_quiet_on_a_healthy_scrape_and_fire_on_each_failure(fleet_scrape, tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    samples = parse_scrape(fleet_scrape)
    assert any(n == "mtproto_build_info" and l.get("session_mode") == "unary" for n, l, *_ in samples), \
        "no mtproto_build_info{session_mode=\"unary\"} in the scrape"
    limit = next(v for n, _, v, _ in samples if n == "mtproto_connections_limit")
    gw = {k: TARGET[k] for k in ("namespace", "job")}
    at = f"{STEPS}m"

    def case(input_samples, alert, labels, operator=(1, 0)):
        return {"interval": "1m",
                "input_series": series_from(input_samples) + operator_series(*operator),
                "alert_rule_test": [{"eval_time": at, "alertname": alert,
                                     "exp_alerts": [{"exp_labels": {"severity": alerts[alert]["labels"]["severity"],
                                                                    **labels}}]}]}

    # Every session call slower than 1.5 s: only the buckets above it grow.
    slow = [(n, l, 0 if n.endswith("_bucket") and l["le"] != "+Inf" and float(l["le"]) < 1.5 else v, k)
            if n.startswith("mtproto_session_rpc_duration_seconds") else (n, l, v, k)
            for n, l, v, k in samples]
    operator = {"namespace": "mtproto-system", "job": "mtproto-operator"}
    firing = {
        "MtprotoHandshakeFailures": case(
            changed(samples, "mtproto_handshakes_total", 30, outcome="failed"), "MtprotoHandshakeFailures", gw),
        "MtprotoUnknownKeyRate": case(
            changed(changed(samples, "mtproto_transport_404_sent_total", 30),
                    "mtproto_connections_accepted_total", 40, listener="tcp"),
            "MtprotoUnknownKeyRate", gw),
        "MtprotoSessionRpcErrors": case(
            changed(samples, "mtproto_session_rpc_errors_total", 50,
                    method="session_sendDataToSession", kind="transient"),
            "MtprotoSessionRpcErrors", gw),
        "MtprotoSessionRpcSlow": case(slow, "MtprotoSessionRpcSlow", gw),
        "MtprotoOutboxDrops": case(
            changed(samples, "mtproto_server_messages_dropped_total", 600, reason="outbox_full"),
            "MtprotoOutboxDrops", gw),
        "MtprotoSessionRingEmpty": case(
            changed(samples, "mtproto_session_ring_members", 0), "MtprotoSessionRingEmpty", TARGET),
        "MtprotoConnectionsNearLimit": case(
            changed(samples, "mtproto_connections_open", limit, listener="tcp", transport="intermediate"),
            "MtprotoConnectionsNearLimit", TARGET),
        "MtprotoOperatorReconcileErrors": case(
            samples, "MtprotoOperatorReconcileErrors", {**operator, "error": "missing_secret"}, operator=(1, 3)),
        "MtprotoOperatorNoLeader": case(samples, "MtprotoOperatorNoLeader", operator, operator=(0, 0)),
    }
    assert set(firing) == set(alerts), "every alert needs a firing case here"
    healthy = {"interval": "1m", "input_series": series_from(samples) + operator_series(1, 0),
               "alert_rule_test": [{"eval_time": at, "alertname": a, "exp_alerts": []} for a in alerts]}
    run_rule_tests(tmp_path, rules, [healthy, *firing.values()])
