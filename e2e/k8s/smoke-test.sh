#!/usr/bin/env bash
# End-to-end check of the local Kubernetes test bed (controlplane.sh):
#   up -> namespace -> Deployment (2 replicas) Running with pod IPs and Available
#   -> Service -> EndpointSlice with the pod IPs -> delete Deployment -> ReplicaSet and pods
#   garbage-collected -> helm version + helm install --wait / uninstall -> namespace deletion.
#
# Usage: smoke-test.sh [--keep-up | --down]
#   --down     (default) bring the control plane down at the end (also on failure)
#   --keep-up  leave it running (eval "$(e2e/k8s/controlplane.sh env)" to use it)
# Env: MTPROTO_K8S_KEEP_UP=1 is the same as --keep-up; see controlplane.sh for the others.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KEEP_UP="${MTPROTO_K8S_KEEP_UP:-0}"
for a in "$@"; do
  case "$a" in
    --keep-up) KEEP_UP=1 ;;
    --down) KEEP_UP=0 ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "unknown argument: $a (use --keep-up or --down)" >&2; exit 2 ;;
  esac
done

T_START=$SECONDS
now_ms() { echo $(($(date +%s%N) / 1000000)); }
since() { local d=$(($(now_ms) - $1)); printf '%d.%03ds' $((d / 1000)) $((d % 1000)); }
step() { printf '\n[smoke] === %s\n' "$*" >&2; }
ok() { printf '[smoke] ok: %s\n' "$*" >&2; }
fail() {
  printf '\n[smoke] FAILED: %s\n' "$*" >&2
  if [[ -n "${NS:-}" && -n "${KUBECONFIG:-}" ]]; then
    {
      echo "--- diagnostics (namespace $NS)"
      kubectl get all,endpointslices -n "$NS" -o wide 2>&1 || true
      kubectl get events -n "$NS" --sort-by=.lastTimestamp 2>&1 | tail -n 20 || true
      kubectl get nodes -o wide 2>&1 || true
      echo "--- logs in ${MTPROTO_K8S_STATE:-/tmp/mtproto-k8s}/logs"
    } >&2
  fi
  exit 1
}

cleanup() {
  local rc=$?
  if [[ "$KEEP_UP" == 1 ]]; then
    echo "[smoke] leaving the control plane up: eval \"\$($HERE/controlplane.sh env)\"" >&2
  else
    # keep the logs of a failed run for CI artifacts
    if [[ $rc != 0 && -d "${MTPROTO_K8S_STATE:-/tmp/mtproto-k8s}/logs" ]]; then
      local keep="${MTPROTO_K8S_STATE:-/tmp/mtproto-k8s}-failed-logs"
      rm -rf "$keep" && cp -r "${MTPROTO_K8S_STATE:-/tmp/mtproto-k8s}/logs" "$keep" && echo "[smoke] logs copied to $keep" >&2
    fi
    "$HERE/controlplane.sh" down || true
  fi
  exit $rc
}
trap cleanup EXIT

# wait_until <timeout-seconds> <description> <command...>: poll every 0.25s
wait_until() {
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after ${timeout}s: $what"
    sleep 0.25
  done
}

# ------------------------------------------------------------------------------------------
step "build tools (cached after the first run)"
"$HERE/build-tools.sh" >/dev/null || fail "build-tools.sh failed"

step "control plane up"
t=$(now_ms)
"$HERE/controlplane.sh" up || fail "controlplane.sh up failed"
ok "up in $(since "$t")"
eval "$("$HERE/controlplane.sh" env)"
[[ -f "$KUBECONFIG" ]] || fail "no kubeconfig at $KUBECONFIG"
command -v kubectl | grep -q "^$(dirname "$(command -v kube-apiserver)")/kubectl$" || fail "kubectl is not the one we built"
kubectl version 2>&1 | sed 's/^/[smoke]   /' >&2
kubectl version -o json | grep -q '"gitVersion": "v1\.' || fail "server does not report a real version"

step "namespace"
NS="smoke-$(date +%s)-$RANDOM"
kubectl create namespace "$NS" >/dev/null || fail "create namespace"
wait_until 30 "default ServiceAccount in $NS" kubectl -n "$NS" get serviceaccount default
ok "namespace $NS with default ServiceAccount"

