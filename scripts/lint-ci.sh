#!/usr/bin/env bash
# Checks the files that only run elsewhere (GitHub Actions, Docker), so a broken
# one fails the local test run instead of the next push:
#   - .github/workflows/*.yml with actionlint (with shellcheck on `run:` scripts);
#   - docker/Dockerfile with BuildKit's own Dockerfile frontend in lint mode (the
#     checks `docker build --check` runs; scripts/tools/dockerfile-check), and
#     that its targets gateway, session and operator exist;
#   - .dockerignore lets every workspace member into the build context;
#   - the shell scripts under scripts/, e2e/ and .ci/ with shellcheck (warnings
#     and errors), when shellcheck is installed (scripts/install-deps.sh does).
# The two Go tools are built once from pinned module versions (Go module proxy)
# into ${MTPROTO_CACHE:-~/.cache/mtproto-edge}/tools/, keyed by version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}/tools"
ACTIONLINT_VERSION=v1.7.12
DOCKERFILE_TARGETS=(gateway session operator)

log() { printf '[lint-ci] %s\n' "$*" >&2; }

command -v go >/dev/null || { log "go not found (needs Go >= 1.26.8 for the BuildKit linter)"; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"
export GOCACHE="$TOOLS/go-build-cache"

# install DIR CMD...: runs CMD (which writes into $OUT) unless DIR exists; DIR appears whole or not at all.
install_once() {
    local dir="$1"
    shift
    [[ -d $dir ]] && return
    log "building $(basename "$dir") (once)"
    OUT="$(mktemp -d "$TOOLS/.build.XXXXXX")"
    "$@"
    mv -T "$OUT" "$dir" 2>/dev/null || rm -rf "$OUT"
}
mkdir -p "$TOOLS"

ACTIONLINT_DIR="$TOOLS/actionlint-$ACTIONLINT_VERSION"
build_actionlint() { GOBIN="$OUT" go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"; }
install_once "$ACTIONLINT_DIR" build_actionlint

# Keyed by the tool's own source (its go.mod pins the BuildKit version).
CHECKER_SRC=scripts/tools/dockerfile-check
CHECKER_DIR="$TOOLS/dockerfile-check-$(cat "$CHECKER_SRC"/go.mod "$CHECKER_SRC"/go.sum "$CHECKER_SRC"/*.go | sha256sum | cut -c1-12)"
build_checker() { (cd "$CHECKER_SRC" && go build -mod=readonly -o "$OUT/dockerfile-check" .); }
install_once "$CHECKER_DIR" build_checker

failed=0
check() {
    local what="$1"
    shift
    if "$@"; then
        log "ok: $what"
    else
        log "FAILED: $what"
        failed=1
    fi
}

SHELLCHECK=""
command -v shellcheck >/dev/null && SHELLCHECK=shellcheck
check "workflows (actionlint $ACTIONLINT_VERSION${SHELLCHECK:+, shellcheck on run: steps})" \
    "$ACTIONLINT_DIR/actionlint" -no-color -pyflakes= -shellcheck="$SHELLCHECK" .github/workflows/*.yml

target_args=()
for t in "${DOCKERFILE_TARGETS[@]}"; do target_args+=(-target "$t"); done
check "docker/Dockerfile (BuildKit lint; targets ${DOCKERFILE_TARGETS[*]})" \
    "$CHECKER_DIR/dockerfile-check" -f docker/Dockerfile "${target_args[@]}"

dockerignore_admits_members() {
    local member ok=0
    for member in $(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["members"]))'); do
        grep -qx "!$member/" .dockerignore || { log ".dockerignore does not admit workspace member $member/"; ok=1; }
    done
    return $ok
}
check ".dockerignore admits every workspace member" dockerignore_admits_members

if [[ -n $SHELLCHECK ]]; then
    mapfile -t scripts < <(git ls-files --cached --others --exclude-standard -- '*.sh' .ci/run)
    check "shell scripts (shellcheck -S warning, ${#scripts[@]} files)" shellcheck -S warning "${scripts[@]}"
else
    log "skipped: shell scripts (shellcheck not installed)"
fi

exit $failed
