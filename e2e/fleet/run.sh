#!/usr/bin/env bash
# The fleet end to end, locally: operator installed by Helm, gateways as processes running
# the config the operator rendered, sessions as processes on test hosts (network
# namespaces) behind a selector-less Service whose EndpointSlices the test writes, and a
# real third-party client (Telethon) pinging through all of it while the fleet changes.
#
#   e2e/fleet/run.sh          (root: it creates network namespaces)
#
#   1. control plane up (apiserver reachable from the test hosts too), helm install of the
#      operator chart, one operator process as the chart's ServiceAccount, the
#      MtprotoGateway e2e/fleet/gateway.yaml; its ConfigMap is what the gateways run, with
#      mutual TLS to the sessions from the certificates the operator issued
#   2. test hosts 10.77.0.11.. behind bridge 10.77.0.1, each running mtproto-session with
#      its ring following the Service (--kubernetes-service); Redis on 10.77.0.1 holds the
#      sessions' auth keys and salts (as teamgram's sessions share Redis)
#   3. scenarios, each with traffic.py pinging through both gateways:
#      a baseline · b scale sessions 2→3 · c scale down 3→2 · d kill -9 a session ·
#      e API-server restart · f /metrics · g SIGTERM a gateway
#
# Env: MTPROTO_K8S_STATE / MTPROTO_K8S_PORT_BASE pass through to controlplane.sh;
#      FLEET_SUBNET (default 10.77.0), FLEET_CLIENTS (default 24), FLEET_SESSION_TLS
#      (mutual, the default, or plaintext: the CR's session.tls.mode, as with teamgram's Go
#      sessions), E2E_KEEP=1 keeps the
#      control plane up when this script started it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
HERE="$ROOT/e2e/fleet"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/debug"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/mtproto-fleet-e2e.XXXXXX")"
export FLEET_SUBNET="${FLEET_SUBNET:-10.77.0}"
HOST_IP="$FLEET_SUBNET.1"
# Enough clients (each with its own key) that every session owns some keys:
# with 24 keys and 3 sessions, the chance one gets none is below 1e-4.
CLIENTS="${FLEET_CLIENTS:-24}"
SESSION_TLS_MODE="${FLEET_SESSION_TLS:-mutual}"
[[ $SESSION_TLS_MODE == mutual || $SESSION_TLS_MODE == plaintext ]] \
  || { echo "FLEET_SESSION_TLS must be mutual or plaintext, not $SESSION_TLS_MODE" >&2; exit 2; }
NS=mtproto-fleet
RELEASE=mtproto-operator
RELEASE_NS=mtproto-system
SESSION_PORT=20120
DRAIN_GRACE=3
STARTED_CP=0
T_START=$SECONDS
declare -A PID=()

