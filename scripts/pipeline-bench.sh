#!/usr/bin/env bash
# Forwarded request/response pairs per second, latency and CPU per pair, with
# N pings in flight per connection, for two gateways in one run on this
# machine: the current tree ("after") and another revision ("before").
#
#   scripts/pipeline-bench.sh --against REV [--before-bin PATH]
#       [--connections 8] [--duration-secs 10] [--in-flight "1 8"] [--warmup-secs 2]
#       [--rounds 1]
#
# Builds release binaries of the current tree, and of REV in a temporary git
# worktree with its own target directory ($MTPROTO_CACHE/target-<rev12>, kept
# and reused); --before-bin uses an existing gateway binary of REV instead.
# Each gateway runs in its embedded default (built-in session, SQLite keys in a
# temporary data dir) on a loopback port below 30000, with the per-address
# handshake limit lifted. The current tree's mtproto-loadgen drives both (the
# protocol is the same); the gateway's CPU time is read from /proc/PID/stat.
# With --rounds R, each gateway is measured R times (fresh process each round,
# the order alternating) and the table shows the median of each figure. The
# last rows say how busy the rest of the machine was meanwhile (other
# processes' CPU in % of all cores): figures taken beside other work are worse.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MTPROTO_CACHE="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MTPROTO_CACHE/cargo-target}"

AGAINST=""
BEFORE_BIN=""
CONNECTIONS=8
DURATION=10
IN_FLIGHT="1 8"
WARMUP=2
ROUNDS=1

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "pipeline-bench: $*" >&2; exit 1; }

while (($#)); do
    case "$1" in
        --against) AGAINST="${2:?--against needs a revision}"; shift 2 ;;
        --before-bin) BEFORE_BIN="${2:?--before-bin needs a path}"; shift 2 ;;
        --connections) CONNECTIONS="${2:?}"; shift 2 ;;
        --duration-secs) DURATION="${2:?}"; shift 2 ;;
        --in-flight) IN_FLIGHT="${2:?}"; shift 2 ;;
        --warmup-secs) WARMUP="${2:?}"; shift 2 ;;
        --rounds) ROUNDS="${2:?}"; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "pipeline-bench: unknown argument $1" >&2; usage 2 ;;
    esac
