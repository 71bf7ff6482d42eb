#!/usr/bin/env bash
# Builds promtool (Prometheus's rule checker and rule unit-test runner) from the Go module
# proxy, once per version, and prints its path. The alert rules test (e2e/gateway/
# test_observability.py) runs it. Service-discovery plugins are left out (remove_all_sd):
# promtool needs none of them to check and test rules, and they are most of the build.
set -euo pipefail

PROMETHEUS_VERSION=v0.316.0   # the Go module version of Prometheus v3.16
CACHE="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}/promtool-$PROMETHEUS_VERSION"
BIN="$CACHE/promtool"

if [[ ! -x $BIN ]]; then
  command -v go >/dev/null || { echo "promtool.sh: go not found in PATH" >&2; exit 1; }
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock -w 1800 9 || { echo "promtool.sh: timed out waiting for $CACHE/.lock" >&2; exit 1; }
  if [[ ! -x $BIN ]]; then
    echo "promtool.sh: building promtool $PROMETHEUS_VERSION (a few minutes, once)" >&2
    (
      cd "$CACHE"
      CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false" GOBIN="$CACHE" \
        nice -n 10 go install -tags remove_all_sd -ldflags "-s -w" \
        "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
    ) >&2
  fi
fi
"$BIN" --version >/dev/null
echo "$BIN"