log() { printf '[fleet-e2e %3ds] %s\n' "$((SECONDS - T_START))" "$*" >&2; }
FAILED=""
die() { FAILED="$*"; printf '[fleet-e2e] FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }

stop_pid() { # stop_pid <pid> [signal]: signal, wait up to 10 s, then SIGKILL
  local pid=$1 sig=${2:-TERM}
  kill -0 "$pid" 2>/dev/null || return 0
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? name
  touch "$OUT"/stop-* 2>/dev/null || true
  for name in "${!PID[@]}"; do [[ $name == operator ]] || stop_pid "${PID[$name]}"; done
  "$HERE/netns.sh" down || true
  [[ -z "${PID[operator]:-}" ]] || stop_pid "${PID[operator]}"
  if [[ $STARTED_CP != 1 || "${E2E_KEEP:-0}" == 1 ]] && command -v kubectl >/dev/null; then
    # No operator is left to lift the gateway's finalizer (nothing outside the namespace
    # to clean up: the session Service is in the same one).
    kubectl -n "$NS" patch mtprotogateway edge --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
    kubectl delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    helm uninstall "$RELEASE" -n "$RELEASE_NS" >/dev/null 2>&1 || true
  fi
  if [[ $rc -ne 0 ]]; then
    for f in "$OUT"/*.log; do
      [[ -f $f ]] || continue
      log "---- last lines of $f (DEBUG left out)"; grep -v ' DEBUG ' "$f" | tail -n 15 >&2 || true
    done
  fi
  if [[ $STARTED_CP == 1 && "${E2E_KEEP:-0}" != 1 ]]; then
    e2e/k8s/controlplane.sh down >/dev/null 2>&1 || true
  fi
  log "artifacts in $OUT (exit $rc)"
  # Last, so that a log tail shows why.
  [[ -z $FAILED ]] || printf '[fleet-e2e] FAIL: %s\n' "$FAILED" >&2
  exit "$rc"
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || die "needs root (ip netns, veth)"
VENV="$("$ROOT/scripts/install-deps.sh" --print-venv)"
PY="$VENV/bin/python"

free_ports() { # free_ports <n>: n free TCP ports on every address, below the ephemeral range
  python3 "$ROOT/e2e/tools/free_ports.py" "$1"
}

wait_until() { # wait_until <seconds> <what> <command...>
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out after ${limit}s waiting for $what"
    sleep 0.1
  done
}

# ---------------------------------------------------------------------------- build --
log "build"
cargo build -q -p mtproto-gateway -p mtproto-session -p mtproto-operator --bins --locked || die "build"

# ---------------------------------------------------------------------- test hosts --
"$HERE/netns.sh" up || die "bridge"

# -------------------------------------------------------------------- control plane --
export MTPROTO_K8S_EXTRA_ADDRESSES="${MTPROTO_K8S_EXTRA_ADDRESSES:+$MTPROTO_K8S_EXTRA_ADDRESSES,}$HOST_IP"
e2e/k8s/controlplane.sh status >/dev/null 2>&1 || STARTED_CP=1
timeout 600 e2e/k8s/controlplane.sh up >/dev/null || die "control plane did not come up"
eval "$(e2e/k8s/controlplane.sh env)"
APISERVER=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
CA=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
APISERVER_PORT=${APISERVER##*:}
log "control plane up ($APISERVER, also https://$HOST_IP:$APISERVER_PORT)"

kubeconfig_for() { # kubeconfig_for <file> <server> <namespace> <serviceaccount>
  local token
  token=$(kubectl -n "$3" create token "$4" --duration=1h) || die "token for $3/$4"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "$2", certificate-authority-data: "$CA"}
users:
- name: $4
  user: {token: "$token"}
contexts:
- name: $4
  context: {cluster: e2e, user: $4, namespace: $3}
current-context: $4
EOF
}

# ------------------------------------------------------------------ operator + CR --
log "helm install, operator, MtprotoGateway"
if kubectl get namespace "$NS" >/dev/null 2>&1; then
  # A leftover from an interrupted run: no operator is left to lift its finalizers.
  for gw in $(kubectl -n "$NS" get mtprotogateways -o name 2>/dev/null); do
    kubectl -n "$NS" patch "$gw" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null || true
  done
  kubectl delete namespace "$NS" --timeout=60s >/dev/null || die "leftover namespace $NS"
fi
helm uninstall "$RELEASE" -n "$RELEASE_NS" --wait >/dev/null 2>&1 || true
kubectl create namespace "$RELEASE_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
helm install "$RELEASE" charts/mtproto-operator -n "$RELEASE_NS" --wait --timeout 90s \
  --set replicaCount=1 >"$OUT/helm-install.txt" || die "helm install"
kubectl wait --for=condition=Established crd/mtprotogateways.mtproto-edge.io --timeout=30s >/dev/null \
  || die "CRD not established"
kubeconfig_for "$OUT/operator.kubeconfig" "$APISERVER" "$RELEASE_NS" "$RELEASE"
read -r OP_PORT < <(free_ports 1)
KUBECONFIG="$OUT/operator.kubeconfig" POD_NAMESPACE="$RELEASE_NS" RUST_LOG="info,kube=warn" \
  OPERATOR_LEASE_NAME="$RELEASE" OPERATOR_LEASE_TTL_SECONDS=15 \
  "$BIN/mtproto-operator" --http-addr "127.0.0.1:$OP_PORT" --identity fleet-e2e \
  >"$OUT/operator.log" 2>&1 &
PID[operator]=$!

kubectl create namespace "$NS" >/dev/null
openssl genrsa -out "$OUT/gateway-rsa.pem" 2048 2>/dev/null
kubectl -n "$NS" create secret generic gateway-rsa --from-file=primary.pem="$OUT/gateway-rsa.pem" >/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$OUT/tls.key" -out "$OUT/tls.crt" -days 1 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null
kubectl -n "$NS" create secret tls gateway-tls --cert="$OUT/tls.crt" --key="$OUT/tls.key" >/dev/null
kubectl -n "$NS" apply -f "$HERE/session.yaml" >/dev/null
sed "s/^    tls: {mode: mutual}$/    tls: {mode: $SESSION_TLS_MODE}/" "$HERE/gateway.yaml" | kubectl -n "$NS" apply -f - >/dev/null
rendered_tls='\[session\.tls\]'
[[ $SESSION_TLS_MODE == plaintext ]] && rendered_tls='^plaintext = true'
config_rendered() {
  kubectl -n "$NS" get configmap edge-config -o jsonpath='{.data.gateway\.toml}' | grep -q "$rendered_tls"
}
wait_until 60 "the operator to render edge-config" config_rendered
kubectl -n "$NS" get configmap edge-config -o jsonpath='{.data.gateway\.toml}' >"$OUT/gateway.toml"
wait_until 60 "edge's Role for EndpointSlices" kubectl -n "$NS" get rolebinding edge-endpointslice-reader
log "operator rendered edge-config ($(grep -c . "$OUT/gateway.toml") lines)"

# The pod's view of the files: the config, the RSA key and the wss listener's certificate
# from their Secrets, as projected at /etc/mtproto-gateway, here under $OUT/etc/mtproto-gateway.
ETC="$OUT/etc/mtproto-gateway"
for f in tls.crt tls.key; do
  grep -q "\"/etc/mtproto-gateway/tls/wss/$f\"" "$OUT/gateway.toml" || die "the wss listener's $f is not rendered"
  mkdir -p "$ETC/tls/wss"
  kubectl -n "$NS" get secret gateway-tls -o "go-template={{index .data \"$f\"}}" | base64 -d >"$ETC/tls/wss/$f"
done
while read -r path; do
  rel=${path#/etc/mtproto-gateway/}
  [[ $rel != "$path" ]] || die "rendered key path $path is not under /etc/mtproto-gateway"
  secret=${rel#rsa/}; secret=${secret%%/*}; key=${rel##*/}; key=${key%.pem}
  mkdir -p "$(dirname "$ETC/$rel")"
  kubectl -n "$NS" get secret "$secret" -o "go-template={{index .data \"$key.pem\"}}" | base64 -d >"$ETC/$rel" \
    || kubectl -n "$NS" get secret "$secret" -o "go-template={{index .data \"$key\"}}" | base64 -d >"$ETC/$rel"
done < <(sed -n 's/^rsa_private_keys = \[\(.*\)\]$/\1/p' "$OUT/gateway.toml" | tr ',' '\n' | tr -d ' "')
# Mutual TLS on the session gRPC with the certificates the operator issued: the gateway's
# Secret as the pod mounts it at /var/run/mtproto-gateway/session-tls, the sessions' Secret
# as session pods mount it (examples/session.yaml).
RUN="$OUT/var/run/mtproto-gateway"
SESSION_TLS="$OUT/session-tls"
SESSION_TLS_FLAGS=(--plaintext)
if [[ $SESSION_TLS_MODE == mutual ]]; then
  mkdir -p "$RUN/session-tls" "$SESSION_TLS"
  wait_until 30 "the operator's gRPC certificates" kubectl -n "$NS" get secret edge-gateway-tls edge-session-tls
  for f in ca.crt tls.crt tls.key; do
    grep -q "\"/var/run/mtproto-gateway/session-tls/$f\"" "$OUT/gateway.toml" || die "session.tls $f is not rendered"
    kubectl -n "$NS" get secret edge-gateway-tls -o "go-template={{index .data \"$f\"}}" | base64 -d >"$RUN/session-tls/$f"
    kubectl -n "$NS" get secret edge-session-tls -o "go-template={{index .data \"$f\"}}" | base64 -d >"$SESSION_TLS/$f"
  done
  SESSION_TLS_FLAGS=(--tls-ca "$SESSION_TLS/ca.crt" --tls-cert "$SESSION_TLS/tls.crt" --tls-key "$SESSION_TLS/tls.key")
fi
log "session gRPC: $SESSION_TLS_MODE"
sed -e "s|/etc/mtproto-gateway/|$ETC/|g" -e "s|/var/run/mtproto-gateway/|$RUN/|g" \
  "$OUT/gateway.toml" >"$ETC/gateway.toml"
openssl rsa -in "$OUT/gateway-rsa.pem" -RSAPublicKey_out -out "$OUT/server-rsa-public.pem" 2>/dev/null

# ------------------------------------------------------------------------ sessions --
read -r REDIS_PORT < <(free_ports 1)
redis-server --bind "$HOST_IP" --port "$REDIS_PORT" --save '' --appendonly no --protected-mode no \
  >"$OUT/redis.log" 2>&1 &
PID[redis]=$!
wait_until 10 "redis" redis-cli -h "$HOST_IP" -p "$REDIS_PORT" ping

kubeconfig_for "$OUT/session.kubeconfig" "https://$HOST_IP:$APISERVER_PORT" "$NS" session
session_ip() { "$HERE/netns.sh" ip "$1"; }
member() { echo "$(session_ip "$1"):$SESSION_PORT"; }

start_session() { # start_session <n>: test host n and the session process on it
  local n=$1
  "$HERE/netns.sh" del "$n"
  "$HERE/netns.sh" add "$n"
  ip netns exec "mtfleet-s$n" env KUBECONFIG="$OUT/session.kubeconfig" POD_IP="$(session_ip "$n")" \
    POD_NAMESPACE="$NS" "$BIN/mtproto-session" --listen "0.0.0.0:$SESSION_PORT" \
    --kubernetes-service session --kubernetes-port-name grpc \
    --redis-url "redis://$HOST_IP:$REDIS_PORT" \
    "${SESSION_TLS_FLAGS[@]}" \
    --log-level "info,mtproto_session::grpc_server=trace" >>"$OUT/session-$n.log" 2>&1 &
  PID[session-$n]=$!
  wait_until 20 "session $n listening" bash -c "exec 3<>/dev/tcp/$(session_ip "$n")/$SESSION_PORT"
}

# The slice is written with one server-side-apply request (curl, the kubeconfig's client
# certificate), so the measured delays are the API write → ring, not kubectl's start-up.
mkdir -p "$OUT/admin"
kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$OUT/admin/ca.crt"
kubectl config view --raw --minify -o jsonpath='{.users[0].user.client-certificate-data}' | base64 -d >"$OUT/admin/client.crt"
kubectl config view --raw --minify -o jsonpath='{.users[0].user.client-key-data}' | base64 -d >"$OUT/admin/client.key"
[[ -s "$OUT/admin/client.crt" ]] || die "the kubeconfig has no client certificate"
SLICE_URL="$APISERVER/apis/discovery.k8s.io/v1/namespaces/$NS/endpointslices/session-e2e?fieldManager=fleet-e2e&force=true"
apply_slice() { # apply_slice <n...>: the Service's one EndpointSlice lists these hosts, ready
  local n eps=""
  for n in "$@"; do
    eps+="
- addresses: [\"$(session_ip "$n")\"]
  conditions: {ready: true, serving: true, terminating: false}
  targetRef: {kind: Pod, name: session-$n, namespace: $NS}"
  done
  [[ -n $eps ]] || eps=" []"
  curl -sf --max-time 10 --cacert "$OUT/admin/ca.crt" --cert "$OUT/admin/client.crt" --key "$OUT/admin/client.key" \
    -X PATCH -H 'Content-Type: application/apply-patch+yaml' --data-binary @- "$SLICE_URL" >/dev/null <<EOF || die "EndpointSlice write"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: session-e2e
  labels:
    kubernetes.io/service-name: session
    endpointslice.kubernetes.io/managed-by: fleet-e2e.mtproto-edge.io
addressType: IPv4
ports:
- {name: grpc, port: $SESSION_PORT, protocol: TCP}
endpoints:$eps
EOF
}
members_of() { local n out=(); for n in "$@"; do out+=("$(member "$n")"); done; (IFS=,; echo "${out[*]}"); }

# ------------------------------------------------------------------------ gateways --
read -r GW_A GW_B ADM_A ADM_B GRPC_A GRPC_B WSS_A WSS_B < <(free_ports 8)
kubeconfig_for "$OUT/gateway.kubeconfig" "$APISERVER" "$NS" edge
start_gateway() { # start_gateway <name> <listen port> <admin port> <grpc port> <wss port>
  # What differs from the pod: ports (two gateways share this host), the data dir, the
  # kubeconfig (a token of the operator-made ServiceAccount instead of in-cluster), and a
  # short drain grace and lame-duck delay so scenario g stays quick. POD_IP is the host's bridge address,
  # where sessions dial the reverse path ($POD_IP:grpc port, as in a pod). The listeners
  # keep the rendered kinds and TLS; only their addresses move to loopback ports.
  grep -q '"0.0.0.0:10443"' "$ETC/gateway.toml" && grep -q '"0.0.0.0:11443"' "$ETC/gateway.toml" \
    || die "rendered listeners are not on 10443 and 11443"
  sed -e "s|\"0.0.0.0:10443\"|\"127.0.0.1:$2\"|" -e "s|\"0.0.0.0:11443\"|\"127.0.0.1:$5\"|" \
    "$ETC/gateway.toml" >"$ETC/gateway-$1.toml"
  KUBECONFIG="$OUT/gateway.kubeconfig" POD_IP="$HOST_IP" \
    MTPROTO_GATEWAY_LIMITS__SHUTDOWN_GRACE_SECS=$DRAIN_GRACE MTPROTO_GATEWAY_LIMITS__DRAIN_DELAY_SECS=1 \
    "$BIN/mtproto-gateway" --config "$ETC/gateway-$1.toml" --data-dir "$OUT/data-$1" \
    --admin-listen "127.0.0.1:$3" --grpc-listen "0.0.0.0:$4" \
    >"$OUT/gateway-$1.log" 2>&1 &
  PID[gateway-$1]=$!
}
metric() { # metric <admin port> <name>: the sum of a family's samples (empty if absent)
  curl -sf --max-time 2 "http://127.0.0.1:$1/metrics" \
    | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $NF; f = 1 } END { if (f) print s }'
}
ring_is() { [[ "$(metric "$1" mtproto_session_ring_members)" == "$2" ]]; }

GW_LOGS=("$OUT/gateway-a.log" "$OUT/gateway-b.log")
ring_change() { # ring_change <label> <t0> <members csv> <logs...>: wait, record the delays
  local label=$1 t0=$2 want=$3 bound=1000; shift 3
  if [[ $1 == --no-bound ]]; then bound=""; shift; fi
  "$PY" "$HERE/ringwait.py" "$t0" "$want" 15 "$@" >"$OUT/ring-$label.txt" || die "ring change $label"
  local ms; ms=$(awk '{printf "%s%s", sep, $2; sep=" "}' "$OUT/ring-$label.txt")
  printf '%s ms: %s\n' "$label" "$ms" >>"$OUT/latencies.txt"
  log "ring change $label: $ms ms (EndpointSlice write → ring, per process)"
  [[ -z $bound ]] || for v in $ms; do ((v < bound)) || die "ring change $label took $v ms (must be < 1 s)"; done
}

start_session 1
start_session 2
t0=$(now); apply_slice 1 2
ring_change sessions-start "$t0" "$(members_of 1 2)" "$OUT/session-1.log" "$OUT/session-2.log"
start_gateway a "$GW_A" "$ADM_A" "$GRPC_A" "$WSS_A"
start_gateway b "$GW_B" "$ADM_B" "$GRPC_B" "$WSS_B"
wait_until 30 "gateway a ready" curl -sf "http://127.0.0.1:$ADM_A/readyz"
wait_until 30 "gateway b ready" curl -sf "http://127.0.0.1:$ADM_B/readyz"
wait_until 10 "gateway rings of 2" bash -c "$(declare -f metric ring_is); ring_is $ADM_A 2 && ring_is $ADM_B 2"
grep -q "server_id=$HOST_IP:$GRPC_A" "$OUT/gateway-a.log" || die "gateway a does not advertise $HOST_IP:$GRPC_A"
# The wss:// listener the operator rendered from the CR's listeners[].tls: a real web
# client (GramJS) handshakes and pings through it and the remote sessions.
GRAMJS="$("$ROOT/scripts/install-deps.sh" --print-gramjs)"
NODE_EXTRA_CA_CERTS="$OUT/tls.crt" timeout 60 node "$ROOT/e2e/gateway/gramjs/ws_ping.js" "$GRAMJS" "$WSS_A" \
  "$OUT/server-rsa-public.pem" obfuscated wss >"$OUT/wss-ping.txt" 2>&1 || die "GramJS over wss:// (see $OUT/wss-ping.txt)"
grep -q "^pong" "$OUT/wss-ping.txt" || die "GramJS over wss:// got no pong"
log "wss:// listener from the CR's tls: GramJS $(grep '^pong' "$OUT/wss-ping.txt"), handshakes retried on GramJS's invalid-new-nonce-hash flaw: $(grep -c '^gramjs-retry:' "$OUT/wss-ping.txt" || true)"
log "fleet up: gateways 127.0.0.1:$GW_A/$GW_B (reverse path $HOST_IP:$GRPC_A/$GRPC_B), sessions $(members_of 1 2)"

# ------------------------------------------------------------------------- traffic --
traffic_start() { # traffic_start <phase> [extra traffic.py flags]
  local phase=$1; shift
  "$PY" "$HERE/traffic.py" --server "127.0.0.1:$GW_A" --server "127.0.0.1:$GW_B" \
    --rsa-public-key "$OUT/server-rsa-public.pem" --clients "$CLIENTS" --interval 0.15 --duration 120 \
    --until-file "$OUT/stop-$phase" --ready-file "$OUT/ready-$phase" \
    --report "$OUT/traffic-$phase.json" "$@" >"$OUT/traffic-$phase.out" 2>"$OUT/traffic-$phase.log" &
  PID[traffic-$phase]=$!
  wait_until 60 "traffic $phase: every client's first pong" test -f "$OUT/ready-$phase"
}
traffic_stop() { # traffic_stop <phase>: ends the run; its exit status is the verdict
  local phase=$1 rc=0
  touch "$OUT/stop-$phase"
  wait "${PID[traffic-$phase]}" || rc=$?
  unset "PID[traffic-$phase]"
  log "traffic $phase: $(report_line "$phase")"
  [[ $rc == 0 ]] || die "traffic $phase: pings lost or unanswered (exit $rc; $(failures_of "$phase"); $OUT/traffic-$phase.json)"
}
failures_of() { # the first failed pings of a run, and client errors
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))
ev=[e for e in r["events"] if e["kind"] in ("lost","wrong_pong","auth_key_not_found")]
errors=r["client_errors"][:2]
print(f"{len(ev)} failed pings, first {ev[:3]}, client errors {errors}")' \
    "$OUT/traffic-$1.json" 2>/dev/null || echo "no report"
}
report_line() {
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))
print(" ".join(f"{k}={r[k]}" for k in ("sent","answered","lost","reconnects","resent_after_close","resent_on_timeout","max_rtt_ms")))' \
    "$OUT/traffic-$1.json"
}
report_value() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$OUT/traffic-$1.json" "$2"; }
accepted() { grep -c "message accepted" "$OUT/session-$1.log" || true; }

