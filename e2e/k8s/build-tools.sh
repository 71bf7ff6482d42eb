#!/usr/bin/env bash
# Build a Docker-free Kubernetes test bed from Go modules (via the Go module proxy):
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl   (k8s.io/kubernetes)
#   etcd                                                             (go.etcd.io/etcd/server/v3)
#   kwok                                                             (sigs.k8s.io/kwok)
#   helm                                                             (helm.sh/helm/v3)
# into ${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}/k8s-tools/<stamp>/bin.
# Idempotent: if all binaries are present it prints "cached" and exits.
# Prints the bin dir as the last line of stdout.
set -euo pipefail

# ---- pinned versions (all verified to be served by proxy.golang.org) ----
K8S_VERSION=v1.36.3     # staging modules k8s.io/* at v0.36.3
ETCD_VERSION=v3.6.16    # latest 3.6 patch; 3.6 is the line paired with k8s 1.34+
KWOK_VERSION=v0.8.0     # built against k8s.io v0.36 (its version string is a constant in the module)
HELM_VERSION=v3.22.0

STAMP="${K8S_VERSION}-${ETCD_VERSION}-${KWOK_VERSION}-${HELM_VERSION}"
TOOLS_ROOT="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}/k8s-tools"
DIR="$TOOLS_ROOT/$STAMP"
BIN="$DIR/bin"
WORK="$DIR/work"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)

log() { printf '[build-tools] %s\n' "$*" >&2; }
die() { printf '[build-tools] ERROR: %s\n' "$*" >&2; exit 1; }

all_present() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

if [[ "${1:-}" == "--print-bin" ]]; then echo "$BIN"; exit 0; fi

if all_present; then
  log "cached: $BIN"
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || die "go not found in PATH (need Go >= 1.26)"
mkdir -p "$BIN" "$WORK"

# One builder at a time per cache (CI + a developer shell may race).
exec 9>"$TOOLS_ROOT/.build.lock"
if ! flock -n 9; then
  log "another build holds $TOOLS_ROOT/.build.lock; waiting (max 60 min)"
  flock -w 3600 9 || die "timed out waiting for the build lock"
fi
if all_present; then log "cached (built by a concurrent run): $BIN"; echo "$BIN"; exit 0; fi

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-trimpath -buildvcs=false"
export GOPROXY="${GOPROXY:-https://proxy.golang.org}"
# Dedicated build cache under the tool cache (shared between version stamps).
export GOCACHE="${MTPROTO_GOCACHE:-$TOOLS_ROOT/go-build-cache}"
NICE=(nice -n 10)

T0=$(date +%s)
step_t=$T0
stepdone() { local now; now=$(date +%s); log "$1 done in $((now - step_t))s"; step_t=$now; }

# ---------------------------------------------------------------- k8s ----
build_k8s() {
  local need=0 b
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [[ -x "$BIN/$b" ]] || need=1
  done
  [[ $need == 1 ]] || { log "k8s binaries present"; return; }
  log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $K8S_VERSION (slow: ~10-25 min on 2 cores)"
  local sv="v0.${K8S_VERSION#v1.}" minor
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local w="$WORK/k8s"
  mkdir -p "$w"
  (
    cd "$w"
    if [[ ! -f .mod-ready ]]; then
      rm -f go.mod go.sum tools.go
      go mod init testbed.local/k8s >/dev/null 2>&1
      # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
      # ./staging paths, which only works inside that repo. Point every staging module at
      # its published tag instead; generated from the go.mod of this exact version.
      local gomod m
      gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
      [[ -f "$gomod" ]] || die "could not download go.mod of k8s.io/kubernetes@$K8S_VERSION"
      for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod"); do
        go mod edit -replace="$m=$m@$sv"
      done
      cat > tools.go <<EOF
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
EOF
      go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
      "${NICE[@]}" go mod tidy >&2 || die "go mod tidy failed for the k8s wrapper"
      touch .mod-ready
    fi
    local ld="-s -w"
    ld+=" -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
    ld+=" -X k8s.io/component-base/version.gitMajor=1"
    ld+=" -X k8s.io/component-base/version.gitMinor=$minor"
    ld+=" -X k8s.io/component-base/version.gitTreeState=clean"
    ld+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
    ld+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
    ld+=" -X k8s.io/client-go/pkg/version.gitMajor=1"
    ld+=" -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    ld+=" -X k8s.io/client-go/pkg/version.gitTreeState=clean"
    ld+=" -X k8s.io/client-go/pkg/version.buildDate=1970-01-01T00:00:00Z"
    "${NICE[@]}" go build -ldflags "$ld" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubectl
  ) || die "k8s build failed"
  stepdone "k8s"
}

# --------------------------------------------------------------- etcd ----
build_etcd() {
  [[ -x "$BIN/etcd" ]] && { log "etcd present"; return; }
  log "building etcd $ETCD_VERSION"
  local w="$WORK/etcd"
  mkdir -p "$w"
  (
    cd "$w"
    # server/v3's go.mod has local replace directives, so `go install pkg@v` is refused:
    # use a wrapper module of its own (keeps grpc/otel versions apart from the k8s one).
    if [[ ! -f .mod-ready ]]; then
      rm -f go.mod go.sum tools.go
      go mod init testbed.local/etcd >/dev/null 2>&1
      printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
      go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
      "${NICE[@]}" go mod tidy >&2 || die "go mod tidy failed for etcd"
      touch .mod-ready
    fi
    "${NICE[@]}" go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  ) || die "etcd build failed"
  stepdone "etcd"
}

# --------------------------------------------------------------- kwok ----
build_kwok() {
  [[ -x "$BIN/kwok" ]] && { log "kwok present"; return; }
  log "building kwok $KWOK_VERSION"
  (
    cd "$WORK"
    GOBIN="$BIN" "${NICE[@]}" go install \
      -ldflags "-s -w" \
      "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  ) || die "kwok build failed"
  stepdone "kwok"
}

# --------------------------------------------------------------- helm ----
build_helm() {
  [[ -x "$BIN/helm" ]] && { log "helm present"; return; }
  log "building helm $HELM_VERSION"
  local minor
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  # Without these, `helm template`/`helm lint` assume Kubernetes v1.20.
  ld+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
  ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
  (
    cd "$WORK"
    GOBIN="$BIN" "${NICE[@]}" go install -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  ) || die "helm build failed"
  stepdone "helm"
}

log "building into $BIN (GOCACHE=$GOCACHE)"
build_k8s
build_etcd
build_kwok
build_helm

all_present || die "some binaries are missing after the build: $(ls "$BIN")"
"$BIN/kube-apiserver" --version >&2
T1=$(date +%s)
log "build finished in $((T1 - T0))s"
echo "$BIN"
