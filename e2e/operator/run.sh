#!/usr/bin/env bash
# Operator end-to-end test against the local real control plane (e2e/k8s).
#
#   e2e/operator/run.sh
#
# Steps (each bounded in time; any failure exits non-zero):
#   1. unit tests, fmt and clippy of the operator crate; crds/ must match the Rust types
#   2. helm lint + helm template (with and without optional parts) + server-side dry-run
#   3. control plane up (idempotent; brought down at exit only if this script started it)
#   4. helm install of charts/mtproto-operator: CRD, RBAC and the operator Deployment, whose
#      pods kwok runs as fakes (there is no container runtime here), so "operator Ready" is
#      the Deployment's rollout as Kubernetes reports it
#   5. two real operator processes run locally *as the chart's ServiceAccount* (a token
#      minted for it), so the chart's RBAC is what they are tested with; they elect a
#      leader on the chart's Lease name in the release namespace
#   6. Rust integration tests (operator/tests/e2e.rs, `--ignored`): objects, owner
#      references, status, printer columns, kubectl scale, Secret roll, delete cascade,
#      invalid CRs refused, missing Secret reported, ServiceMonitor, the gRPC certificates
#      and the default NetworkPolicy, the plaintext warning; then leader failover
#      (SIGKILL); then the tests' namespaces are deleted while an operator still runs
#      (the gateways carry a finalizer); the last leader must exit 0 on SIGTERM and
#      release the Lease
#   7. helm upgrade, then helm uninstall (operator gone, CRD kept)
#
# Env: MTPROTO_K8S_STATE / MTPROTO_K8S_PORT_BASE are passed through to controlplane.sh.
#      E2E_READY_BUDGET_MS (default 5000) bounds apply->Ready.
#      E2E_KEEP=1 leaves the control plane up even if this script started it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/mtproto-operator-e2e.XXXXXX")"
RELEASE=mtproto-operator
RELEASE_NS=mtproto-system
LEASE_TTL=6
PIDS=()
STARTED_CP=0