# a. baseline ------------------------------------------------------------------------
log "a. baseline: $CLIENTS clients through both gateways, sessions $(members_of 1 2)"
traffic_start a
sleep 3
traffic_stop a
for s in 1 2; do
  [[ $(accepted "$s") -gt 0 ]] || die "session $s received no traffic in the baseline"
done
log "a. messages accepted: session 1 $(accepted 1), session 2 $(accepted 2)"

[[ $(report_value a reconnects) == 0 ]] || die "baseline: clients reconnected"

# b. scale up 2 → 3 --------------------------------------------------------------------
log "b. scale sessions 2→3 during traffic"
traffic_start b
start_session 3
before3=$(accepted 3)
sleep 1
t0=$(now); apply_slice 1 2 3
ring_change scale-up "$t0" "$(members_of 1 2 3)" "${GW_LOGS[@]}" "$OUT/session-1.log" "$OUT/session-2.log" "$OUT/session-3.log"
sleep 3
traffic_stop b
[[ $(accepted 3) -gt $before3 ]] || die "session 3 joined the ring but received no traffic"
log "b. session 3 accepted $(accepted 3) messages after joining"

# c. scale down 3 → 2 ------------------------------------------------------------------
log "c. scale sessions 3→2 during traffic (endpoint removed, then the process stopped)"
traffic_start c
sleep 1
t0=$(now); apply_slice 1 2
ring_change scale-down "$t0" "$(members_of 1 2)" "${GW_LOGS[@]}" "$OUT/session-1.log" "$OUT/session-2.log"
sleep 1
stop_pid "${PID[session-3]}"; unset "PID[session-3]"
"$HERE/netns.sh" del 3
sleep 2
traffic_stop c

