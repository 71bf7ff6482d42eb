#!/usr/bin/env bash
# Local Kubernetes control plane without Docker: etcd + kube-apiserver + kube-controller-manager
# + kube-scheduler + kwok (fake kubelet for fake nodes), all on 127.0.0.1.
#
#   controlplane.sh up       start everything (idempotent), wait for /readyz, nodes Ready and
#                            the default ServiceAccount
#   controlplane.sh down     stop everything this script started and remove the state dir
#   controlplane.sh status   show component pids/health; exit 0 only if healthy
#   controlplane.sh env      print `export KUBECONFIG=...` and `export PATH=<tools>:$PATH`
#                            (use: eval "$(e2e/k8s/controlplane.sh env)")
#   controlplane.sh restart-apiserver
#                            stop kube-apiserver (SIGTERM) and start it again with the same
#                            flags and state; returns once /readyz answers
#
# Env: MTPROTO_K8S_STATE (default /tmp/mtproto-k8s)   state: certs, kubeconfigs, logs, pids, etcd data
#      MTPROTO_K8S_PORT_BASE (default 26400)          ports = base + offset (see below)
#      MTPROTO_K8S_NODES (default 2)                  number of fake kwok nodes
#      MTPROTO_CACHE (default ~/.cache/mtproto-edge)  tool cache (see build-tools.sh)
#      MTPROTO_K8S_BIN                                 use binaries from this dir instead
#      MTPROTO_K8S_EXTRA_ADDRESSES (default none)      comma-separated IPs of this host (e.g. a
#                            bridge to network namespaces) where the apiserver must be reachable
#                            too: they join its certificate's SANs and it binds 0.0.0.0 (it has
#                            a single --bind-address). `up` on a running plane that lacks them
#                            re-signs the certificate and restarts only the apiserver.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${MTPROTO_K8S_STATE:-/tmp/mtproto-k8s}"
BASE="${MTPROTO_K8S_PORT_BASE:-26400}"
NODES="${MTPROTO_K8S_NODES:-2}"

# Ports (all on 127.0.0.1). Below the Linux ephemeral range (32768+), away from k8s defaults.
PORT_APISERVER=$((BASE + 43))   # 26443 https  kube-apiserver
PORT_ETCD=$((BASE + 79))        # 26479 http   etcd client
PORT_ETCD_PEER=$((BASE + 80))   # 26480 http   etcd peer
PORT_KCM=$((BASE + 57))         # 26457 https  kube-controller-manager /healthz
PORT_SCHED=$((BASE + 59))       # 26459 https  kube-scheduler /healthz
PORT_KWOK=$((BASE + 47))        # 26447 http   kwok /healthz, /metrics

SERVICE_CIDR=10.96.0.0/16       # ClusterIPs (not routable: there is no kube-proxy)
POD_CIDR=10.244.0.0/16          # kwok hands out pod IPs from here (fake, never dialled)
NODE_IP=10.243.0.1              # InternalIP of fake nodes (fake, never dialled)

PKI="$STATE/pki"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
KUBECONFIG_FILE="$STATE/kubeconfig"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
# extra apiserver addresses the running plane serves (its certificate's extra SANs)
EXTRA_FILE="$STATE/extra-addresses"

log() { printf '[controlplane] %s\n' "$*" >&2; }
die() { printf '[controlplane] ERROR: %s\n' "$*" >&2; exit 1; }

tools_bin() {
  if [[ -n "${MTPROTO_K8S_BIN:-}" ]]; then echo "$MTPROTO_K8S_BIN"; else "$HERE/build-tools.sh" --print-bin; fi
}
BIN="$(tools_bin)"
# the binaries a running plane was started from (so `down` finds it even if BIN changed)
RUN_BIN="$BIN"
[[ -f "$STATE/bin" ]] && RUN_BIN="$(cat "$STATE/bin")"

