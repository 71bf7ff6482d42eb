#!/usr/bin/env bash
# The README's "On Kubernetes" quick start, step by step, against the cluster in
# KUBECONFIG: the operator from the Helm chart, the reference session and Redis
# (examples/), the RSA key Secret, the MtprotoGateway of examples/gateway.yaml, its
# Available condition and fingerprints, then a Telethon handshake and ping through
# the gateway Service and a look at a gateway pod's /metrics.
#
#   scripts/kind-demo.sh
#
# Idempotent: run it again and it upgrades or keeps what is there. The kind
# workflow runs it on real pods; the local test run (e2e/operator/run.sh) runs it
# with DEMO_TRAFFIC=0 on its control plane, whose pods are kwok fakes.
#
# Env:
#   DEMO_NAMESPACE (default), DEMO_OPERATOR_NAMESPACE (mtproto-system)
#   DEMO_CHART        chart path or OCI reference (charts/mtproto-operator)
#   DEMO_HELM_ARGS    extra `helm upgrade --install` arguments (word-split)
#   DEMO_IMAGE_REGISTRY, DEMO_IMAGE_TAG  where images come from (ghcr.io/mtproto-edge,
#                     the chart's appVersion)
#   DEMO_TRAFFIC (1)  0: stop after the fingerprints (no pods to talk to)
#   DEMO_GATEWAY_ADDR HOST:PORT for the client (default: first node's InternalIP and the NodePort)
#   DEMO_PYTHON (python3, with Telethon), DEMO_TIMEOUT_SECS (300)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NS="${DEMO_NAMESPACE:-default}"
OP_NS="${DEMO_OPERATOR_NAMESPACE:-mtproto-system}"
CHART="${DEMO_CHART:-charts/mtproto-operator}"
REGISTRY="${DEMO_IMAGE_REGISTRY:-ghcr.io/mtproto-edge}"
TAG="${DEMO_IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/mtproto-operator/Chart.yaml)}"
TIMEOUT="${DEMO_TIMEOUT_SECS:-300}"
PYTHON="${DEMO_PYTHON:-python3}"
OUT="$(mktemp -d -t mtproto-demo.XXXXXX)"

log() { printf '[kind-demo %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
k() { kubectl -n "$NS" "$@"; }
# A manifest with its images moved to $REGISTRY and $TAG.
manifest() {
    sed -e "s#image: ghcr.io/mtproto-edge/\(mtproto-[a-z]*\):[^[:space:]]*#image: $REGISTRY/\1:$TAG#" "$1"
}

log "1. the operator (helm, $CHART) in $OP_NS"
# shellcheck disable=SC2086 # DEMO_HELM_ARGS is a list of arguments
helm upgrade --install mtproto-operator "$CHART" --namespace "$OP_NS" --create-namespace \
    --set image.repository="$REGISTRY/mtproto-operator" --set image.tag="$TAG" \
    --wait --timeout "${TIMEOUT}s" ${DEMO_HELM_ARGS:-} >/dev/null
helm test mtproto-operator -n "$OP_NS" --timeout "${TIMEOUT}s" >/dev/null || die "helm test"

log "2. the reference session and Redis in $NS"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
manifest examples/redis.yaml | k apply -f - >/dev/null
manifest examples/session.yaml | k apply -f - >/dev/null

log "3. the RSA key Secret mtproto-rsa"
if ! k get secret mtproto-rsa >/dev/null 2>&1; then
    openssl genrsa 2048 2>/dev/null | k create secret generic mtproto-rsa --from-file=primary.pem=/dev/stdin >/dev/null
fi

log "4. the MtprotoGateway edge (examples/gateway.yaml)"
manifest examples/gateway.yaml | k apply -f - >/dev/null
k wait mtprotogateway/edge --for=condition=Available --timeout="${TIMEOUT}s" >/dev/null \
    || die "MtprotoGateway edge not Available: $(k get mtprotogateway edge -o jsonpath='{.status.conditions}')"
k get mtprotogateway edge -o wide >&2

log "5. what clients need: the fingerprints and the public key (from the status)"
fingerprints="$(k get mtprotogateway edge -o jsonpath='{.status.rsaKeys[*].fingerprint}')"
[[ -n $fingerprints ]] || die "no fingerprints in the status"
log "fingerprints: $fingerprints"
k get mtprotogateway edge -o jsonpath='{.status.rsaKeys[0].publicKey}' >"$OUT/server-rsa-public.pem"
grep -q 'BEGIN RSA PUBLIC KEY' "$OUT/server-rsa-public.pem" || die "no public key in the status"
log "public key: $OUT/server-rsa-public.pem"

if [[ ${DEMO_TRAFFIC:-1} == 0 ]]; then
    log "done (DEMO_TRAFFIC=0: no traffic)"
    exit 0
fi

log "6. a Telethon handshake and ping"
k rollout status deployment/edge --timeout "${TIMEOUT}s" >/dev/null
addr="${DEMO_GATEWAY_ADDR:-}"
if [[ -z $addr ]]; then
    node="$(kubectl get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')"
    port="$(k get service edge -o jsonpath='{.spec.ports[?(@.name=="tcp")].nodePort}')"
    addr="$node:$port"
fi
"$PYTHON" examples/ping.py "${addr%:*}" "${addr##*:}" "$OUT/server-rsa-public.pem" >&2 || die "ping through $addr"

log "7. a gateway pod's /metrics"
pod="$(k get pods -l app.kubernetes.io/instance=edge -o jsonpath='{.items[0].metadata.name}')"
kubectl get --raw "/api/v1/namespaces/$NS/pods/$pod:9090/proxy/metrics" >"$OUT/metrics.txt" \
    || die "cannot scrape $pod"
grep -E '^mtproto_(connections_accepted|handshakes)_total' "$OUT/metrics.txt" >&2 \
    || die "no connection or handshake counters in $pod's /metrics"
log "done"
