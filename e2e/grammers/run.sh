#!/usr/bin/env bash
# grammers (a third-party Rust MTProto client) against a gateway with its
# built-in reference session: for every TCP transport grammers has, the
# auth-key handshake, `ping` and invokeWithLayer(initConnection(help.getConfig))
# must each get a reply (pong, and rpc_error 400 for the API call).
#
#   MTPROTO_GATEWAY_BIN=target/release/mtproto-gateway e2e/grammers/run.sh
#
# Optional: GRAMMERS_PROBE_TIMEOUT_SECS (per step, default 10),
# GRAMMERS_TRANSPORTS (space-separated subset), CARGO_TARGET_DIR (default
# ~/.cache/mtproto-edge/grammers-target). Exits non-zero if any call got no reply.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${MTPROTO_GATEWAY_BIN:?set MTPROTO_GATEWAY_BIN to an mtproto-gateway binary}"
gateway_bin=$(realpath "$MTPROTO_GATEWAY_BIN")
timeout_secs=${GRAMMERS_PROBE_TIMEOUT_SECS:-10}
# The gateway at debug, without the SQLite store's per-query lines.
log_level=${GRAMMERS_GATEWAY_LOG_LEVEL:-info,mtproto_gateway=debug}
read -r -a transports <<<"${GRAMMERS_TRANSPORTS:-full abridged intermediate obfuscated obfuscated-abridged}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/mtproto-edge/grammers-target}

"$here/prepare.sh"
nice -n 5 cargo build --release --locked --quiet --manifest-path "$here/Cargo.toml"
probe=$CARGO_TARGET_DIR/release/grammers-probe

workdir=$(mktemp -d)
gateway_pid=
cleanup() {
    if [[ -n $gateway_pid ]]; then
        kill "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Starts the gateway on a free port in 20000-29999; sets port and gateway_pid.
start_gateway() {
    local attempt waited
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        port=$((20000 + RANDOM % 10000))
        if port_open "$port"; then
            continue
        fi
        (cd "$workdir" && exec "$gateway_bin" --listen "127.0.0.1:$port" --log-level "$log_level") \
            >>"$workdir/gateway.log" 2>&1 &
        gateway_pid=$!
        # The first start generates a 2048-bit RSA key: allow it some time.
        for waited in $(seq 1 300); do
            if ! kill -0 "$gateway_pid" 2>/dev/null; then
                break
            fi
            if [[ -s $workdir/mtproto-gateway-data/server-rsa-public.pem ]] && port_open "$port"; then
                echo "gateway pid $gateway_pid on 127.0.0.1:$port (attempt $attempt, ${waited}00 ms)"
                return 0
            fi
            sleep 0.1
        done
        kill "$gateway_pid" 2>/dev/null || true
        wait "$gateway_pid" 2>/dev/null || true
        gateway_pid=
    done
    echo "run.sh: the gateway did not start; its log:" >&2
    cat "$workdir/gateway.log" >&2
    return 1
}

start_gateway

passed=0
failed=0
for transport in "${transports[@]}"; do
    status=0
    "$probe" --addr "127.0.0.1:$port" --transport "$transport" \
        --rsa-public-key "$workdir/mtproto-gateway-data/server-rsa-public.pem" \
        --timeout-secs "$timeout_secs" || status=$?
    if [[ $status -eq 0 ]]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "run.sh: grammers over $transport: a step got no reply (exit $status)" >&2
    fi
done

if [[ $failed -ne 0 ]]; then
    echo "run.sh: gateway log (last 60 lines):" >&2
    tail -n 60 "$workdir/gateway.log" >&2
fi
echo "grammers: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
