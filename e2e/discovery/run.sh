#!/usr/bin/env bash
# The gateway's EndpointSlice discovery against the local real control plane
# (e2e/k8s). Brings the plane up if needed and down again if it started it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
STARTED=0
if ! e2e/k8s/controlplane.sh status >/dev/null 2>&1; then
    STARTED=1
fi
cleanup() { [[ $STARTED == 1 ]] && e2e/k8s/controlplane.sh down >/dev/null 2>&1 || true; }
trap cleanup EXIT
timeout 600 e2e/k8s/controlplane.sh up >/dev/null
eval "$(e2e/k8s/controlplane.sh env)"
cargo test -p mtproto-gateway --locked --test discovery -- --ignored --nocapture
