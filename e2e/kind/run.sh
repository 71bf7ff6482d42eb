#!/usr/bin/env bash
# The fleet e2e on a real cluster: kind in GitHub Actions
# (.github/workflows/kind-e2e.yml), or any cluster KUBECONFIG points at whose
# nodes can run the images. Real gateway, session and operator pods; the client
# is the local fleet e2e's own scenario script (e2e/fleet/traffic.py, Telethon),
# so the two suites cannot drift.
#
#   e2e/kind/run.sh
#
# It installs the operator with Helm, deploys Redis and the sessions
# (examples/redis.yaml, examples/session.yaml), creates the gateway's RSA key Secret, applies the
# MtprotoGateway (gateway.yaml), waits for Ready, and then runs client traffic
# through the gateway Service's NodePort while it
#   1. does nothing (baseline), and scrapes /metrics from every gateway pod;
#   2. scales the sessions from 1 to 3 (ownership moves on the ring);
#   3. deletes a session pod;
#   4. changes the MtprotoGateway so the operator rolls every gateway pod (each
#      old pod drains its clients), then scrapes /metrics again.
# Each step fails if any ping is lost (traffic.py's exit status). The images
# must already be on the nodes (`kind load docker-image`) or pullable.
#
# Env:
#   E2E_NAMESPACE (mtproto-e2e), E2E_OPERATOR_NAMESPACE (mtproto-system)
#   E2E_IMAGE_REGISTRY (ghcr.io/mtproto-edge), E2E_IMAGE_TAG (the chart's appVersion)
#   E2E_GATEWAY_ADDR  HOST:PORT clients use (default: the first node's
#                     InternalIP and the NodePort, reachable from a kind host on Linux)
#   E2E_PYTHON (python3, with e2e/gateway/requirements.txt installed)
#   E2E_CLIENTS (8), E2E_SETTLE_SECS (5: traffic kept up after each change)
#   E2E_TIMEOUT_SECS (300: the longest any one wait may take)
#   E2E_ARTIFACTS     where traffic reports, metrics and (on failure) the
#                     cluster dump go (default: a new temporary directory)
#   E2E_METRICS_BASELINE, E2E_METRICS_AFTER_ROLL  metric names that must be > 0,
#                     summed over the gateway pods, during traffic (defaults below)
#   E2E_KEEP=1        leave everything installed after a successful run
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

NS="${E2E_NAMESPACE:-mtproto-e2e}"
OP_NS="${E2E_OPERATOR_NAMESPACE:-mtproto-system}"
REGISTRY="${E2E_IMAGE_REGISTRY:-ghcr.io/mtproto-edge}"
CHART=charts/mtproto-operator
TAG="${E2E_IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$CHART/Chart.yaml")}"
PYTHON="${E2E_PYTHON:-python3}"
CLIENTS="${E2E_CLIENTS:-8}"
SETTLE="${E2E_SETTLE_SECS:-5}"
TIMEOUT="${E2E_TIMEOUT_SECS:-300}"
ART="${E2E_ARTIFACTS:-$(mktemp -d -t mtproto-kind-e2e.XXXXXX)}"
# Counters and gauges that must be above 0, summed over the gateway pods, while traffic
# flows (docs/metrics.md). After the roll, the new pods saw only clients that came back
# with their keys: lookups instead of handshakes, and maybe no cache hit yet.
METRICS_BASELINE="${E2E_METRICS_BASELINE:-mtproto_connections_accepted mtproto_connections_open mtproto_handshakes mtproto_auth_key_cache_hits mtproto_messages_forwarded mtproto_messages_sent mtproto_sessions mtproto_session_ring_members}"
METRICS_AFTER_ROLL="${E2E_METRICS_AFTER_ROLL:-mtproto_connections_accepted mtproto_connections_open mtproto_auth_key_lookups mtproto_messages_forwarded mtproto_messages_sent mtproto_sessions mtproto_session_ring_members}"
GATEWAY=edge
GATEWAY_PODS="app.kubernetes.io/name=mtproto-gateway,app.kubernetes.io/instance=$GATEWAY"
mkdir -p "$ART"

