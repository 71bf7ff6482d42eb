# shellcheck shell=bash
# Shared by scripts/perf.sh and scripts/pipeline-bench.sh (sourced, not run):
# release binaries of the current tree and of another revision, processes on
# loopback ports, and the CPU figures mtproto-loadgen reports.
#
# The caller sets ROOT (the repository) and WORK (a temporary directory that
# bench_cleanup removes) before calling anything here.

export MTPROTO_CACHE="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MTPROTO_CACHE/cargo-target}"

BENCH_PIDS=()
BENCH_WORKTREE=""
# NAME=VALUE settings start_gateway gives the gateway, besides the environment.
GATEWAY_ENV=()

die() { echo "${0##*/}: $*" >&2; exit 1; }

# Stops what this script started and removes its temporary files.
bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$BENCH_WORKTREE" ]]; then
        git -C "$ROOT" worktree remove --force "$BENCH_WORKTREE" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}

# build_current PACKAGE...: release binaries of the current tree, copied to
# $WORK/bin/current (so another build in the same target directory cannot
# swap them mid-run). Sets CURRENT_LABEL (short commit, +dirty).
build_current() {
    local args=() p
    for p in "$@"; do args+=(-p "$p"); done
    echo "== building the current tree (release)" >&2
    (cd "$ROOT" && nice -n 5 cargo build --release "${args[@]}" >&2)
    mkdir -p "$WORK/bin/current"
    for p in mtproto-gateway mtproto-loadgen mtproto-session; do
        if [[ -x "$CARGO_TARGET_DIR/release/$p" ]]; then
            cp "$CARGO_TARGET_DIR/release/$p" "$WORK/bin/current/"
        fi
    done
    CURRENT_LABEL="$(git -C "$ROOT" rev-parse --short=7 HEAD)"
    if [[ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]]; then
        CURRENT_LABEL="$CURRENT_LABEL+dirty"
    fi
}

# build_revision REV PACKAGE...: release binaries of REV, built in a temporary
# git worktree with its own target directory ($MTPROTO_CACHE/target-<rev12>,
# kept and reused). Sets REV_BIN (that release directory) and REV_LABEL.
build_revision() {
    local rev target args=() p
    rev="$(git -C "$ROOT" rev-parse --verify "$1^{commit}")" || die "unknown revision $1"
    shift
    REV_LABEL="${rev:0:7}"
    target="$MTPROTO_CACHE/target-${rev:0:12}"
    REV_BIN="$target/release"
    local missing=0
    for p in "$@"; do
        [[ -x "$REV_BIN/$p" || "$p" == mtproto-testclient ]] || missing=1
    done
    if ((missing == 0)); then
        echo "== $REV_LABEL: reusing $REV_BIN" >&2
        return
    fi
    for p in "$@"; do args+=(-p "$p"); done
    echo "== building $REV_LABEL (release) into $target" >&2
    BENCH_WORKTREE="$WORK/src"
    git -C "$ROOT" worktree add --detach "$BENCH_WORKTREE" "$rev" >&2
    (cd "$BENCH_WORKTREE" && CARGO_TARGET_DIR="$target" nice -n 5 cargo build --release "${args[@]}" >&2)
    git -C "$ROOT" worktree remove --force "$BENCH_WORKTREE"
    BENCH_WORKTREE=""
}

# loadgen_cpu OUT WHO UNIT: microseconds of CPU per UNIT (pair, handshake)
# that mtproto-loadgen reported for WHO ("loadgen", "pid N") in OUT.
loadgen_cpu() {
    local re="$2 CPU ([0-9.]+) us/$3"
    [[ "$1" =~ $re ]] || die "no CPU figure for $2 in: $1"
    echo "${BASH_REMATCH[1]}"
}

# loadgen_switches OUT WHO UNIT: context switches per UNIT that mtproto-loadgen
# reported for WHO in OUT ("-" from a load generator too old to count them).
loadgen_switches() {
    local re="$2 CPU [0-9.]+ us/$3, ([0-9.]+) switches/$3"
    if [[ "$1" =~ $re ]]; then echo "${BASH_REMATCH[1]}"; else echo -; fi
}

