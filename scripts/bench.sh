#!/usr/bin/env bash
# Runs the benches and prints our figures as ratios to the OpenSSL
# references measured in the same run: the handshake (criterion; arguments
# go to criterion) and AES-256-IGE (the `ige` bench, interleaved with
# OpenSSL AES-256-CBC; it prints its own lines).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MTPROTO_CACHE="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MTPROTO_CACHE/cargo-target}"
cargo bench -p mtproto-gateway --bench crypto -- "$@"
cargo bench -p mtproto-gateway --bench ige
python3 - "$CARGO_TARGET_DIR/criterion" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
def ns(group, name):
    f = root / group / name / "new" / "estimates.json"
    return json.loads(f.read_text())["mean"]["point_estimate"] if f.exists() else None
hs, rsa = ns("handshake", "server_side_full_handshake"), ns("handshake", "openssl_rsa2048_private_decrypt")
if hs and rsa:
    print(f"handshake: {1e9/hs:.0f}/s per core; OpenSSL RSA-2048 private: {1e9/rsa:.0f}/s -> handshakes per RSA op {rsa/hs:.3f}")
ceiling, hs256 = ns("handshake", "openssl_ceiling_rsa_and_two_modexps"), ns("handshake", "server_side_full_handshake_dh256")
if hs and ceiling:
    print(f"handshake: {hs/1e3:.0f} us; OpenSSL RSA + two 2048-bit modexps: {ceiling/1e3:.0f} us -> ours/ceiling {hs/ceiling:.2f}")
if hs and hs256:
    print(f"handshake with a 256-bit DH secret: {hs256/1e3:.0f} us -> {hs/hs256:.2f}x the handshakes per core of 2048 bits")
PY
