#!/usr/bin/env bash
# fixity's whole test suite, as CI runs it: formatting, lints, the dependency rule (no
# OpenSSL), then every Rust test tier (unit, in-process router, real sockets, CLI).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

step "no OpenSSL in the dependency tree"
if cargo tree --locked -i openssl-sys >/dev/null 2>&1; then
  echo "openssl-sys is in the dependency tree:" >&2
  cargo tree --locked -i openssl-sys >&2
  exit 1
fi

step "cargo test"
cargo test --locked

step "end-to-end tier (real kube-apiserver, etcd and kubectl)"
tests/e2e/run.sh
