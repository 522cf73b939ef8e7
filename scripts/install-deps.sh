#!/usr/bin/env bash
# Installs every system package hyperbox's tests and demo need on Debian 12
# (bookworm), as root. Idempotent: a second run changes nothing.
#
# containerd 1.7.24 is taken from Debian 13 (trixie) through an apt pin of
# priority 100, so nothing else is pulled from trixie unless asked for by
# version. Before installing, the plan is simulated and refused if it would
# touch libc6 (a trixie libc on a bookworm system breaks the machine).
set -euo pipefail

CONTAINERD_VERSION="1.7.24~ds1-6+deb13u1"

# Packages from bookworm. Keep this list to what tests, benchmarks and the
# demo really use; see docs/design.md §6.
BOOKWORM_PACKAGES=(
  runc
  docker-registry
  busybox-static
  containernetworking-plugins
  iproute2
  iptables
  erofs-utils
  fuse3
  protobuf-compiler
  clang
  gcc
  libc6-dev
  libbpf-dev
  libseccomp-dev
  pkg-config
  zstd
  util-linux
  procps
  psmisc
  ca-certificates
  openssl
  apache2-utils
  prometheus
  bpftool
)

log() { printf '[install-deps] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (apt-get install, containerd, mounts)"
  exit 1
fi

. /etc/os-release
if [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
  log "warning: written for Debian 12 (bookworm), this is ${PRETTY_NAME:-unknown}"
fi

export DEBIAN_FRONTEND=noninteractive

# trixie source, only for the pinned containerd.
if [ ! -f /etc/apt/sources.list.d/hyperbox-trixie.sources ]; then
  log "adding the trixie suite (pinned at priority 100)"
  cat >/etc/apt/sources.list.d/hyperbox-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
cat >/etc/apt/preferences.d/hyperbox-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100

Package: libc6 libc-bin libc-dev-bin libc6-dev locales
Pin: release n=trixie
Pin-Priority: -1
PIN

# Refresh lists once a day at most, or when the trixie lists are missing.
stamp=/var/lib/apt/periodic/hyperbox-update-stamp
# (apt-cache's output is captured first: grep -q closing the pipe early would
# fail the pipeline under pipefail.)
policy=$(apt-cache policy containerd 2>/dev/null || true)
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ] \
  || ! grep -qF "$CONTAINERD_VERSION" <<<"$policy"; then
  log "apt-get update"
  apt-get update -qq
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi

missing=()
for p in "${BOOKWORM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
have_containerd=$(dpkg-query -W -f='${Version}' containerd 2>/dev/null || true)
if [ "$have_containerd" != "$CONTAINERD_VERSION" ]; then
  missing+=("containerd=${CONTAINERD_VERSION}")
fi

if [ "${#missing[@]}" -eq 0 ]; then
  log "all packages present"
else
  log "installing: ${missing[*]}"
  # Simulate first: refuse a plan that would replace libc6 from trixie.
  plan=$(apt-get -s install -y --no-install-recommends "${missing[@]}")
  if grep -E '^Inst (libc6|libc-bin) ' <<<"$plan" | grep -q trixie; then
    log "refusing: the install plan would upgrade libc6 from trixie:"
    grep -E '^Inst ' <<<"$plan" >&2
    exit 1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cargo-deny, pinned, built once into a cache outside the clone (CI's
# scripts/test.sh checks the dependency graph with it).
CARGO_DENY_VERSION="0.20.2"
TOOLS_ROOT="${HYPERBOX_TOOLS_ROOT:-/var/cache/hyperbox/tools}"
if ! "$TOOLS_ROOT/bin/cargo-deny" --version 2>/dev/null | grep -qF "$CARGO_DENY_VERSION"; then
  log "building cargo-deny $CARGO_DENY_VERSION into $TOOLS_ROOT (once)"
  cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION" \
    --root "$TOOLS_ROOT" --target-dir "$TOOLS_ROOT/target" --quiet \
    || { log "cargo install cargo-deny@$CARGO_DENY_VERSION failed"; exit 1; }
fi

# Go builds containerd's own snapshotter test suite
# (integration/containerd-testsuite). These machines carry Go at
# /usr/local/go; no distro package is new enough (containerd v2.4 needs
# 1.26.6+), so a missing or older Go is an error here, not an install.
GO_BIN="$(command -v go || echo /usr/local/go/bin/go)"
GO_MIN="1.26.6"
go_version=$("$GO_BIN" env GOVERSION 2>/dev/null | sed 's/^go//') || true
if [ -z "$go_version" ] || [ "$(printf '%s\n%s\n' "$GO_MIN" "$go_version" | sort -V | head -1)" != "$GO_MIN" ]; then
  log "Go $GO_MIN or newer is needed at /usr/local/go/bin/go or on PATH (found: ${go_version:-none})"
  exit 1
fi
# Fetch the suite's modules into the shared cache once, so test runs need
# no module proxy.
(
  cd "$(dirname "$0")/../integration/containerd-testsuite"
  GOPATH=/var/cache/hyperbox/go GOMODCACHE=/var/cache/hyperbox/go/mod \
    GOCACHE=/var/cache/hyperbox/go/cache GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
    "$GO_BIN" mod download
) || { log "go mod download for integration/containerd-testsuite failed (containerd v2 modules)"; exit 1; }

# Verify what the tests depend on, by running it.
containerd --version | grep -q 'v\?1\.7\.24' || { log "containerd is not 1.7.24: $(containerd --version)"; exit 1; }
runc --version >/dev/null
docker-registry --version >/dev/null 2>&1 || test -x /usr/bin/docker-registry
test -x /bin/busybox
log "ok: $(containerd --version | awk '{print $1, $3}'), $(runc --version | head -1), registry $(dpkg-query -W -f='${Version}' docker-registry)"