# d. kill -9 a session ------------------------------------------------------------------
log "d. kill -9 session 2 during traffic; the test (as kubelet) then removes its endpoint"
traffic_start d --resend-after 2
sleep 1
kill -KILL "${PID[session-2]}"; t_kill=$(now)
wait "${PID[session-2]}" 2>/dev/null || true; unset "PID[session-2]"
t0=$(now); apply_slice 1
ring_change kill "$t0" "$(members_of 1)" "${GW_LOGS[@]}" "$OUT/session-1.log"
log "d. endpoint removed $(awk -v a="$t_kill" -v b="$t0" 'BEGIN{printf "%.0f", (b-a)*1000}') ms after the kill"
sleep 3
traffic_stop d

# e. API-server restart ------------------------------------------------------------------
log "e. API-server restart during traffic"
start_session 2   # not on the ring yet: its endpoint comes after the restart
traffic_start e
ring_lines_before=$(cat "${GW_LOGS[@]}" | grep -c "session ring updated" || true)
sleep 1
e2e/k8s/controlplane.sh restart-apiserver 2>>"$OUT/restart-apiserver.log" || die "apiserver restart"
t_back=$(now)
sleep 2
ring_lines_after=$(cat "${GW_LOGS[@]}" | grep -c "session ring updated" || true)
[[ $ring_lines_before == "$ring_lines_after" ]] || die "the gateways' ring changed across the API-server restart"
ring_is "$ADM_A" 1 && ring_is "$ADM_B" 1 || die "ring size changed across the API-server restart"
# The watches resumed: a change after the restart reaches every ring. (Not bound to 1 s:
# a watcher that failed while the apiserver was down retries on its backoff schedule.)
t0=$(now); apply_slice 1 2
ring_change after-restart "$t0" "$(members_of 1 2)" --no-bound "${GW_LOGS[@]}" "$OUT/session-1.log" "$OUT/session-2.log"
log "e. first EndpointSlice write $(awk -v a="$t_back" -v b="$t0" 'BEGIN{printf "%.1f", b-a}') s after the apiserver was ready again"
sleep 2
traffic_stop e

