#!/usr/bin/env bash
# Forwarded request/response pairs per second, latency and CPU per pair, with
# N pings in flight per connection, for two gateways in one run on this
# machine: the current tree ("after") and another revision ("before").
#
#   scripts/pipeline-bench.sh --against REV [--before-bin PATH]
#       [--mode embedded|stream|unary] [--connections 8] [--duration-secs 10]
#       [--in-flight "1 8"] [--warmup-secs 2] [--rounds 1]
#       [--after-env "NAME=VALUE ..."]
#
# Builds release binaries of the current tree, and of REV in a temporary git
# worktree with its own target directory ($MTPROTO_CACHE/target-<rev12>, kept
# and reused); --before-bin uses an existing gateway binary of REV instead
# (with --mode stream or unary, REV's mtproto-session beside it too). It warns
# when both sides' binaries are the same files' contents.
# Each gateway runs on a loopback port below 30000, with the per-address
# handshake limit lifted: in its embedded default (built-in session, SQLite
# keys in a temporary data dir), or with --mode stream or unary in front of
# its own revision's mtproto-session (in-memory keys). The current tree's
# mtproto-loadgen drives both (the protocol is the same) and reads the
# gateway's (and the session's) CPU time (/proc/PID/stat) and context
# switches (/proc/PID/task/*/status) over its measured window, which opens
# once every connection has its key.
# --after-env gives the "after" gateway settings in its environment
# (MTPROTO_GATEWAY_RUNTIME__WORKER_THREADS=1, say); with --before-bin set to
# the current tree's own build it compares a setting on one build.
# With --rounds R, each gateway is measured R times (fresh process each round,
# the order alternating) and the table shows the median of each figure. The
# last rows say how busy the rest of the machine was meanwhile (other
# processes' CPU in % of all cores): figures taken beside other work are worse.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pipeline-bench.XXXXXX")"
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
trap bench_cleanup EXIT

AGAINST=""
BEFORE_BIN=""
MODE=embedded
CONNECTIONS=8
DURATION=10
IN_FLIGHT="1 8"
WARMUP=2
ROUNDS=1
AFTER_ENV=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while (($#)); do
    case "$1" in
        --against) AGAINST="${2:?--against needs a revision}"; shift 2 ;;
        --before-bin) BEFORE_BIN="${2:?--before-bin needs a path}"; shift 2 ;;
        --mode) MODE="${2:?--mode needs embedded, stream or unary}"; shift 2 ;;
        --connections) CONNECTIONS="${2:?}"; shift 2 ;;
        --duration-secs) DURATION="${2:?}"; shift 2 ;;
        --in-flight) IN_FLIGHT="${2:?}"; shift 2 ;;
        --warmup-secs) WARMUP="${2:?}"; shift 2 ;;
        --rounds) ROUNDS="${2:?}"; shift 2 ;;
        --after-env) read -r -a AFTER_ENV <<<"${2:?--after-env needs NAME=VALUE settings}"; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "pipeline-bench: unknown argument $1" >&2; usage 2 ;;
    esac
