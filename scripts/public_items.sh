#!/usr/bin/env bash
# Counts the crate's public items as issue 13 counts them: types, traits and functions at
# module level (rustdoc's struct/enum/trait/type/fn pages, every feature on; re-exports of
# one item count once). Constants are listed apart. Prints the items, then the counts.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo doc -q --all-features --no-deps >/dev/null
root=target/doc/tower_retry_guard
pages=$(find "$root" -name '*.html' | grep -E '/(struct|enum|trait|type|fn|constant)\.[^/]*\.html$' \
  | xargs grep -L 'Redirection' | sed "s|$root/||" | sort)
echo "$pages"
items=$(echo "$pages" | grep -cvE '(^|/)constant\.' || true)
consts=$(echo "$pages" | grep -cE '(^|/)constant\.' || true)
echo "public items (types + traits + functions): $items"
echo "public constants: $consts"