# f + g. metrics, then SIGTERM a gateway ----------------------------------------------
log "g. SIGTERM gateway b during traffic (drain grace ${DRAIN_GRACE}s)"
traffic_start g
sleep 1
# f: /metrics of both gateways while traffic flows.
for adm in "$ADM_A" "$ADM_B"; do
  curl -sf "http://127.0.0.1:$adm/metrics" >"$OUT/metrics-$adm.txt" || die "/metrics on $adm"
done
check_metric() { # check_metric <name>: the sum of its series is > 0 on both gateways
  local adm v
  for adm in "$ADM_A" "$ADM_B"; do
    v=$(awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF; f = 1 } END { if (f) print s }' "$OUT/metrics-$adm.txt")
    [[ -n $v ]] || die "/metrics on $adm lacks $1"
    awk -v v="$v" 'BEGIN { exit !(v > 0) }' || die "/metrics on $adm: $1 = $v, want > 0"
  done
  log "f. $1 > 0 on both gateways"
}
for name in mtproto_connections_accepted_total mtproto_connections_open mtproto_handshakes_total \
  mtproto_auth_key_cache_hits_total mtproto_messages_forwarded_total mtproto_messages_sent_total \
  mtproto_session_rpc_duration_seconds_count mtproto_sessions mtproto_session_ring_members; do
  check_metric "$name"
