#!/usr/bin/env bash
# Writes what is needed to debug a failed e2e run into DIR: every object, the
# events, the MtprotoGateways with status, and the logs of every pod in the e2e
# and operator namespaces (previous containers too).
#
#   e2e/kind/dump.sh DIR [NAMESPACE...]     (default: mtproto-e2e mtproto-system)
#
# Best effort: a failing kubectl call is noted in the file and the dump goes on.
set -uo pipefail
DIR="${1:?usage: dump.sh DIR [NAMESPACE...]}"
shift
NAMESPACES=("$@")
((${#NAMESPACES[@]})) || NAMESPACES=("${E2E_NAMESPACE:-mtproto-e2e}" "${E2E_OPERATOR_NAMESPACE:-mtproto-system}")
mkdir -p "$DIR"

run() {
    local out="$1"
    shift
    { echo "\$ $*"; "$@" 2>&1 || echo "(exit $?)"; } >>"$DIR/$out"
}

run all.txt kubectl get all -A -o wide
run events.txt kubectl get events -A --sort-by=.lastTimestamp
run nodes.txt kubectl describe nodes
run gateways.yaml kubectl get mtprotogateways -A -o yaml
run endpointslices.yaml kubectl get endpointslices -A -o yaml
for ns in "${NAMESPACES[@]}"; do
    run "describe-$ns.txt" kubectl -n "$ns" describe deployments,replicasets,pods,services
    for pod in $(kubectl -n "$ns" get pods -o name 2>/dev/null); do
        name="${pod#pod/}"
        run "logs-$ns-$name.txt" kubectl -n "$ns" logs "$name" --all-containers --timestamps
        # Only pods whose containers restarted have previous logs.
        kubectl -n "$ns" logs "$name" --all-containers --timestamps --previous \
            >"$DIR/logs-$ns-$name.previous.txt" 2>/dev/null || rm -f "$DIR/logs-$ns-$name.previous.txt"
    done
done
echo "dump written to $DIR"
