#!/usr/bin/env bash
# The whole test suite, on a fresh machine with only the Rust toolchain:
# installs what the tests need, runs every test (all features), then runs every example
# to completion (smoke runs).
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server and redis-cli: the Redis store tests start their own server on a free loopback
# port, and their own Redis Cluster (six servers joined by `redis-cli --cluster create`).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server and redis-tools (apt-get)..."
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null 2>&1 \
      || echo "warning: could not install redis-server/redis-tools; Redis tests will fail" >&2
  fi
fi

cargo test --all-features --no-fail-fast

# Every example runs to completion.
for example in $(ls examples/*.rs | xargs -n1 basename | sed 's/\.rs$//'); do
  echo "== example: $example"
  cargo run -q --all-features --example "$example" >/dev/null
done
echo "examples: all ran to completion"