done

t_term=$(now)
kill -TERM "${PID[gateway-b]}"
rc=0; timeout $((DRAIN_GRACE + 10)) tail --pid="${PID[gateway-b]}" -f /dev/null || die "gateway b still running $((DRAIN_GRACE + 10)) s after SIGTERM"
t_exit=$(now)
wait "${PID[gateway-b]}" || rc=$?
unset "PID[gateway-b]"
[[ $rc == 0 ]] || die "gateway b exited $rc after SIGTERM"
sleep 2
traffic_stop g
last_b=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["last_answer_by_server"].get(sys.argv[2], 0))' \
  "$OUT/traffic-g.json" "127.0.0.1:$GW_B")
awk -v l="$last_b" -v t="$t_term" 'BEGIN { exit !(l > t) }' || die "no pong through gateway b after its SIGTERM: the drain did not keep connections working"
first_close=$("$PY" -c 'import json,sys
ev=[e["t"] for e in json.load(open(sys.argv[1]))["events"] if e["kind"]=="closed" and e["server"]==sys.argv[2]]
print(min(ev) if ev else 0)' "$OUT/traffic-g.json" "127.0.0.1:$GW_B")
log "g. gateway b exited 0 $(awk -v a="$t_term" -v b="$t_exit" 'BEGIN{printf "%.1f", b-a}') s after SIGTERM; last pong through it $(awk -v a="$t_term" -v b="$last_b" 'BEGIN{printf "%.1f", b-a}') s after SIGTERM; clients closed from $(awk -v a="$t_term" -v b="$first_close" 'BEGIN{printf "%.1f", b-a}') s"

log "PASS in $((SECONDS - T_START)) s"
cat "$OUT/latencies.txt" >&2
