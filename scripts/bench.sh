#!/usr/bin/env bash
# Runs the criterion benches and prints our throughput as ratios to the
# OpenSSL references measured in the same run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MTPROTO_CACHE="${MTPROTO_CACHE:-$HOME/.cache/mtproto-edge}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MTPROTO_CACHE/cargo-target}"
cargo bench -p mtproto-gateway --bench crypto -- "$@"
python3 - "$CARGO_TARGET_DIR/criterion" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
def ns(group, name):
    f = root / group / name / "new" / "estimates.json"
    return json.loads(f.read_text())["mean"]["point_estimate"] if f.exists() else None
for size in (1024, 16384):
    g = f"aes_{size}"
    ours, ref, enc = ns(g, "mtproto_ige_decrypt_verify"), ns(g, "openssl_aes256_cbc_encrypt"), ns(g, "mtproto_ige_encrypt_reply")
    if ours and ref:
        mbps = lambda t: size / t * 1e9 / 2**20
        print(f"{size:>6} B: IGE decrypt+verify {mbps(ours):8.1f} MiB/s, reply encrypt {mbps(enc):8.1f} MiB/s, "
              f"OpenSSL CBC encrypt {mbps(ref):8.1f} MiB/s -> ours/OpenSSL {ref/ours:.2f}")
hs, rsa = ns("handshake", "server_side_full_handshake"), ns("handshake", "openssl_rsa2048_private_decrypt")
if hs and rsa:
    print(f"handshake: {1e9/hs:.0f}/s per core; OpenSSL RSA-2048 private: {1e9/rsa:.0f}/s -> handshakes per RSA op {rsa/hs:.3f}")
ceiling, hs256 = ns("handshake", "openssl_ceiling_rsa_and_two_modexps"), ns("handshake", "server_side_full_handshake_dh256")
if hs and ceiling:
    print(f"handshake: {hs/1e3:.0f} us; OpenSSL RSA + two 2048-bit modexps: {ceiling/1e3:.0f} us -> ours/ceiling {hs/ceiling:.2f}")
if hs and hs256:
    print(f"handshake with a 256-bit DH secret: {hs256/1e3:.0f} us -> {hs/hs256:.2f}x the handshakes per core of 2048 bits")
PY