done
[[ -n "$AGAINST" ]] || die "--against REV is required (the 'before' revision)"
[[ "$MODE" =~ ^(embedded|stream|unary)$ ]] || die "--mode: $MODE is not embedded, stream or unary"
read -r -a NS <<<"$IN_FLIGHT"
((${#NS[@]} > 0)) || die "--in-flight needs at least one N"
for n in "$CONNECTIONS" "$DURATION" "$WARMUP" "$ROUNDS" "${NS[@]}"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "not a number: $n"
done
for setting in "${AFTER_ENV[@]}"; do
    [[ "$setting" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--after-env: $setting is not NAME=VALUE"
done

# --- binaries -----------------------------------------------------------------

PACKAGES=(mtproto-gateway)
[[ "$MODE" == embedded ]] || PACKAGES+=(mtproto-session)
build_current "${PACKAGES[@]}" mtproto-testclient
AFTER_BIN="$WORK/bin/current/mtproto-gateway"
LOADGEN="$WORK/bin/current/mtproto-loadgen"
AFTER_LABEL="$CURRENT_LABEL"
if [[ -n "$BEFORE_BIN" ]]; then
    [[ -x "$BEFORE_BIN" ]] || die "--before-bin: $BEFORE_BIN is not an executable"
    BEFORE_LABEL="$(git rev-parse --short=7 "$AGAINST^{commit}")" || die "unknown revision $AGAINST"
    echo "== before: $BEFORE_BIN (given as revision $BEFORE_LABEL)" >&2
else
    build_revision "$AGAINST" "${PACKAGES[@]}"
    BEFORE_BIN="$REV_BIN/mtproto-gateway"
    BEFORE_LABEL="$REV_LABEL"
fi
# Each side's session is the mtproto-session beside its gateway.
session_of() { echo "$(dirname "$1")/mtproto-session"; }
if [[ "$MODE" != embedded ]]; then
    [[ -x "$(session_of "$BEFORE_BIN")" ]] || die "--mode $MODE: no mtproto-session beside $BEFORE_BIN"
fi
# An A/B of one build with itself measures only noise: say so when the two
# sides' binaries are the same bytes (a revision that changed only docs, or
# a mistake).
same=1
cmp -s "$BEFORE_BIN" "$AFTER_BIN" || same=0
if [[ "$MODE" != embedded ]]; then
    cmp -s "$(session_of "$BEFORE_BIN")" "$(session_of "$AFTER_BIN")" || same=0
fi
if ((same == 1)) && ((${#AFTER_ENV[@]} == 0)); then
    echo "warning: before and after are the same binaries; the two columns measure one build" >&2
fi
((${#AFTER_ENV[@]} == 0)) || AFTER_LABEL+=" ${AFTER_ENV[*]}"

# --- measuring ----------------------------------------------------------------

loadgen() {
    "$LOADGEN" --target "127.0.0.1:$PORT" --public-key "$DATA/server-rsa-public.pem" \
        --connections "$CONNECTIONS" --pings 1000000000 "$@"
}

declare -A RESULT
SESSION_PID=""
# Runs one measurement; appends to RESULT[side,n,metric] (one value per round).
measure() {
    local side="$1" n="$2" out pairs errors secs gw lg re sess pids=(--measure-pid "$GATEWAY_PID")
    [[ -z "$SESSION_PID" ]] || pids+=(--measure-pid "$SESSION_PID")
    out="$(loadgen --duration-secs "$DURATION" --in-flight "$n" "${pids[@]}")"
    echo "   $side N=$n: ${out//$'\n'/ | }" >&2
    re='([0-9]+) ping round trips.* ([0-9]+) errors, [0-9]+ connections, ([0-9.]+) s'
    [[ "$out" =~ $re ]] || die "unexpected loadgen output: $out"
    pairs="${BASH_REMATCH[1]}" errors="${BASH_REMATCH[2]}" secs="${BASH_REMATCH[3]}"
    ((errors == 0)) || echo "   warning: $errors errors ($side, N=$n)" >&2
    ((pairs > 0)) || die "no pairs ($side, N=$n)"
    re='([0-9.]+) pairs/s, latency p50 ([0-9]+) us, p99 ([0-9]+) us, p999 ([0-9]+) us'
    [[ "$out" =~ $re ]] || die "unexpected loadgen output: $out"
    RESULT[$side,$n,rate]+=" ${BASH_REMATCH[1]}"
    RESULT[$side,$n,p50]+=" ${BASH_REMATCH[2]}"
    RESULT[$side,$n,p99]+=" ${BASH_REMATCH[3]}"
    RESULT[$side,$n,p999]+=" ${BASH_REMATCH[4]}"
    lg="$(loadgen_cpu "$out" loadgen pair)" gw="$(loadgen_cpu "$out" "pid $GATEWAY_PID" pair)"
    RESULT[$side,$n,lgcpu]+=" $lg"
    RESULT[$side,$n,gwcpu]+=" $gw"
    RESULT[$side,$n,lgsw]+=" $(loadgen_switches "$out" loadgen pair)"
    RESULT[$side,$n,gwsw]+=" $(loadgen_switches "$out" "pid $GATEWAY_PID" pair)"
    RESULT[$side,$n,ratio]+=" $(ratio "$gw" "$lg")"
    sess=0
    if [[ -n "$SESSION_PID" ]]; then
        sess="$(loadgen_cpu "$out" "pid $SESSION_PID" pair)"
        RESULT[$side,$n,sesscpu]+=" $sess"
    fi
    # CPU used by everything else on the machine meanwhile, in % of all cores:
    # interference from other work makes the figures of this round worse.
    RESULT[$side,$n,other]+=" $(other_load "$out" "$pairs" "$secs" "$gw" "$lg" "$sess")"
    echo "   $side N=$n: gateway CPU $gw us/pair, other processes ${RESULT[$side,$n,other]##* }% of the machine" >&2
}

measure_side() {
    local side="$1" bin
    if [[ "$side" == before ]]; then bin="$BEFORE_BIN"; else bin="$AFTER_BIN"; fi
    echo "== $side: $bin" >&2
    GATEWAY_ENV=()
    [[ "$side" == before ]] || GATEWAY_ENV=("${AFTER_ENV[@]}")
    if [[ "$MODE" == embedded ]]; then
        start_gateway "$bin" "gateway-$side"
    else
        start_session "$(session_of "$bin")" "session-$side"
        start_gateway "$bin" "gateway-$side" --session "grpc://127.0.0.1:$SESSION_PORT" \
            --session-mode "$MODE" --grpc-listen "127.0.0.1:$(free_port)"
    fi
    if ((WARMUP > 0)); then
        loadgen --duration-secs "$WARMUP" >/dev/null
    fi
    for n in "${NS[@]}"; do
        measure "$side" "$n"
    done
    stop_pid "$GATEWAY_PID"
    if [[ -n "$SESSION_PID" ]]; then
        stop_pid "$SESSION_PID"
        SESSION_PID=""
    fi
}

for ((round = 1; round <= ROUNDS; round++)); do
    echo "== round $round of $ROUNDS" >&2
    if ((round % 2)); then
        measure_side before
        measure_side after
    else
        measure_side after
        measure_side before
    fi
done

# --- the table ----------------------------------------------------------------

echo
echo "$MODE mode, $CONNECTIONS connections, ${DURATION} s per measurement, median of $ROUNDS round(s), loopback, $(nproc) cores shared by all the processes"
printf '%-26s %20s %20s %12s\n' "" "before $BEFORE_LABEL" "after $AFTER_LABEL" "after/before"
row() {
    local label="$1" n="$2" metric="$3" b a
    b="$(median "${RESULT[before,$n,$metric]}")" a="$(median "${RESULT[after,$n,$metric]}")"
    printf '%-26s %20s %20s %12s\n' "N=$n $label" "$b" "$a" \
        "$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
}
for n in "${NS[@]}"; do
    row "pairs/s" "$n" rate
    row "p50 latency (us)" "$n" p50
    row "p99 latency (us)" "$n" p99
    row "p999 latency (us)" "$n" p999
    row "gateway CPU (us/pair)" "$n" gwcpu
    row "loadgen CPU (us/pair)" "$n" lgcpu
    row "gateway/loadgen CPU" "$n" ratio
    row "gateway switches/pair" "$n" gwsw
    row "loadgen switches/pair" "$n" lgsw
    [[ "$MODE" == embedded ]] || row "session CPU (us/pair)" "$n" sesscpu
    row "other load (% of cores)" "$n" other
done
