#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs every system package the
# tests need (scripts/install-deps.sh), then fmt, clippy and every test as
# root with HYPERBOX_REQUIRE_ALL=1, so a missing prerequisite fails instead
# of skipping.
#
# Builds go to CARGO_TARGET_DIR (default outside the clone), so repeated runs
# on the same machine reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: run as root (the tests start containerd, mount, and create cgroups)" >&2
  exit 1
fi

bash scripts/install-deps.sh

export HYPERBOX_REQUIRE_ALL=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/hyperbox/cargo-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== gofmt (integration/containerd-testsuite)"
unformatted=$("$(command -v gofmt || echo /usr/local/go/bin/gofmt)" -l integration/containerd-testsuite)
if [ -n "$unformatted" ]; then echo "gofmt: $unformatted" >&2; exit 1; fi
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo deny check bans licenses sources"
"${HYPERBOX_TOOLS_ROOT:-/var/cache/hyperbox/tools}/bin/cargo-deny" --offline check bans licenses sources
echo "== cargo test (HYPERBOX_REQUIRE_ALL=1)"
cargo test --workspace --all-targets --locked --no-fail-fast
