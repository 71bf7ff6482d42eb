#!/usr/bin/env bash
# Installs pinned kind, kubectl and helm (linux/amd64 release binaries, checked
# against their published SHA-256 sums) into DIR, for the kind e2e in GitHub
# Actions. Skips what DIR already has at the right version.
#
#   e2e/kind/tools.sh DIR              install
#   e2e/kind/tools.sh --node-image     print the kind node image (for `kind create cluster --image`)
set -euo pipefail

KIND_VERSION=v0.33.0
# A node image built for this kind release (its release notes), pinned by digest.
KIND_NODE_IMAGE=kindest/node:v1.36.4@sha256:099e049362a1526b2db71494e1947aae99bd16290d7c895f2b7ea312e3cbfaed
KUBECTL_VERSION=v1.36.4
HELM_VERSION=v3.22.0

if [[ "${1:-}" == "--node-image" ]]; then
    echo "$KIND_NODE_IMAGE"
    exit 0
fi
DIR="${1:?usage: tools.sh DIR | --node-image}"
mkdir -p "$DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# fetch URL SHA256_URL OUT: downloads URL and checks it against the first word of SHA256_URL.
fetch() {
    local sum
    curl -fsSL --retry 3 -o "$3" "$1"
    sum="$(curl -fsSL --retry 3 "$2" | awk '{print $1; exit}')"
    echo "$sum  $3" | sha256sum -c --quiet - || { echo "checksum mismatch: $1" >&2; exit 1; }
}

if [[ "$("$DIR/kind" version 2>/dev/null)" != *"$KIND_VERSION"* ]]; then
    url="https://github.com/kubernetes-sigs/kind/releases/download/$KIND_VERSION/kind-linux-amd64"
    fetch "$url" "$url.sha256sum" "$TMP/kind"
    install -m 0755 "$TMP/kind" "$DIR/kind"
fi
if [[ "$("$DIR/kubectl" version --client 2>/dev/null)" != *"$KUBECTL_VERSION"* ]]; then
    url="https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/amd64/kubectl"
    fetch "$url" "$url.sha256" "$TMP/kubectl"
    install -m 0755 "$TMP/kubectl" "$DIR/kubectl"
fi
if [[ "$("$DIR/helm" version --short 2>/dev/null)" != "$HELM_VERSION"* ]]; then
    url="https://get.helm.sh/helm-$HELM_VERSION-linux-amd64.tar.gz"
    fetch "$url" "$url.sha256sum" "$TMP/helm.tar.gz"
    tar -xzf "$TMP/helm.tar.gz" -C "$TMP" linux-amd64/helm
    install -m 0755 "$TMP/linux-amd64/helm" "$DIR/helm"
fi
"$DIR/kind" version
"$DIR/kubectl" version --client
"$DIR/helm" version --short