log() { printf '[kind-e2e %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
k() { kubectl -n "$NS" "$@"; }

TRAFFIC_PID=""
on_exit() {
    local rc=$?
    if [[ -n $TRAFFIC_PID ]]; then
        kill "$TRAFFIC_PID" 2>/dev/null || true
    fi
    if [[ $rc != 0 ]]; then
        log "dumping the cluster state into $ART/dump"
        "$ROOT/e2e/kind/dump.sh" "$ART/dump" "$NS" "$OP_NS" >/dev/null 2>&1 || true
    fi
    log "artifacts: $ART"
}
trap on_exit EXIT

# Prints a manifest with its images moved to $REGISTRY and $TAG.
manifest() {
    sed -e "s#image: ghcr.io/mtproto-edge/\(mtproto-[a-z]*\):[^[:space:]]*#image: $REGISTRY/\1:$TAG#" "$1"
}

# Waits until `cmd...` succeeds, for at most $TIMEOUT seconds.
wait_for() {
    local what="$1" deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 1
    done
}

gateway_ready() {
    local gen obs ready
    gen="$(k get mtprotogateway "$GATEWAY" -o jsonpath='{.metadata.generation}')"
    obs="$(k get mtprotogateway "$GATEWAY" -o jsonpath='{.status.observedGeneration}')"
    ready="$(k get mtprotogateway "$GATEWAY" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')"
    [[ $obs == "$gen" && $ready == True ]]
}

# Names of the gateway pods that are Ready and not terminating.
ready_gateway_pods() {
    # shellcheck disable=SC2016 # a Go template, not a shell expansion
    k get pods -l "$GATEWAY_PODS" -o go-template='{{range .items}}{{if not .metadata.deletionTimestamp}}{{$n := .metadata.name}}{{range .status.conditions}}{{if and (eq .type "Ready") (eq .status "True")}}{{$n}}{{"\n"}}{{end}}{{end}}{{end}}{{end}}'
}

# /metrics of one gateway pod, through the API server's pod proxy (admin port 9090).
scrape() {
    kubectl get --raw "/api/v1/namespaces/$NS/pods/$1:9090/proxy/metrics"
}

# Sum of a metric's samples (NAME or NAME_total, with any labels) in a scrape.
metric_sum() {
    awk -v n="$2" '
        { name = $1; sub(/\{.*/, "", name) }
        name == n || name == n "_total" { s += $NF }
        END { print s + 0 }' "$1"
}

# Every ready gateway pod reports WANT session ring members.
ring_is() {
    local want="$1" pod text
    for pod in $(ready_gateway_pods); do
        text="$(scrape "$pod" 2>/dev/null)" || return 1
        [[ "$(metric_sum <(printf '%s\n' "$text") mtproto_session_ring_members)" == "$want" ]] || return 1
    done
}

# check_metrics LABEL NAMES: scrapes every ready gateway pod; each of NAMES must sum above 0.
check_metrics() {
    local label="$1" names="$2" file="$ART/metrics-$1.txt" pod name sum pods
    pods="$(ready_gateway_pods)"
    [[ -n $pods ]] || die "$label: no ready gateway pod to scrape"
    : >"$file"
    for pod in $pods; do
        scrape "$pod" >>"$file" || die "$label: cannot scrape /metrics of $pod"
    done
    for name in $names; do
        sum="$(metric_sum "$file" "$name")"
        log "$label: $name = $sum (summed over $(wc -w <<<"$pods") pods)"
        awk -v s="$sum" 'BEGIN { exit !(s > 0) }' || die "$label: $name is not above 0 during traffic (see $file)"
    done
}

SERVER=""
TRAFFIC_NAME=""
traffic_ready() {
    kill -0 "$TRAFFIC_PID" 2>/dev/null ||
        die "$TRAFFIC_NAME: traffic.py exited before every client had a pong ($(tail -n 5 "$ART/$TRAFFIC_NAME.log"))"
    [[ -f "$ART/$TRAFFIC_NAME.ready" ]]
}

traffic_start() {
    local name="$1"
    rm -f "$ART/$name.stop" "$ART/$name.ready"
    log "$name: $CLIENTS clients through $SERVER"
    "$PYTHON" e2e/fleet/traffic.py --server "$SERVER" --rsa-public-key "$ART/server-rsa-public.pem" \
        --clients "$CLIENTS" --duration 3600 --report "$ART/$name.json" \
        --until-file "$ART/$name.stop" --ready-file "$ART/$name.ready" >"$ART/$name.log" 2>&1 &
    TRAFFIC_PID=$!
    TRAFFIC_NAME="$name"
    wait_for "$name: every client's first pong" traffic_ready
}

traffic_stop() {
    local name="$1" rc=0
    log "$name: keeping traffic up ${SETTLE}s more, then stopping it"
    sleep "$SETTLE"
    touch "$ART/$name.stop"
    wait "$TRAFFIC_PID" || rc=$?
    TRAFFIC_PID=""
    tail -n 1 "$ART/$name.log" >&2
    [[ $rc == 0 ]] || die "$name: pings lost or mismatched (traffic.py exit $rc; report $ART/$name.json)"
    log "$name: no ping lost"
}

for tool in kubectl helm openssl "$PYTHON"; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
kubectl version >/dev/null || die "no cluster reachable (KUBECONFIG?)"
log "images $REGISTRY/mtproto-{gateway,session,operator}:$TAG; artifacts in $ART"

log "operator: helm install into $OP_NS"
helm upgrade --install mtproto-operator "$CHART" --namespace "$OP_NS" --create-namespace \
    --set image.repository="$REGISTRY/mtproto-operator" --set image.tag="$TAG" \
    --wait --timeout "${TIMEOUT}s"
kubectl wait --for condition=established --timeout "${TIMEOUT}s" crd/mtprotogateways.mtproto-edge.io

log "namespace $NS: Redis and the sessions"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
manifest examples/redis.yaml | k apply -f -
manifest examples/session.yaml | k apply -f -
k rollout status deployment/redis --timeout "${TIMEOUT}s"
k rollout status deployment/session --timeout "${TIMEOUT}s"

# The gateway's key comes from a Secret (the operator mounts it); clients get its
# public half. The private key never goes into the artifacts.
if ! k get secret gateway-rsa >/dev/null 2>&1; then
    log "creating the gateway RSA key Secret gateway-rsa"
    key="$(mktemp)"
    openssl genrsa -out "$key" 2048 2>/dev/null
    k create secret generic gateway-rsa --from-file=primary.pem="$key" >/dev/null
    rm -f "$key"
fi
k get secret gateway-rsa -o jsonpath='{.data.primary\.pem}' | base64 -d |
    openssl rsa -RSAPublicKey_out -out "$ART/server-rsa-public.pem" 2>/dev/null ||
    die "cannot derive the public key from Secret gateway-rsa"

log "gateway: MtprotoGateway $GATEWAY"
manifest e2e/kind/gateway.yaml | k apply -f -
wait_for "MtprotoGateway $GATEWAY Ready" gateway_ready
k rollout status "deployment/$GATEWAY" --timeout "${TIMEOUT}s"
k get mtprotogateway "$GATEWAY" -o wide

if [[ -n ${E2E_GATEWAY_ADDR:-} ]]; then
    SERVER="$E2E_GATEWAY_ADDR"
else
    node_ip="$(kubectl get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')"
    node_port="$(k get service "$GATEWAY" -o jsonpath='{.spec.ports[?(@.name=="tcp")].nodePort}')"
    [[ -n $node_ip && -n $node_port ]] || die "no node address or NodePort for Service $GATEWAY"
    SERVER="$node_ip:$node_port"
fi

log "1. baseline"
traffic_start baseline
check_metrics baseline "$METRICS_BASELINE"
traffic_stop baseline

log "2. sessions 1 -> 3 during traffic"
traffic_start scale
started=$SECONDS
k scale deployment/session --replicas=3
k rollout status deployment/session --timeout "${TIMEOUT}s"
wait_for "3 session ring members on every gateway" ring_is 3
log "scale: ring of every gateway at 3 members $((SECONDS - started))s after kubectl scale (pod start included)"
traffic_stop scale

log "3. a session pod deleted during traffic"
traffic_start delete-session
victim="$(k get pods -l app.kubernetes.io/instance=session -o jsonpath='{.items[0].metadata.name}')"
k delete pod "$victim" --wait=false
k wait --for=delete "pod/$victim" --timeout "${TIMEOUT}s"
session_replicas_ready() { [[ "$(k get deployment session -o jsonpath='{.status.readyReplicas}')" == 3 ]]; }
wait_for "3 ready sessions" session_replicas_ready
wait_for "3 session ring members on every gateway" ring_is 3
traffic_stop delete-session

log "4. every gateway pod rolled (MtprotoGateway change) during traffic"
traffic_start gateway-roll
old_pods="$(k get pods -l "$GATEWAY_PODS" -o name)"
level="$(k get mtprotogateway "$GATEWAY" -o jsonpath='{.spec.logLevel}')"
next=warn
[[ $level == warn ]] && next=info
k patch mtprotogateway "$GATEWAY" --type merge -p "{\"spec\":{\"logLevel\":\"$next\"}}"
k rollout status "deployment/$GATEWAY" --timeout "${TIMEOUT}s"
wait_for "MtprotoGateway $GATEWAY Ready" gateway_ready
# The old pods drain: they close what is left after the gateway's shutdown grace.
# shellcheck disable=SC2086 # one argument per pod
k wait --for=delete $old_pods --timeout "${TIMEOUT}s"
check_metrics after-roll "$METRICS_AFTER_ROLL"
traffic_stop gateway-roll

log "all scenarios passed"
if [[ ${E2E_KEEP:-0} != 1 ]]; then
    log "cleaning up (E2E_KEEP=1 keeps everything)"
    k delete mtprotogateway "$GATEWAY" --wait --timeout "${TIMEOUT}s"
    kubectl delete namespace "$NS" --wait --timeout "${TIMEOUT}s"
    helm uninstall mtproto-operator --namespace "$OP_NS" --wait --timeout "${TIMEOUT}s"
fi
