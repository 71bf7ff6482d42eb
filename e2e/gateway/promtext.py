"""Reading the gateway's /metrics (Prometheus text) in tests."""

import urllib.request


def scrape(admin_port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{admin_port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The first sample `name` (or `name_total`) whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        base, _, label_text = series.partition("{")
        if base in (name, name + "_total") and all(w in label_text for w in wanted):
            return float(value)
    raise AssertionError(f"{name} {labels} not in metrics:\n{text}")
