#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: installs what is
# needed, builds, and runs the demo (integration/examples/demo.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh: run as root (it starts containerd and containers)" >&2
  exit 1
fi
bash scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/hyperbox/cargo-target}"
cargo build --quiet --locked --bin hyperbox-snapshotter --bin hyperbox-nri --bin hb -p hyperbox-snapshotter -p hyperbox-nri -p hyperbox-cli
cargo build --quiet --locked -p hyperbox-integration --example demo
exec "$CARGO_TARGET_DIR/debug/examples/demo"