log() { printf '[operator-e2e] %s\n' "$*" >&2; }
die() { printf '[operator-e2e] FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  if [[ $rc -ne 0 ]]; then
    for f in "$OUT"/op-*.log; do
      [[ -f $f ]] || continue
      log "---- last lines of $f"; tail -n 30 "$f" >&2 || true
    done
  fi
  if [[ $STARTED_CP == 1 && "${E2E_KEEP:-0}" != 1 ]]; then
    e2e/k8s/controlplane.sh down >/dev/null 2>&1 || true
  fi
  log "artifacts in $OUT (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT

# --- 1. crate checks ------------------------------------------------------------------
log "unit tests, fmt, clippy, CRD drift"
cargo fmt -p mtproto-operator -- --check || die "cargo fmt"
cargo clippy -q -p mtproto-operator --all-targets -- -D warnings || die "clippy"
cargo test -q -p mtproto-operator --lib || die "unit tests"
cargo build -q -p mtproto-operator --bins || die "build"
mkdir -p "$OUT/crds" "$OUT/charts/mtproto-operator/files"
"$CARGO_TARGET_DIR/debug/crdgen" "$OUT" 2>/dev/null || die "crdgen"
for f in crds/mtprotogateways.mtproto-edge.io.yaml charts/mtproto-operator/files/mtprotogateways.mtproto-edge.io.yaml; do
  diff -u "$f" "$OUT/$f" >/dev/null || die "$f drifted from the Rust types: run cargo run -p mtproto-operator --bin crdgen"
done
cargo test -q -p mtproto-operator --test e2e --no-run 2>/dev/null || die "building e2e tests"

# --- 3. control plane (before helm: it brings the tools onto PATH) -----------------------
if ! e2e/k8s/controlplane.sh status >/dev/null 2>&1; then
  STARTED_CP=1
  log "starting the control plane"
fi
timeout 600 e2e/k8s/controlplane.sh up >/dev/null || die "control plane did not come up"
eval "$(e2e/k8s/controlplane.sh env)"
command -v helm >/dev/null || die "helm not on PATH (e2e/k8s/build-tools.sh builds it)"

# --- 2. chart static checks -----------------------------------------------------------
log "helm lint / template"
helm lint --strict charts/mtproto-operator >/dev/null || die "helm lint"
helm lint --strict charts/mtproto-operator --set metrics.serviceMonitor.enabled=true \
  --set prometheusRule.enabled=true --set grafanaDashboards.enabled=true >/dev/null || die "helm lint (all options)"
if helm lint charts/mtproto-operator --set replicaCount=-1 >/dev/null 2>&1; then
  die "values.schema.json accepted replicaCount=-1"
fi
helm lint --strict charts/mtproto-operator --set global.imageRegistry=example.invalid >/dev/null \
  || die "values.schema.json refuses global (umbrella charts set it)"
# Every leaf of values.yaml is in the chart README's values table.
python3 - charts/mtproto-operator <<'PY' || die "charts/mtproto-operator/README.md misses values (above)"
import re, sys, yaml
chart = sys.argv[1]
values = yaml.safe_load(open(f"{chart}/values.yaml"))
readme = open(f"{chart}/README.md").read()
def leaves(node, prefix=""):
    for key, value in node.items():
        path = prefix + key
        if isinstance(value, dict) and value and key not in ("resources", "labels", "annotations"):
            yield from leaves(value, path + ".")
        else:
            yield path
documented = set()
for cell in re.findall(r"^\| ([^|]+) \|", readme, re.M):
    documented.update(re.findall(r"`([A-Za-z0-9_.]+)`", cell))
missing = [p for p in leaves(values) if p not in documented]
print("\n".join(missing), file=sys.stderr)
sys.exit(1 if missing else 0)
PY
# Without the test hook: its Pod names the ServiceAccount, which a dry run cannot find.
helm template "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --skip-tests >"$OUT/rendered.yaml" || die "helm template"
helm template "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" | grep -q 'helm.sh/hook: test' || die "no helm test hook"
for kind in Deployment ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding Service PodDisruptionBudget CustomResourceDefinition; do
  grep -q "^kind: $kind\$" "$OUT/rendered.yaml" || die "rendered chart lacks a $kind"
done
grep -q '^kind: MtprotoGateway$' "$OUT/rendered.yaml" && die "the chart must not install a MtprotoGateway"
grep -q 'helm.sh/resource-policy: keep' "$OUT/rendered.yaml" || die "crds.keep (default) does not annotate the CRD"
grep -q 'topologyKey: kubernetes.io/hostname' "$OUT/rendered.yaml" || die "no default topology spread"
# watchNamespaces: namespaced Roles in the watched and session namespaces, no ClusterRole.
helm template "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --skip-tests \
  --set 'watchNamespaces={gw-a,gw-b}' --set 'sessionNamespaces={sessions}' >"$OUT/rendered-namespaced.yaml" \
  || die "helm template (watchNamespaces)"
grep -q '^kind: ClusterRole' "$OUT/rendered-namespaced.yaml" && die "watchNamespaces still renders a ClusterRole"
python3 - "$OUT/rendered-namespaced.yaml" <<'PY' || die "watchNamespaces: Roles/RoleBindings or env missing (above)"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
where = lambda kind: sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith("operator") )
env = {e["name"]: e.get("value") for d in docs if d["kind"] == "Deployment" for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
want = ["gw-a", "gw-b", "sessions"]
ok = where("Role") == want and where("RoleBinding") == want \
  and env.get("OPERATOR_WATCH_NAMESPACES") == "gw-a,gw-b" and env.get("OPERATOR_SESSION_NAMESPACES") == "sessions" \
  and env.get("OPERATOR_LOG_FORMAT") == "json"
if not ok:
    print(where("Role"), where("RoleBinding"), env, file=sys.stderr)
sys.exit(0 if ok else 1)
PY
helm template "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --set crds.install=false \
  | grep -q '^kind: CustomResourceDefinition$' && die "crds.install=false still renders the CRD"
helm template "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --set crds.keep=false \
  | grep -q 'helm.sh/resource-policy' && die "crds.keep=false still keeps the CRD"
helm template "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --set grafanaDashboards.enabled=true \
  --set prometheusRule.enabled=true >"$OUT/rendered-observability.yaml" || die "helm template (observability)"
python3 - "$OUT/rendered-observability.yaml" charts/mtproto-operator <<'PY' || die "dashboards/PrometheusRule render differently from their files"
import json, sys, yaml
docs = {d["kind"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
chart = sys.argv[2]
boards = docs["ConfigMap"]["data"]
assert sorted(boards) == ["mtproto-gateway.json", "mtproto-operator.json"], sorted(boards)
for name, text in boards.items():
    assert json.loads(text) == json.load(open(f"{chart}/dashboards/{name}")), name
assert docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
assert docs["PrometheusRule"]["spec"] == yaml.safe_load(open(f"{chart}/rules/mtproto-alerts.yaml"))
PY
kubectl create namespace "$RELEASE_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply --server-side --force-conflicts --dry-run=server -f "$OUT/rendered.yaml" >/dev/null \
  || die "rendered chart refused by the API server (dry run)"

# --- 4. helm install ----------------------------------------------------------------------
log "helm install"
helm uninstall "$RELEASE" -n "$RELEASE_NS" --wait >/dev/null 2>&1 || true
helm install "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --wait --timeout 90s \
  --set leaderElection.leaseTtlSeconds=$LEASE_TTL >"$OUT/helm-install.txt" || die "helm install"
kubectl wait --for=condition=Established crd/mtprotogateways.mtproto-edge.io --timeout=30s >/dev/null \
  || die "CRD not established"
kubectl -n "$RELEASE_NS" rollout status deployment/"$RELEASE" --timeout=60s >/dev/null \
  || die "operator Deployment not Ready"
ready=$(kubectl -n "$RELEASE_NS" get deployment "$RELEASE" -o jsonpath='{.status.readyReplicas}')
[[ $ready == 2 ]] || die "operator Deployment has $ready ready replicas, want 2"
log "operator Deployment Ready (2/2, pods run by kwok)"
helm test "$RELEASE" -n "$RELEASE_NS" --timeout 60s >"$OUT/helm-test.txt" || die "helm test"

# kube-controller-manager's garbage collector picks up a new CRD kind only on its next
# discovery resync (every 30 s), and until then cannot cascade deletes from it. Gate on
# that with a probe: an owned ConfigMap must vanish once its MtprotoGateway is deleted.
# (Runs before any operator starts, so the probe gets no finalizer.)
gc_started=$(date +%s)
kubectl -n "$RELEASE_NS" apply -f - >/dev/null <<EOF || die "GC probe gateway"
apiVersion: mtproto-edge.io/v1alpha1
kind: MtprotoGateway
metadata: {name: gc-probe}
spec:
  image: probe
  listeners: [{name: tcp, port: 10443}]
  rsaKeys: [{secretName: none, key: none}]
  session: {service: {name: none}}
EOF
probe_uid=$(kubectl -n "$RELEASE_NS" get mtprotogateway gc-probe -o jsonpath='{.metadata.uid}')
kubectl -n "$RELEASE_NS" apply -f - >/dev/null <<EOF || die "GC probe ConfigMap"
apiVersion: v1
kind: ConfigMap
metadata:
  name: gc-probe
  ownerReferences:
  - {apiVersion: mtproto-edge.io/v1alpha1, kind: MtprotoGateway, name: gc-probe, uid: "$probe_uid"}
EOF
kubectl -n "$RELEASE_NS" delete mtprotogateway gc-probe >/dev/null
kubectl -n "$RELEASE_NS" wait --for=delete configmap/gc-probe --timeout=120s >/dev/null 2>&1 \
  || die "garbage collector never cascaded from MtprotoGateway"
log "garbage collector follows MtprotoGateway after $(( $(date +%s) - gc_started )) s"

# --- 5. real operators as the chart's ServiceAccount ----------------------------------
token=$(kubectl -n "$RELEASE_NS" create token "$RELEASE" --duration=1h) || die "token for the chart's ServiceAccount"
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
cat >"$OUT/operator-kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "$server", certificate-authority-data: "$ca"}
users:
- name: operator
  user: {token: "$token"}
contexts:
- name: operator
  context: {cluster: e2e, user: operator}
current-context: operator
EOF
# Free ports for the two operators' HTTP servers (below the ephemeral range).
read -r PORT_A PORT_B < <(python3 e2e/tools/free_ports.py 2)
ops=""
for id in a b; do
  port=$([[ $id == a ]] && echo "$PORT_A" || echo "$PORT_B")
  KUBECONFIG="$OUT/operator-kubeconfig" POD_NAMESPACE="$RELEASE_NS" RUST_LOG="info,kube=warn" \
    OPERATOR_LEASE_NAME="$RELEASE" OPERATOR_LEASE_TTL_SECONDS=$LEASE_TTL \
    "$CARGO_TARGET_DIR/debug/mtproto-operator" --http-addr "127.0.0.1:$port" --identity "local-op-$id" \
    --session-namespaces e2e-operator-sessions \
    >"$OUT/op-$id.log" 2>&1 &
  PIDS+=($!)
  ops="${ops:+$ops,}local-op-$id:$!:$port"
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || die "operator $id not ready (log: $OUT/op-$id.log)"
done
log "operators running: $ops"

# --- 5b. the README's quick start, literally (scripts/kind-demo.sh; pods are kwok fakes, so no traffic)
log "quick start (scripts/kind-demo.sh, DEMO_TRAFFIC=0)"
DEMO_NAMESPACE=quickstart DEMO_OPERATOR_NAMESPACE="$RELEASE_NS" DEMO_TRAFFIC=0 DEMO_TIMEOUT_SECS=120 \
  DEMO_HELM_ARGS="--set leaderElection.leaseTtlSeconds=$LEASE_TTL" \
  scripts/kind-demo.sh 2>"$OUT/kind-demo.log" || { tail -n 20 "$OUT/kind-demo.log" >&2; die "quick start"; }
kubectl delete namespace quickstart --wait=false >/dev/null
kubectl wait --for=delete namespace/quickstart --timeout=90s >/dev/null 2>&1 \
  || die "quick start namespace not deleted (a gateway finalizer left behind?)"

# --- 6. integration tests -----------------------------------------------------------------
export E2E_OPERATORS="$ops" E2E_LEASE_NAMESPACE="$RELEASE_NS" E2E_LEASE_NAME="$RELEASE"
export E2E_REPORT="$OUT/report.txt"
log "integration tests"
timeout 600 cargo test -q -p mtproto-operator --test e2e -- --ignored --test-threads=1 --skip leader_failover \
  || die "integration tests"
timeout 300 cargo test -q -p mtproto-operator --test e2e -- --ignored --exact leader_failover \
  || die "leader failover test"
# Remove the tests' namespaces while an operator still runs to lift the gateways' finalizers.
if [[ -n $(kubectl get namespace -l mtproto-edge.io/e2e=true -o name) ]]; then
  kubectl delete namespace -l mtproto-edge.io/e2e=true --wait=false >/dev/null
  kubectl wait --for=delete namespace -l mtproto-edge.io/e2e=true --timeout=90s >/dev/null 2>&1 \
    || die "test namespaces not deleted (a gateway finalizer left behind?)"
fi
kubectl delete crd -l mtproto-edge.io/e2e=true --ignore-not-found >/dev/null

# A leader stopped with SIGTERM exits 0 and hands the Lease back at once.
survivor=""
for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && survivor=$pid; done
[[ -n $survivor ]] || die "no operator left running after the failover test"
kill -TERM "$survivor"
rc=0; timeout 15 tail --pid="$survivor" -f /dev/null || die "leader did not exit within 15 s of SIGTERM"
wait "$survivor" || rc=$?
[[ $rc == 0 ]] || die "leader exited with $rc on SIGTERM"
holder=$(kubectl -n "$RELEASE_NS" get lease "$RELEASE" -o jsonpath='{.spec.holderIdentity}')
[[ -z $holder ]] || die "lease still held by '$holder' after the leader's SIGTERM"
log "leader exited 0 on SIGTERM and released the lease"

# --- 7. helm upgrade / uninstall ------------------------------------------------------
log "helm upgrade / uninstall"
helm upgrade "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --wait --timeout 90s \
  --set replicaCount=3 --set leaderElection.leaseTtlSeconds=$LEASE_TTL >/dev/null || die "helm upgrade"
[[ $(kubectl -n "$RELEASE_NS" get deployment "$RELEASE" -o jsonpath='{.status.readyReplicas}') == 3 ]] \
  || die "helm upgrade did not scale the operator to 3"
helm uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 60s >/dev/null || die "helm uninstall"
if kubectl -n "$RELEASE_NS" get deployment "$RELEASE" >/dev/null 2>&1; then
  die "operator Deployment still present after uninstall"
fi
kubectl get crd mtprotogateways.mtproto-edge.io >/dev/null || die "CRD must survive helm uninstall"

log "PASS"
cat "$E2E_REPORT" >&2