# other_load OUT COUNT SECS US_PER_UNIT...: other processes' CPU in % of all
# cores over the loadgen's window: the machine's busy time it reported in OUT
# less the measured processes' (COUNT units at US_PER_UNIT each).
other_load() {
    local out="$1" count="$2" secs="$3" re='machine busy ([0-9.]+) CPU s'
    shift 3
    [[ "$out" =~ $re ]] || die "no machine busy figure in: $out"
    awk -v busy="${BASH_REMATCH[1]}" -v n="$count" -v secs="$secs" -v cores="$(nproc)" -v ours="$*" \
        'BEGIN { k = split(ours, u, " "); o = busy; for (i = 1; i <= k; i++) o -= u[i] * n / 1e6
                 if (o < 0) o = 0; printf "%.0f", o / (secs * cores) * 100 }'
}

free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 10000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free port"
}

# wait_listening PID PORT NAME [FILE]: until PORT accepts (and FILE exists, if given).
wait_listening() {
    local pid="$1" port="$2" name="$3" file="${4:-}"
    for _ in $(seq 300); do
        if [[ -z "$file" || -s "$file" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "$name exited"; }
        sleep 0.1
    done
    die "$name did not listen on 127.0.0.1:$port within 30 s"
}

# start_gateway BIN NAME [FLAG...]: a gateway on a free loopback port with a
# fresh data directory and the per-address handshake limit lifted; sets
# GATEWAY_PID, PORT and DATA. Environment settings pass through, and so do
# those in GATEWAY_ENV.
start_gateway() {
    local bin="$1" name="$2"
    shift 2
    PORT="$(free_port)"
    DATA="$WORK/data-$name"
    mkdir -p "$DATA"
    env "${GATEWAY_ENV[@]}" MTPROTO_GATEWAY_LIMITS__HANDSHAKES_PER_IP_PER_MINUTE=10000000 \
        "$bin" --listen "127.0.0.1:$PORT" --data-dir "$DATA" --log-level warn "$@" \
        >"$WORK/$name.log" 2>&1 &
    GATEWAY_PID=$!
    BENCH_PIDS+=("$GATEWAY_PID")
    wait_listening "$GATEWAY_PID" "$PORT" "$name" "$DATA/server-rsa-public.pem"
}

# start_session BIN NAME [FLAG...]: a reference session (in-memory keys); sets SESSION_PID, SESSION_PORT.
start_session() {
    local bin="$1" name="$2"
    shift 2
    SESSION_PORT="$(free_port)"
    "$bin" --listen "127.0.0.1:$SESSION_PORT" --log-level warn "$@" >"$WORK/$name.log" 2>&1 &
    SESSION_PID=$!
    BENCH_PIDS+=("$SESSION_PID")
    wait_listening "$SESSION_PID" "$SESSION_PORT" "$name"
}

# make_mtls_certs DIR: a CA and the two roles' certificates (ECDSA P-256, as the
# operator issues them) under DIR: ca.crt, gateway.{crt,key}, session.{crt,key}.
make_mtls_certs() {
    local dir="$1" role
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    for role in gateway session; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=mtproto-$role" \
            -keyout "$dir/$role.key" -out "$dir/$role.csr" 2>/dev/null
        openssl x509 -req -in "$dir/$role.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 1 \
            -extfile <(printf 'subjectAltName=DNS:mtproto-%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$role") \
            -out "$dir/$role.crt" 2>/dev/null
    done
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# The median of space-separated numbers (the mean of the middle two for an even count).
median() {
    tr ' ' '\n' <<<"$1" | grep . | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit } m = int((NR + 1) / 2); print (NR % 2) ? v[m] : (v[m] + v[m + 1]) / 2 }'
}

# ratio A B: A / B with two decimals, "-" when either is missing.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-" && b + 0 > 0) printf "%.2f", a / b; else print "-" }'
}