done
[[ -n "$AGAINST" ]] || die "--against REV is required (the 'before' revision)"
read -r -a NS <<<"$IN_FLIGHT"
((${#NS[@]} > 0)) || die "--in-flight needs at least one N"
for n in "$CONNECTIONS" "$DURATION" "$WARMUP" "$ROUNDS" "${NS[@]}"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "not a number: $n"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pipeline-bench.XXXXXX")"
GATEWAY_PID=""
WORKTREE=""
cleanup() {
    if [[ -n "$GATEWAY_PID" ]]; then
        kill "$GATEWAY_PID" 2>/dev/null || true
        wait "$GATEWAY_PID" 2>/dev/null || true
    fi
    if [[ -n "$WORKTREE" ]]; then
        git -C "$ROOT" worktree remove --force "$WORKTREE" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- binaries -----------------------------------------------------------------

echo "== building the current tree (release)" >&2
nice -n 5 cargo build --release -p mtproto-gateway -p mtproto-testclient >&2
# Copies, so another build in the shared target directory cannot swap them mid-run.
mkdir -p "$WORK/bin"
cp "$CARGO_TARGET_DIR/release/mtproto-gateway" "$CARGO_TARGET_DIR/release/mtproto-loadgen" "$WORK/bin/"
AFTER_BIN="$WORK/bin/mtproto-gateway"
LOADGEN="$WORK/bin/mtproto-loadgen"
AFTER_LABEL="$(git rev-parse --short=7 HEAD)"
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    AFTER_LABEL="$AFTER_LABEL+dirty"
fi

REV="$(git rev-parse --verify "$AGAINST^{commit}")" || die "unknown revision $AGAINST"
BEFORE_LABEL="${REV:0:7}"
if [[ -n "$BEFORE_BIN" ]]; then
    [[ -x "$BEFORE_BIN" ]] || die "--before-bin: $BEFORE_BIN is not an executable"
    echo "== before: $BEFORE_BIN (given as revision $BEFORE_LABEL)" >&2
else
    REV_TARGET="$MTPROTO_CACHE/target-${REV:0:12}"
    BEFORE_BIN="$REV_TARGET/release/mtproto-gateway"
    if [[ -x "$BEFORE_BIN" ]]; then
        echo "== before: reusing $BEFORE_BIN" >&2
    else
        echo "== building $BEFORE_LABEL (release) into $REV_TARGET" >&2
        WORKTREE="$WORK/src"
        git -C "$ROOT" worktree add --detach "$WORKTREE" "$REV" >&2
        (cd "$WORKTREE" && CARGO_TARGET_DIR="$REV_TARGET" nice -n 5 cargo build --release -p mtproto-gateway >&2)
        git -C "$ROOT" worktree remove --force "$WORKTREE"
        WORKTREE=""
    fi
fi

# --- measuring ----------------------------------------------------------------

CLK_TCK="$(getconf CLK_TCK)"

# CPU ticks (user + system) of a process so far.
cpu_ticks() {
    local stat rest
    local -a f
    stat="$(<"/proc/$1/stat")"
    rest="${stat##*) }" # fields from 3 (state) on; utime and stime are 14 and 15
    read -r -a f <<<"$rest"
    echo $((f[11] + f[12]))
}

# CPU ticks that processes of the whole machine used so far (user, nice,
# system; not idle, iowait, or interrupts, which include loopback traffic's).
machine_busy_ticks() {
    local -a f
    read -r -a f </proc/stat # cpu user nice system idle iowait irq softirq steal ...
    echo $((f[1] + f[2] + f[3]))
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

# Starts a gateway binary in its embedded default; sets GATEWAY_PID, PORT, DATA.
start_gateway() {
    local bin="$1" name="$2"
    PORT="$(free_port)"
    DATA="$WORK/data-$name"
    mkdir -p "$DATA"
    MTPROTO_GATEWAY_LIMITS__HANDSHAKES_PER_IP_PER_MINUTE=10000000 \
        "$bin" --listen "127.0.0.1:$PORT" --data-dir "$DATA" --log-level warn \
        >"$WORK/gateway-$name.log" 2>&1 &
    GATEWAY_PID=$!
    for _ in $(seq 300); do
        if [[ -s "$DATA/server-rsa-public.pem" ]] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            return
        fi
        kill -0 "$GATEWAY_PID" 2>/dev/null || { cat "$WORK/gateway-$name.log" >&2; die "$name gateway exited"; }
        sleep 0.1
    done
    die "$name gateway did not listen on 127.0.0.1:$PORT within 30 s"
}

stop_gateway() {
    kill "$GATEWAY_PID"
    wait "$GATEWAY_PID" 2>/dev/null || true
    GATEWAY_PID=""
}

loadgen() {
    "$LOADGEN" --target "127.0.0.1:$PORT" --public-key "$DATA/server-rsa-public.pem" \
        --connections "$CONNECTIONS" --pings 1000000000 "$@"
}

declare -A RESULT
# Runs one measurement; appends to RESULT[side,n,metric] (one value per round).
measure() {
    local side="$1" n="$2" out before after busy0 busy1 t0 t1 pairs errors re
    busy0="$(machine_busy_ticks)" t0="$(date +%s%N)"
    before="$(cpu_ticks "$GATEWAY_PID")"
    out="$(loadgen --duration-secs "$DURATION" --in-flight "$n")"
    after="$(cpu_ticks "$GATEWAY_PID")"
    busy1="$(machine_busy_ticks)" t1="$(date +%s%N)"
    echo "   $side N=$n: ${out//$'\n'/ | }" >&2
    re='([0-9]+) ping round trips.* ([0-9]+) errors'
    [[ "$out" =~ $re ]] || die "unexpected loadgen output: $out"
    pairs="${BASH_REMATCH[1]}" errors="${BASH_REMATCH[2]}"
    ((errors == 0)) || echo "   warning: $errors errors ($side, N=$n)" >&2
    ((pairs > 0)) || die "no pairs ($side, N=$n)"
    re='([0-9.]+) pairs/s, latency p50 ([0-9]+) us, p99 ([0-9]+) us, p999 ([0-9]+) us.*loadgen CPU ([0-9.]+) us/pair'
    [[ "$out" =~ $re ]] || die "unexpected loadgen output: $out"
    RESULT[$side,$n,rate]+=" ${BASH_REMATCH[1]}"
    RESULT[$side,$n,p50]+=" ${BASH_REMATCH[2]}"
    RESULT[$side,$n,p99]+=" ${BASH_REMATCH[3]}"
    RESULT[$side,$n,p999]+=" ${BASH_REMATCH[4]}"
    RESULT[$side,$n,lgcpu]+=" ${BASH_REMATCH[5]}"
    RESULT[$side,$n,gwcpu]+=" $(awk -v t="$((after - before))" -v hz="$CLK_TCK" -v p="$pairs" \
        'BEGIN { printf "%.1f", t / hz * 1e6 / p }')"
    # CPU used by everything else on the machine meanwhile, in % of all cores:
    # interference from other work makes the figures of this round worse.
    RESULT[$side,$n,other]+=" $(awk -v busy="$((busy1 - busy0))" -v gw="$((after - before))" \
        -v lg="${BASH_REMATCH[5]}" -v p="$pairs" -v hz="$CLK_TCK" -v ns="$((t1 - t0))" -v cores="$(nproc)" \
        'BEGIN { o = (busy - gw) / hz - lg * p / 1e6; if (o < 0) o = 0; printf "%.0f", o / (ns / 1e9 * cores) * 100 }')"
    echo "   $side N=$n: gateway CPU ${RESULT[$side,$n,gwcpu]##* } us/pair, other processes ${RESULT[$side,$n,other]##* }% of the machine" >&2
}

measure_side() {
    local side="$1" bin
    if [[ "$side" == before ]]; then bin="$BEFORE_BIN"; else bin="$AFTER_BIN"; fi
    echo "== $side: $bin" >&2
    start_gateway "$bin" "$side"
    if ((WARMUP > 0)); then
        loadgen --duration-secs "$WARMUP" >/dev/null
    fi
    for n in "${NS[@]}"; do
        measure "$side" "$n"
    done
    stop_gateway
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

# The median of space-separated numbers (the mean of the middle two for an even count).
median() {
    tr ' ' '\n' <<<"$1" | grep . | sort -g |
        awk '{ v[NR] = $1 } END { m = int((NR + 1) / 2); print (NR % 2) ? v[m] : (v[m] + v[m + 1]) / 2 }'
}

echo
echo "$CONNECTIONS connections, ${DURATION} s per measurement, median of $ROUNDS round(s), loopback, $(nproc) cores shared by gateway and loadgen"
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
    row "other load (% of cores)" "$n" other
done
