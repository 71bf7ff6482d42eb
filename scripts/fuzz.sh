#!/usr/bin/env bash
# Builds and runs the coverage-guided fuzz targets of fuzz/ (libFuzzer via
# libfuzzer-sys, built by cargo-fuzz on stable Rust with --sanitizer none).
#
#   scripts/fuzz.sh [TARGET...] [--time S]   each target S seconds (default 60)
#   scripts/fuzz.sh --smoke                  each target a few seconds (CI)
#
# cargo-fuzz is installed if missing, cached by version under
# ~/.cache/mtproto-edge/cargo-tools. New inputs go to a work corpus under
# ~/.cache/mtproto-edge/fuzz-corpus/TARGET; the seeds in fuzz/corpus/TARGET
# are read, never written. A crash leaves its input in fuzz/artifacts/TARGET/
# and fails the script. Prints executions per target.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${HOME}/.cache/mtproto-edge"
CARGO_FUZZ_VERSION="0.13.2"
TOOLS="${CACHE}/cargo-tools"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CACHE}/fuzz-target}"
WORK="${FUZZ_CORPUS_DIR:-${CACHE}/fuzz-corpus}"
ALL_TARGETS=(transport handshake decrypt rsa_unpad reference_session proxy longpoll bind plain connection)

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

seconds=60
smoke=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time)
            [ $# -ge 2 ] || usage 2
            seconds="$2"
            shift 2
            ;;
        --smoke)
            smoke=1
            seconds=6
            shift
            ;;
        -h | --help) usage 0 ;;
        -*) usage 2 ;;
        *)
            targets+=("$1")
            shift
            ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
    [ -f "${ROOT}/fuzz/fuzz_targets/${t}.rs" ] || {
        echo "fuzz.sh: no target ${t} (have: ${ALL_TARGETS[*]})" >&2
        exit 2
    }
done

# cargo-fuzz, cached by version.
cargo_fuzz="${TOOLS}/bin/cargo-fuzz"
if ! "${cargo_fuzz}" --version 2>/dev/null | grep -qx "cargo-fuzz ${CARGO_FUZZ_VERSION}"; then
    echo "fuzz.sh: installing cargo-fuzz ${CARGO_FUZZ_VERSION} into ${TOOLS}"
    cargo install cargo-fuzz --version "${CARGO_FUZZ_VERSION}" --locked --root "${TOOLS}"
fi
export PATH="${TOOLS}/bin:${PATH}"

# --sanitizer none: the instrumentation flags cargo-fuzz passes then need
# no -Z option, so the installed stable toolchain builds them.
cd "${ROOT}/fuzz"
started=$(date +%s)
cargo fuzz build --sanitizer none
echo "fuzz.sh: built in $(($(date +%s) - started)) s"
host="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="${CARGO_TARGET_DIR}/${host}/release"

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "${WORK}/${t}" "${ROOT}/fuzz/artifacts/${t}"
    log="$(mktemp)"
    args=(-max_total_time="${seconds}" -print_final_stats=1 -timeout=60 -rss_limit_mb=2048
        -artifact_prefix="${ROOT}/fuzz/artifacts/${t}/")
    if [ "${smoke}" -eq 1 ]; then
        # CI: the seeds must run clean; new inputs are not kept.
        scratch="$(mktemp -d)"
        dirs=("${scratch}" "${ROOT}/fuzz/corpus/${t}")
    else
        dirs=("${WORK}/${t}" "${ROOT}/fuzz/corpus/${t}")
    fi
    echo "fuzz.sh: ${t} for ${seconds} s"
    if "${bin_dir}/${t}" "${args[@]}" "${dirs[@]}" >"${log}" 2>&1; then
        status=ok
    else
        status=CRASH
        failed+=("${t}")
        grep -m1 -A12 -E 'panicked|ERROR: libFuzzer' "${log}" >&2 || tail -20 "${log}" >&2
    fi
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "${log}")"
    cov="$(grep -oE 'cov: [0-9]+' "${log}" | tail -1 || true)"
    summary+=("$(printf '%-18s %-5s %12s execs  %s' "${t}" "${status}" "${execs:-?}" "${cov}")")
    rm -f "${log}"
    [ "${smoke}" -eq 0 ] || rm -rf "${scratch}"
done

echo "fuzz.sh: target             status      executions"
printf '  %s\n' "${summary[@]}"
echo "fuzz.sh: total $(($(date +%s) - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashes in ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
