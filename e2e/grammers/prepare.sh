#!/usr/bin/env bash
# Puts a patched copy of grammers-mtproto under vendor/ for Cargo.toml's
# [patch.crates-io]: the crate as published on crates.io (fetched by cargo into
# its registry) plus patches/grammers-mtproto-$VERSION/*.patch, in order:
#   0001 adds grammers_mtproto::authentication::add_server_key so the probe can
#        accept the gateway's RSA key (grammers only knows Telegram's);
#   0002 makes the abridged transport read a negative word as an error code
#        only in a 4-byte packet, as in its intermediate transport (0.11.0
#        takes any short packet whose auth_key_id has bit 31 set for one).
# Idempotent; vendor/ is not committed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=0.11.0
crate=grammers-mtproto
dest=$here/vendor/$crate
patches=("$here/patches/$crate-$version"/*.patch)
stamp=$dest/.applied.patch

if [[ -f $stamp ]] && cat "${patches[@]}" | cmp -s "$stamp" -; then
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The probe's own manifest can't be fetched yet (its [patch] points at $dest),
# so fetch the crate through a throwaway manifest.
mkdir -p "$tmp/fetch/src"
: >"$tmp/fetch/src/lib.rs"
cat >"$tmp/fetch/Cargo.toml" <<TOML
[package]
name = "fetch-$crate"
version = "0.0.0"
edition = "2021"

[dependencies]
$crate = "=$version"

[workspace]
TOML
cargo fetch --quiet --manifest-path "$tmp/fetch/Cargo.toml"

cargo_home=${CARGO_HOME:-$HOME/.cargo}
src=$(find "$cargo_home/registry/src" -mindepth 2 -maxdepth 2 -type d -name "$crate-$version" -print -quit)
if [[ -n $src ]]; then
    cp -R "$src" "$tmp/$crate"
else
    # Not unpacked yet: cargo fetch only guarantees the .crate archive.
    archive=$(find "$cargo_home/registry/cache" -mindepth 2 -maxdepth 2 -type f -name "$crate-$version.crate" -print -quit)
    if [[ -z $archive ]]; then
        echo "prepare.sh: $crate-$version not found under $cargo_home/registry" >&2
        exit 1
    fi
    tar -xzf "$archive" -C "$tmp"
    mv "$tmp/$crate-$version" "$tmp/$crate"
fi

for patch_file in "${patches[@]}"; do
    patch --quiet --forward --batch -p1 -d "$tmp/$crate" <"$patch_file"
done
cat "${patches[@]}" >"$tmp/$crate/.applied.patch"

mkdir -p "$here/vendor"
rm -rf "$dest"
mv "$tmp/$crate" "$dest"
echo "prepare.sh: $dest ($crate $version + ${#patches[@]} patches)"
