#!/usr/bin/env bash
# Operator memory with many large Secrets in the cluster: a benchmark (it reports, it
# asserts nothing), run by hand against the local control plane (e2e/k8s).
#
#   e2e/operator/secret-memory.sh OPERATOR_BIN [OPERATOR_BIN ...]
#
# Creates SECRETS (default 2000) Secrets of SECRET_KIB (default 100) KiB of random data
# in one namespace, then runs each given operator binary alone (cluster-admin, its own
# Lease) for SETTLE seconds (default 30) and prints its peak and current resident
# memory (VmHWM, VmRSS). Compare a build whose Secret watch streams every Secret's data
# with one that watches metadata only.
#
# Env: MTPROTO_K8S_STATE / MTPROTO_K8S_PORT_BASE pass through to controlplane.sh (set
#      them to run beside another control plane); E2E_KEEP=1 leaves it up.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
SECRETS="${SECRETS:-2000}"
SECRET_KIB="${SECRET_KIB:-100}"
SETTLE="${SETTLE:-30}"
NS=e2e-secret-memory
OUT="$(mktemp -d "${TMPDIR:-/tmp}/mtproto-secret-memory.XXXXXX")"
STARTED_CP=0
PID=""

log() { printf '[secret-memory] %s\n' "$*" >&2; }
die() { printf '[secret-memory] FAIL: %s\n' "$*" >&2; exit 1; }

[[ $# -ge 1 ]] || die "usage: $0 OPERATOR_BIN [OPERATOR_BIN ...]"
for bin in "$@"; do [[ -x $bin ]] || die "$bin is not an executable"; done

cleanup() {
  local rc=$?
  if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  if [[ $STARTED_CP == 1 && "${E2E_KEEP:-0}" != 1 ]]; then
    e2e/k8s/controlplane.sh down >/dev/null 2>&1 || true
  fi
  log "artifacts in $OUT (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT


if ! e2e/k8s/controlplane.sh status >/dev/null 2>&1; then
  STARTED_CP=1
  log "starting the control plane"
fi
timeout 600 e2e/k8s/controlplane.sh up >/dev/null || die "control plane did not come up"
eval "$(e2e/k8s/controlplane.sh env)"
kubectl apply --server-side -f crds/ >/dev/null || die "CRD"
kubectl wait --for=condition=Established crd/mtprotogateways.mtproto-edge.io --timeout=30s >/dev/null

have=$(kubectl get namespace "$NS" >/dev/null 2>&1 && kubectl -n "$NS" get secrets -l mtproto-edge.io/bench=secret-memory -o name | wc -l || echo 0)
if [[ $have -lt $SECRETS ]]; then
  log "creating $SECRETS Secrets of $SECRET_KIB KiB in $NS"
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  mkdir -p "$OUT/secrets"
  python3 - "$SECRETS" "$SECRET_KIB" "$OUT/secrets" "$NS" <<'EOF'
import base64, os, sys
n, kib, out, ns = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
per_file = 100
for f in range(0, n, per_file):
    with open(f"{out}/{f:05d}.yaml", "w") as fh:
        for i in range(f, min(n, f + per_file)):
            data = base64.b64encode(os.urandom(kib * 1024)).decode()
            fh.write(f"---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: bulk-{i:05d}\n  namespace: {ns}\n"
                     f"  labels: {{mtproto-edge.io/bench: secret-memory}}\ndata:\n  blob: {data}\n")
EOF
  for f in "$OUT"/secrets/*.yaml; do
    kubectl apply --server-side -f "$f" >/dev/null || die "creating Secrets from $f"
  done
fi
count=$(kubectl -n "$NS" get secrets -l mtproto-edge.io/bench=secret-memory -o name | wc -l)
log "$count bench Secrets in the cluster"

printf '%-60s %10s %10s\n' "operator" "VmHWM MiB" "VmRSS MiB"
n=0
for bin in "$@"; do
  n=$((n + 1))
  port=$(python3 "$ROOT/e2e/tools/free_ports.py" 1)
  RUST_LOG="info,kube=warn" POD_NAMESPACE=default OPERATOR_LEASE_NAME="secret-memory-$n" \
    "$bin" --http-addr "127.0.0.1:$port" --identity "secret-memory-$n" >"$OUT/op-$n.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  # Leadership, then the watches list everything they cover; SETTLE seconds is ample.
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^mtproto_operator_leader 1' && break
    sleep 0.1
  done
  sleep "$SETTLE"
  hwm=$(awk '/^VmHWM/ {printf "%.1f", $2/1024}' "/proc/$PID/status")
  rss=$(awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$PID/status")
  printf '%-60s %10s %10s\n' "$bin" "$hwm" "$rss"
  kill -TERM "$PID"
  wait "$PID" || true
  PID=""
done
