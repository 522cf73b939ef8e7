#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs every system package the
# tests need (scripts/install-deps.sh), then fmt, clippy and every test as
# root with HYPERBOX_REQUIRE_ALL=1, so a missing prerequisite fails instead
# of skipping; then the end-to-end tests (crate hyperbox-integration) once
# more on containerd 2.x (HYPERBOX_CONTAINERD_LINE=2), and the suites that
# start containers on hyperbox's shim on both lines. Every pass always
# runs; the script fails if any did.
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
echo "== cargo test (HYPERBOX_REQUIRE_ALL=1, containerd 1.7)"
status=0
HYPERBOX_CONTAINERD_LINE=1.7 cargo test --workspace --all-targets --locked --no-fail-fast || status=$?

# The end-to-end tests again on containerd 2.x. containerd_testsuite runs
# containerd v2's snapshotter conformance suite straight against
# hyperbox-snapshotter, with no containerd daemon: it ran above already.
echo "== cargo test -p hyperbox-integration (HYPERBOX_REQUIRE_ALL=1, containerd 2.x)"
line2_tests=()
for f in integration/tests/*.rs; do
  name=$(basename "$f" .rs)
  [ "$name" = containerd_testsuite ] || line2_tests+=(--test "$name")
done
HYPERBOX_CONTAINERD_LINE=2 cargo test -p hyperbox-integration --lib --bins --examples --benches \
  "${line2_tests[@]}" --locked --no-fail-fast || status=$?

# The suites that start containers, once more on hyperbox's shim on both
# lines: every container the harness creates through containerd's API gets
# runtime io.containerd.hyperbox.v1, CRI's default handler is hyperbox and
# nerdctl runs with --runtime io.containerd.hyperbox.v1
# (HYPERBOX_TEST_SHIM, integration/src/shim.rs). tests/shim.rs and the
# critest comparison of the two shims ran in both passes above.
shim_tests=(--test containerd_api --test cri --test crictl --test nerdctl --test agent --test trace --test hb)
for line in 1.7 2; do
  echo "== cargo test -p hyperbox-integration (HYPERBOX_TEST_SHIM=hyperbox, containerd $line)"
  HYPERBOX_TEST_SHIM=hyperbox HYPERBOX_CONTAINERD_LINE=$line cargo test -p hyperbox-integration \
    "${shim_tests[@]}" --locked --no-fail-fast || status=$?
done
exit "$status"