step "Deployment with 2 replicas"
t=$(now_ms)
kubectl -n "$NS" apply -f - >/dev/null <<'EOF' || fail "apply Deployment"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 2
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      containers:
      - name: echo
        image: registry.invalid/echo:fake   # never pulled: kwok only fakes the pod status
        ports:
        - {name: http, containerPort: 8080}
EOF
kubectl -n "$NS" wait --for=condition=Available deployment/echo --timeout=60s >/dev/null \
  || fail "Deployment echo not Available within 60s"
T_AVAILABLE=$(since "$t")
running_with_ips() {
  local out
  out=$(kubectl -n "$NS" get pods -l app=echo \
    -o jsonpath='{range .items[*]}{.status.phase} {.status.podIP} {.spec.nodeName}{"\n"}{end}')
  [[ $(grep -c '^Running [0-9a-f.:]\+ kwok-node-' <<<"$out") == 2 && $(wc -l <<<"$out") == 2 ]]
}
wait_until 30 "2 pods Running with pod IPs" running_with_ips
kubectl -n "$NS" get pods -l app=echo -o wide | sed 's/^/[smoke]   /' >&2
POD_IPS=$(kubectl -n "$NS" get pods -l app=echo -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}' | sort)
ok "Deployment Available after ${T_AVAILABLE}; pods Running with IPs: $(echo $POD_IPS)"

step "Service -> EndpointSlice"
kubectl -n "$NS" apply -f - >/dev/null <<'EOF' || fail "apply Service"
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: http}
EOF
slice_ips() {
  kubectl -n "$NS" get endpointslices -l kubernetes.io/service-name=echo \
    -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]}{" "}{.conditions.ready}{"\n"}{end}' | sort
}
slice_matches() { local out; out=$(slice_ips) && [[ "$out" == "$(sed 's/$/ true/' <<<"$POD_IPS")" ]]; }
wait_until 30 "EndpointSlice of Service echo listing both pod IPs as ready" slice_matches
kubectl -n "$NS" get endpointslices -l kubernetes.io/service-name=echo | sed 's/^/[smoke]   /' >&2
ok "EndpointSlice has the pod IPs (ready): $(echo $POD_IPS)"

step "delete Deployment -> garbage collection"
RS=$(kubectl -n "$NS" get rs -l app=echo -o name)
[[ -n "$RS" ]] || fail "no ReplicaSet found for the Deployment"
kubectl -n "$NS" delete deployment echo --wait=false >/dev/null || fail "delete Deployment"
t=$(now_ms)
# (a failing kubectl must not count as "gone": check its exit status too)
gone() { local out; out=$(kubectl -n "$NS" get "$@" -l app=echo -o name) && [[ -z "$out" ]]; }
wait_until 60 "ReplicaSet $RS garbage-collected" gone rs
wait_until 60 "pods garbage-collected" gone pods
empty_slice() { local out; out=$(slice_ips) && [[ -z "$out" ]]; }
wait_until 30 "EndpointSlice emptied" empty_slice
ok "ReplicaSet and pods collected in $(since "$t"); EndpointSlice empty"

step "helm"
helm version --short | sed 's/^/[smoke]   /' >&2 || fail "helm version"
helm version --short | grep -q '^v3\.' || fail "helm version does not report v3.x"
CHART_DIR=$(mktemp -d)
trap 'rm -rf "$CHART_DIR"; cleanup' EXIT
helm create "$CHART_DIR/smoke" >/dev/null || fail "helm create"
t=$(now_ms)
helm install smoke "$CHART_DIR/smoke" -n "$NS" --wait --timeout 90s \
  --set image.repository=registry.invalid/nginx --set image.tag=fake >/dev/null \
  || fail "helm install --wait"
kubectl -n "$NS" get deploy smoke -o jsonpath='{.status.availableReplicas}' | grep -qx 1 || fail "helm release Deployment not available"
helm uninstall smoke -n "$NS" --wait --timeout 60s >/dev/null || fail "helm uninstall"
ok "helm install --wait took $(since "$t") (incl. uninstall)"

step "delete namespace"
kubectl delete namespace "$NS" --wait=false >/dev/null
ns_gone() { local out; out=$(kubectl get namespace "$NS" --ignore-not-found -o name) && [[ -z "$out" ]]; }
wait_until 60 "namespace $NS deleted" ns_gone
ok "namespace deleted"

printf '\n[smoke] PASSED in %ss (Deployment Available after %s)\n' "$((SECONDS - T_START))" "$T_AVAILABLE" >&2
