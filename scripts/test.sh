#!/usr/bin/env bash
# The whole test suite, on a fresh machine with only the Rust toolchain:
# installs what the tests need, runs every test (all features), then runs every example
# to completion (smoke runs).
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the Redis store tests start their own on a free loopback port.
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (apt-get)..."
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null 2>&1 \
      || echo "warning: could not install redis-server; Redis tests will fail" >&2
  fi
fi

cargo test --all-features --no-fail-fast

# Every example runs to completion.
for example in $(ls examples/*.rs | xargs -n1 basename | sed 's/\.rs$//'); do
  echo "== example: $example"
  cargo run -q --all-features --example "$example" >/dev/null
done
echo "examples: all ran to completion"