need_tools() {
  local b missing=0
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
    [[ -x "$BIN/$b" ]] || missing=1
  done
  if [[ $missing == 1 ]]; then
    [[ -z "${MTPROTO_K8S_BIN:-}" ]] || die "missing binaries in MTPROTO_K8S_BIN=$BIN"
    log "tools not built yet; running build-tools.sh"
    "$HERE/build-tools.sh" >/dev/null
  fi
}

need_host_tools() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v flock >/dev/null || missing+=(util-linux)
  if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them (apt-get install -y ${missing[*]})"
    log "installing ${missing[*]} with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  fi
}

kubectl() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# ------------------------------------------------------------------ pids ----
pid_of() { [[ -f "$PIDS/$1" ]] && cat "$PIDS/$1" || true; }

# alive <component>: the recorded pid runs our binary (guards against pid reuse)
alive() {
  local pid; pid=$(pid_of "$1")
  [[ -n "$pid" ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$RUN_BIN/$1 " || return 1
}

start() { # start <component> <args...>
  local name=$1; shift
  if alive "$name"; then log "$name already running (pid $(pid_of "$name"))"; return; fi
  # setsid: own session, so the caller's Ctrl-C/exit does not take the plane down.
  # HOME points into the state dir so e.g. ~/.kwok/kwok.yaml of the user is not picked up.
  # 8>&-: do not let the daemon inherit the lock fd (it would hold the lock forever).
  HOME="$STATE/home" setsid "$BIN/$name" "$@" </dev/null >>"$LOGS/$name.log" 2>&1 8>&- &
  echo $! >"$PIDS/$name"
  log "started $name (pid $!, log $LOGS/$name.log)"
}

# wait_for <seconds> <description> <command...>
wait_for() {
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

# wait_healthy <component> <seconds> <check...>: poll the check, fail fast if the process died
wait_healthy() {
  local name=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    check_alive_or_die "$name"
    ((SECONDS < deadline)) || die "$name not healthy after ${timeout}s (see $LOGS/$name.log)"
    sleep 0.2
  done
}

check_alive_or_die() {
  local name=$1 pid
  pid=$(pid_of "$name")
  # Right after start the pid may still be the forking shell, not yet exec'd into the
  # component (so `alive`'s command-line match fails under load): ask only whether it runs.
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
      && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then
    return 0
  fi
  log "$name exited; last log lines:"
  tail -n 30 "$LOGS/$name.log" >&2 || true
  die "$name failed to start"
}

https_ok() { curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$1"; }
http_ok() { curl -sf --max-time 2 "$1"; }
# components' own serving certs are self-signed: health endpoints only, so skip verification
selfsigned_ok() { curl -sfk --max-time 2 "$1"; }

# ------------------------------------------------------------------- pki ----
# sign <name> <subject> <extensions> (in $PKI, with the test bed's CA)
sign() {
  openssl req -newkey rsa:2048 -nodes -sha256 -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%b' "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

# The extra addresses asked for (sorted, comma-separated) and those the running plane has.
wanted_extra() { tr ', ' '\n\n' <<<"${MTPROTO_K8S_EXTRA_ADDRESSES:-}" | sed '/^$/d' | sort -u | paste -sd, -; }
served_extra() { [[ -f "$EXTRA_FILE" ]] && cat "$EXTRA_FILE" || true; }

# Signs the apiserver's serving certificate for loopback, the in-cluster names and the
# addresses in $EXTRA_FILE (run inside $PKI).
sign_apiserver() {
  local sans="IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" ip
  for ip in $(served_extra | tr ',' ' '); do sans="$sans,IP:$ip"; done
  sign apiserver "/CN=kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=$sans\n"
  chmod 600 apiserver.key
}

gen_pki() {
  [[ -f "$PKI/done" ]] && return
  mkdir -p "$PKI"
  log "generating certificates in $PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 -subj "/CN=mtproto-testbed-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -keyout ca.key -out ca.crt 2>/dev/null
    sign_apiserver
    # One admin identity (system:masters) for the user and all components of the test bed.
    sign admin "/O=system:masters/CN=admin" \
      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    # Front-proxy (requestheader) CA + client: lets aggregated API servers work and keeps
    # KCM/scheduler from complaining about a missing requestheader CA.
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 -subj "/CN=mtproto-testbed-front-proxy-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -keyout front-proxy-ca.key -out front-proxy-ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=front-proxy-client" \
      -keyout front-proxy-client.key -out front-proxy-client.csr 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >fp.ext
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key -CAcreateserial \
      -days 3650 -sha256 -extfile fp.ext -out front-proxy-client.crt 2>/dev/null
    rm -f front-proxy-client.csr fp.ext
    # ServiceAccount token signing key pair
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    # Static bearer token as an alternative to the client certificate (kubeconfig-token).
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >admin.token
    printf '%s,admin,admin-uid,system:masters\n' "$(cat admin.token)" >tokens.csv
    chmod 600 ./*.key admin.token tokens.csv
    touch ./done
  )
}

write_kubeconfigs() {
  local ca crt key token
  ca=$(base64 -w0 <"$PKI/ca.crt"); crt=$(base64 -w0 <"$PKI/admin.crt"); key=$(base64 -w0 <"$PKI/admin.key")
  token=$(cat "$PKI/admin.token")
  cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mtproto-testbed
  cluster:
    server: https://127.0.0.1:$PORT_APISERVER
    certificate-authority-data: $ca
users:
- name: admin
  user:
    client-certificate-data: $crt
    client-key-data: $key
contexts:
- name: mtproto-testbed
  context:
    cluster: mtproto-testbed
    user: admin
    namespace: default
current-context: mtproto-testbed
EOF
  sed -e "s|client-certificate-data: .*|token: $token|" -e '/client-key-data:/d' \
    "$KUBECONFIG_FILE" >"$STATE/kubeconfig-token"
  chmod 600 "$KUBECONFIG_FILE" "$STATE/kubeconfig-token"
}

# ------------------------------------------------------------ components ----
start_etcd() {
  start etcd --name=testbed --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$PORT_ETCD" --advertise-client-urls="http://127.0.0.1:$PORT_ETCD" \
    --listen-peer-urls="http://127.0.0.1:$PORT_ETCD_PEER" --initial-advertise-peer-urls="http://127.0.0.1:$PORT_ETCD_PEER" \
    --initial-cluster="testbed=http://127.0.0.1:$PORT_ETCD_PEER" \
    --unsafe-no-fsync=true --log-level=warn --quota-backend-bytes=$((2 * 1024 * 1024 * 1024))
  wait_healthy etcd 30 http_ok "http://127.0.0.1:$PORT_ETCD/health"
}

start_apiserver() {
  # --advertise-address=127.0.0.1 needs --endpoint-reconciler-type=none: the `kubernetes`
  # Endpoints object may not hold a loopback address.
  local bind=127.0.0.1
  [[ -z "$(served_extra)" ]] || bind=0.0.0.0
  start kube-apiserver \
    --etcd-servers="http://127.0.0.1:$PORT_ETCD" --etcd-prefix=/registry \
    --bind-address="$bind" --advertise-address=127.0.0.1 --secure-port="$PORT_APISERVER" \
    --endpoint-reconciler-type=none \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" --token-auth-file="$PKI/tokens.csv" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --enable-priority-and-fairness=false --profiling=false \
    --cert-dir="$STATE/apiserver-certs"
  wait_healthy kube-apiserver 90 https_ok "https://127.0.0.1:$PORT_APISERVER/readyz"
}

start_kcm() {
  start kube-controller-manager \
    --kubeconfig="$KUBECONFIG_FILE" --authentication-kubeconfig="$KUBECONFIG_FILE" \
    --authorization-kubeconfig="$KUBECONFIG_FILE" \
    --bind-address=127.0.0.1 --secure-port="$PORT_KCM" --cert-dir="$STATE/kcm-certs" \
    --leader-elect=false \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --profiling=false
}

start_scheduler() {
  start kube-scheduler \
    --kubeconfig="$KUBECONFIG_FILE" --authentication-kubeconfig="$KUBECONFIG_FILE" \
    --authorization-kubeconfig="$KUBECONFIG_FILE" \
    --bind-address=127.0.0.1 --secure-port="$PORT_SCHED" --cert-dir="$STATE/scheduler-certs" \
    --leader-elect=false --profiling=false
}

start_kwok() {
  cp "$HERE/kwok-stages.yaml" "$STATE/kwok-stages.yaml"
  start kwok --kubeconfig="$KUBECONFIG_FILE" --config="$STATE/kwok-stages.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --manage-nodes-with-label-selector= --manage-single-node= \
    --cidr="$POD_CIDR" --node-ip="$NODE_IP" \
    --node-lease-duration-seconds=40 \
    --server-address="127.0.0.1:$PORT_KWOK"
}

create_nodes() {
  local i
  for ((i = 0; i < NODES; i++)); do
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  addresses:
  - {type: InternalIP, address: 10.243.0.$((i + 1))}
  - {type: Hostname, address: kwok-node-$i}
  allocatable: {cpu: "32", memory: 64Gi, pods: "110"}
  capacity: {cpu: "32", memory: 64Gi, pods: "110"}
EOF
  done
}

healthy() {
  local c
  for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
  https_ok "https://127.0.0.1:$PORT_APISERVER/readyz" >/dev/null 2>&1 || return 1
  selfsigned_ok "https://127.0.0.1:$PORT_KCM/healthz" >/dev/null 2>&1 || return 1
  selfsigned_ok "https://127.0.0.1:$PORT_SCHED/healthz" >/dev/null 2>&1 || return 1
  http_ok "http://127.0.0.1:$PORT_KWOK/healthz" >/dev/null 2>&1 || return 1
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cmd_up() {
  need_host_tools
  need_tools
  mkdir -p "$STATE"
  exec 8>"$STATE.lock"
  flock -w 300 8 || die "could not get lock $STATE.lock"
  if [[ -f "$STATE/up" ]] && healthy; then
    local all; all=$(printf '%s,%s' "$(wanted_extra)" "$(served_extra)" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)
    if [[ "$all" != "$(served_extra)" ]]; then
      log "apiserver must also serve on $(wanted_extra): re-signing its certificate and restarting it"
      printf '%s\n' "$all" >"$EXTRA_FILE"
      (cd "$PKI" && sign_apiserver)
      stop_group kube-apiserver
      start_apiserver
    else
      log "already up and healthy (state $STATE)"
    fi
    return 0
  fi
  if [[ -d "$PIDS" ]]; then
    log "stale or unhealthy control plane in $STATE; restarting from scratch"
    stop_all
    rm -rf "${STATE:?}"/*
  fi
  local p
  for p in "$PORT_ETCD" "$PORT_ETCD_PEER" "$PORT_APISERVER" "$PORT_KCM" "$PORT_SCHED" "$PORT_KWOK"; do
    port_free "$p" || die "port 127.0.0.1:$p is in use (another test bed? set MTPROTO_K8S_PORT_BASE)"
  done
  local t0=$SECONDS t_ready
  mkdir -p "$LOGS" "$PIDS" "$STATE/home"
  echo "$BIN" >"$STATE/bin"
  RUN_BIN="$BIN"
  wanted_extra >"$EXTRA_FILE"
  gen_pki
  write_kubeconfigs
  start_etcd
  start_apiserver
  t_ready=$((SECONDS - t0))
  log "kube-apiserver ready after ${t_ready}s"
  start_kcm
  start_scheduler
  start_kwok
  wait_healthy kube-controller-manager 60 selfsigned_ok "https://127.0.0.1:$PORT_KCM/healthz"
  wait_healthy kube-scheduler 60 selfsigned_ok "https://127.0.0.1:$PORT_SCHED/healthz"
  wait_healthy kwok 60 http_ok "http://127.0.0.1:$PORT_KWOK/healthz"
  create_nodes
  wait_for 60 "default ServiceAccount" kubectl -n default get serviceaccount default || die "default ServiceAccount never appeared (kube-controller-manager log: $LOGS/kube-controller-manager.log)"
  wait_for 60 "fake nodes Ready" kubectl wait --for=condition=Ready node -l type=kwok --timeout=5s || die "kwok nodes not Ready (log: $LOGS/kwok.log)"
  date -u +%FT%TZ >"$STATE/up"
  log "up in $((SECONDS - t0))s (apiserver ready after ${t_ready}s): https://127.0.0.1:$PORT_APISERVER, KUBECONFIG=$KUBECONFIG_FILE"
}

# stop_group <component...>: SIGTERM them together, wait up to $STOP_WAIT s (15), then SIGKILL
stop_group() {
  local c pid pids=() names=()
  for c in "$@"; do
    if alive "$c"; then
      pid=$(pid_of "$c"); pids+=("$pid"); names+=("$c")
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  local i deadline=$((SECONDS + ${STOP_WAIT:-15}))
  for i in "${!pids[@]}"; do
    while kill -0 "${pids[$i]}" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      log "${names[$i]} (pid ${pids[$i]}) ignored SIGTERM; sending SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    log "stopped ${names[$i]} (pid ${pids[$i]})"
  done
  for c in "$@"; do rm -f "$PIDS/$c"; done
}

stop_all() {
  [[ -d "$PIDS" ]] || return 0
  # clients first (together), then the apiserver, etcd last (the apiserver hangs on
  # shutdown when etcd is gone first)
  stop_group kwok kube-scheduler kube-controller-manager
  stop_group kube-apiserver
  stop_group etcd
}

cmd_down() {
  mkdir -p "$(dirname "$STATE")"
  exec 8>"$STATE.lock"
  # Daemons started by an early version of this script inherited the lock fd; don't let that
  # block `down` for long.
  flock -w 20 8 || log "warning: $STATE.lock still held after 20s; stopping anyway"
  stop_all
  if [[ -d "$STATE" ]]; then
    rm -rf "${STATE:?}"
    rm -f "$STATE.lock"
    log "removed $STATE"
  else
    log "nothing to do (no state in $STATE)"
  fi
}

cmd_status() {
  local c rc=0
  if [[ ! -d "$PIDS" ]]; then echo "down (no state in $STATE)"; return 1; fi
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then printf '%-24s running  pid %s\n' "$c" "$(pid_of "$c")"; else printf '%-24s NOT RUNNING\n' "$c"; rc=1; fi
  done
  if https_ok "https://127.0.0.1:$PORT_APISERVER/readyz" >/dev/null 2>&1; then
    echo "apiserver                https://127.0.0.1:$PORT_APISERVER readyz ok"
    kubectl get nodes -o wide 2>/dev/null || true
  else
    echo "apiserver                https://127.0.0.1:$PORT_APISERVER NOT READY"; rc=1
  fi
  healthy || rc=1
  [[ $rc == 0 ]] && echo "status: up" || echo "status: unhealthy"
  return $rc
}

cmd_restart_apiserver() {
  exec 8>"$STATE.lock"
  flock -w 300 8 || die "could not get lock $STATE.lock"
  [[ -f "$STATE/up" ]] || die "the control plane is not up (state $STATE)"
  local t0; t0=$(date +%s.%N)
  # It stops listening at once on SIGTERM but may then linger for long on open watches.
  STOP_WAIT=5 stop_group kube-apiserver
  start_apiserver
  log "kube-apiserver restarted in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
}

cmd_env() {
  printf 'export KUBECONFIG=%q\n' "$KUBECONFIG_FILE"
  printf 'export PATH=%q:$PATH\n' "$BIN"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  restart-apiserver) cmd_restart_apiserver ;;
  *) echo "usage: $0 up|down|status|env|restart-apiserver" >&2; exit 2 ;;
esac
