#!/usr/bin/env bash
# Builds the release binary for the musl target, as the Dockerfile does, and checks that it is
# static and runs: the image has no Docker engine to be built on here, so this is the part of
# it that can be tested.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=x86_64-unknown-linux-musl
die() { echo "static-binary.sh: $*" >&2; exit 1; }
rustup target list --installed 2>/dev/null | grep -qx "$target" \
  || die "the $target target is missing: rustup target add $target"
command -v musl-gcc >/dev/null || die "musl-gcc is missing (ring compiles C): apt-get install musl-tools"

cargo build --release --locked --target "$target" --bin fixity
bin=target/$target/release/fixity

if readelf -l "$bin" | grep -q INTERP; then
  die "$bin asks for a dynamic loader: it is not static"
fi
echo "static: $bin ($(du -h "$bin" | cut -f1)) has no dynamic loader"
"$bin" --version
"$bin" crd | diff -q - <(cat charts/fixity/crds/immutabilitypolicies.fixity.dev.yaml charts/fixity/crds/verifiedevidences.fixity.dev.yaml)
printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: nginx}]}\n' \
  | "$bin" check - >/dev/null && die "the static binary admitted a tagged pod"
echo "static binary: 3 passed, 0 failed"
