#!/usr/bin/env bash
# Installs, if missing, what the tests need: Debian packages and a Python
# virtualenv with the pinned client libraries. Safe to run repeatedly.
#
#   scripts/install-deps.sh                install
#   scripts/install-deps.sh --print-venv   print the virtualenv path
#   scripts/install-deps.sh --print-gramjs print the GramJS (WebSocket client) directory
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MTPROTO_CACHE="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}"
REQUIREMENTS="$ROOT/e2e/gateway/requirements.txt"
VENV="$MTPROTO_CACHE/venv-$(sha256sum "$REQUIREMENTS" | cut -c1-12)"

GRAMJS_VERSION=2.26.22
GRAMJS="$MTPROTO_CACHE/gramjs-$GRAMJS_VERSION"

if [[ "${1:-}" == "--print-gramjs" ]]; then
    echo "$GRAMJS"
    exit 0
fi
if [[ "${1:-}" == "--print-venv" ]]; then
    echo "$VENV"
    exit 0
fi

APT_PACKAGES=(python3-venv python3-yaml libssl-dev pkg-config openssl redis-server redis-tools mariadb-server mariadb-client haproxy nodejs shellcheck)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import telethon, pytest" 2>/dev/null; then
    echo "creating $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQUIREMENTS"
fi

# GramJS, the real WebSocket client of the WebSocket e2e tests.
if [[ ! -f "$GRAMJS/node_modules/telegram/package.json" ]]; then
    echo "installing GramJS $GRAMJS_VERSION into $GRAMJS"
    mkdir -p "$GRAMJS"
    (cd "$GRAMJS" && npm install --no-audit --no-fund --silent "telegram@$GRAMJS_VERSION")
fi
