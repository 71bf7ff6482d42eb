#!/usr/bin/env bash
# The project's test command: installs what the tests need (idempotently),
# then runs lints, unit tests and the end-to-end suites.
#
#   scripts/test.sh            everything
#   scripts/test.sh --quick    skip the end-to-end suites
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1

# Build outputs and tool environments live outside the checkout, keyed by
# version, so fresh clones on the same machine (CI) reuse them.
export MTPROTO_CACHE="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MTPROTO_CACHE/cargo-target}"
mkdir -p "$MTPROTO_CACHE"

step() { printf '\n=== %s\n' "$*"; }

step "dependencies"
"$ROOT/scripts/install-deps.sh"
VENV="$("$ROOT/scripts/install-deps.sh" --print-venv)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "CI files: workflow (actionlint), Dockerfile (BuildKit lint), shell scripts (shellcheck)"
scripts/lint-ci.sh

step "cargo clippy (all targets: also type-checks the benches)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "Redis and MariaDB on loopback"
scripts/services.sh up
eval "$(scripts/services.sh env)"

step "cargo test"
cargo test --workspace --locked

step "auth key stores against real Redis, MariaDB and SQLite"
cargo test -p mtproto-gateway --locked --test stores -- --ignored

step "fuzz smoke (each target a few seconds on its seed corpus)"
scripts/fuzz.sh --smoke

if [[ $QUICK == 1 ]]; then
    exit 0
fi

step "gateway e2e (Telethon)"
cargo build -p mtproto-gateway -p mtproto-session -p mtproto-testclient --locked
# The alert rules test (test_observability.py) checks and evaluates rules with promtool.
MTPROTO_PROMTOOL="$(e2e/tools/promtool.sh)"
export MTPROTO_PROMTOOL
export MTPROTO_GATEWAY_BIN="$CARGO_TARGET_DIR/debug/mtproto-gateway"
(cd e2e/gateway && "$VENV/bin/python" -m pytest -q -p no:cacheprovider)

step "grammers (a third-party Rust client) against the embedded default, every TCP transport"
CARGO_TARGET_DIR="$MTPROTO_CACHE/grammers-target" e2e/grammers/run.sh

step "Kubernetes test bed (built from Go modules once, cached by version)"
e2e/k8s/build-tools.sh

step "control plane up (once more from scratch if the first start fails)"
# The fleet e2e's test hosts (network namespaces behind 10.77.0.1) reach the apiserver there.
export MTPROTO_K8S_EXTRA_ADDRESSES="${MTPROTO_K8S_EXTRA_ADDRESSES:-10.77.0.1}"
e2e/k8s/controlplane.sh up || { e2e/k8s/controlplane.sh down; e2e/k8s/controlplane.sh up; }
trap 'e2e/k8s/controlplane.sh down >/dev/null 2>&1 || true' EXIT

step "operator e2e (real kube-apiserver, helm)"
e2e/operator/run.sh

step "gateway EndpointSlice discovery (real kube-apiserver)"
e2e/discovery/run.sh

step "kind e2e manifests: server-side dry run (real kube-apiserver)"
(eval "$(e2e/k8s/controlplane.sh env)" && e2e/kind/validate.sh)

step "fleet e2e: operator, gateways, sessions on test hosts, Telethon traffic (real kube-apiserver)"
if [[ $(id -u) == 0 ]]; then
    e2e/fleet/run.sh
else
    echo "SKIPPED: e2e/fleet/run.sh needs root (ip netns, veth)" >&2
fi
