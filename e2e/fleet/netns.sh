#!/usr/bin/env bash
# Test hosts for the fleet e2e: network namespaces behind one bridge, so session
# processes get real, non-loopback addresses that EndpointSlices accept.
#
#   netns.sh up        remove leftovers, then create the bridge (host side $FLEET_HOST_IP/24)
#   netns.sh add N     host N (1..$MAX_HOSTS): netns $PREFIX-sN, address $FLEET_SUBNET.(10+N)
#   netns.sh ip N      print host N's address
#   netns.sh del N     remove host N (its processes must be gone: `ip netns pids`)
#   netns.sh down      remove every host and the bridge (idempotent)
#
# Env: FLEET_SUBNET (default 10.77.0; the bridge takes .1), FLEET_PREFIX (default mtfleet).
# Needs root (ip netns, veth).
set -euo pipefail
SUBNET="${FLEET_SUBNET:-10.77.0}"
PREFIX="${FLEET_PREFIX:-mtfleet}"
BRIDGE="${PREFIX}0"
MAX_HOSTS=8

die() { printf '[netns] ERROR: %s\n' "$*" >&2; exit 1; }
host_n() { [[ "$1" =~ ^[1-9]$ && $1 -le $MAX_HOSTS ]] || die "host number must be 1..$MAX_HOSTS, got '$1'"; }

down() {
  local ns pid
  for ns in $(ip netns list | awk -v p="^$PREFIX-s" '$1 ~ p {print $1}'); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

case "${1:-}" in
  up)
    down
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    ;;
  add)
    host_n "${2:-}"
    ns="$PREFIX-s$2" veth="${PREFIX}-h$2"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$((10 + $2))/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$SUBNET.1"
    ;;
  ip) host_n "${2:-}"; echo "$SUBNET.$((10 + $2))" ;;
  del)
    host_n "${2:-}"
    ip link del "${PREFIX}-h$2" 2>/dev/null || true
    ip netns del "$PREFIX-s$2" 2>/dev/null || true
    ;;
  down) down ;;
  *) echo "usage: $0 up|add N|ip N|del N|down" >&2; exit 2 ;;
esac
