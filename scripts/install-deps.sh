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

# Go-built tools, pinned; each goes into its own directory
# $GO_BIN_ROOT/<name>-v<version> (integration/src/gobin.rs and
# integration/src/tools.rs carry the same pins).
CONTAINERD2_VERSION="2.4.2"   # github.com/containerd/containerd/v2
CRI_TOOLS_VERSION="1.37.0"    # sigs.k8s.io/cri-tools: crictl, critest
SOCI_VERSION="0.16.1"         # github.com/awslabs/soci-snapshotter: soci, soci-snapshotter-grpc
NERDCTL_VERSION="2.2.1"       # github.com/containerd/nerdctl/v2
NERDCTL_REVISION="0d1089396f01"  # the commit of that tag, as its Makefile stamps it
GO_BIN_ROOT="${HYPERBOX_GO_BIN:-/var/cache/hyperbox/go-bin}"

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
  debootstrap
  strace
  qemu-system-x86
  udev
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
# virtme-ng (boots a kernel with this machine's files as its root, for the
# tests on other kernels: integration/src/vm.rs) is packaged from trixie
# on; it is Python and pulls nothing else from trixie.
dpkg-query -W -f='${Status}' virtme-ng 2>/dev/null | grep -q "install ok installed" \
  || missing+=("virtme-ng/trixie")
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

# erofs-utils for containerd 2.x's erofs differ, which needs `mkfs.erofs
# --tar` (erofs-utils 1.7+; bookworm has 1.5, bookworm-backports none).
# trixie's binary package needs libc6 2.38, so Debian 13's own source package
# is built here against bookworm (about 40 s, once) and unpacked into a
# directory of its own: the system keeps bookworm's 1.5, and the harness puts
# this directory on the PATH of containerds started with the erofs snapshotter
# (integration/src/containerd.rs carries the same pin).
EROFS_UTILS_VERSION="1.8.6-1"
EROFS_UTILS_DIR="${HYPERBOX_EROFS_UTILS:-/var/cache/hyperbox/erofs-utils-${EROFS_UTILS_VERSION%-*}}"
erofs_version=$("$EROFS_UTILS_DIR/usr/bin/mkfs.erofs" --version 2>/dev/null || true)
if ! grep -qxF "mkfs.erofs (erofs-utils) ${EROFS_UTILS_VERSION%-*}" <<<"$erofs_version"; then
  log "building erofs-utils $EROFS_UTILS_VERSION from Debian 13's source package into $EROFS_UTILS_DIR (once)"
  apt-get install -y -qq --no-install-recommends dpkg-dev debhelper fakeroot libdeflate-dev \
    liblz4-dev liblzma-dev libselinux1-dev libxxhash-dev libzstd-dev pkgconf uuid-dev \
    zlib1g-dev libfuse3-dev >/dev/null
  work=$(mktemp -d /tmp/hyperbox-erofs-utils.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  # A private source list and index, so the system's apt state gains no
  # deb-src entry; downloads into this root-only directory run as root.
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  echo "deb-src http://deb.debian.org/debian trixie main" >"$work/sources.list"
  apt_src=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=-
    -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Sandbox::User=root)
  apt-get "${apt_src[@]}" update -qq
  (cd "$work" && apt-get "${apt_src[@]}" source -qq "erofs-utils=$EROFS_UTILS_VERSION" >/dev/null \
    && cd "erofs-utils-${EROFS_UTILS_VERSION%-*}" \
    && nice dpkg-buildpackage -b -uc -us -j"$(nproc)" >"$work/build.log" 2>&1) \
    || { tail -30 "$work/build.log" >&2 || true; log "building erofs-utils $EROFS_UTILS_VERSION failed"; exit 1; }
  rm -rf "$EROFS_UTILS_DIR.new" && mkdir -p "$EROFS_UTILS_DIR.new"
  dpkg-deb -x "$work/erofs-utils_${EROFS_UTILS_VERSION}_amd64.deb" "$EROFS_UTILS_DIR.new"
  rm -rf "$EROFS_UTILS_DIR" && mv "$EROFS_UTILS_DIR.new" "$EROFS_UTILS_DIR"
  rm -rf "$work"
  trap - EXIT
fi
# (captured first: grep -q closing the pipe early would fail it under pipefail)
erofs_help=$("$EROFS_UTILS_DIR/usr/bin/mkfs.erofs" --help 2>&1 || true)
grep -qF -- '--tar=' <<<"$erofs_help" \
  || { log "$EROFS_UTILS_DIR/usr/bin/mkfs.erofs does not run or has no --tar"; exit 1; }

# The shim's node build (`cargo build-shim`, .cargo/config.toml) is static
# musl; benches/shim.rs measures it and runs under the test suite.
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  log "adding the Rust target x86_64-unknown-linux-musl"
  rustup target add x86_64-unknown-linux-musl \
    || { log "rustup target add x86_64-unknown-linux-musl failed"; exit 1; }
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

# The Rust runc shim of rust-extensions (crate containerd-runc-shim, binary
# containerd-shim-runc-v2-rs), which benches/shim.rs compares hyperbox's
# shim with. 0.2 answers containerd's `start` with task API v3, which only
# containerd 2.x takes (1.7 refuses it: "unsupported shim version (3)"), so
# the 1.7 comparison runs 0.1.1, the newest that 1.7 can start. Each goes
# into its own root, $TOOLS_ROOT/containerd-runc-shim-<version>.
for RUNC_SHIM_RS_VERSION in 0.1.1 0.2.0; do
  rs_root="$TOOLS_ROOT/containerd-runc-shim-$RUNC_SHIM_RS_VERSION"
  if [ ! -x "$rs_root/bin/containerd-shim-runc-v2-rs" ]; then
    log "building containerd-runc-shim $RUNC_SHIM_RS_VERSION into $rs_root (once)"
    cargo install containerd-runc-shim --locked --version "$RUNC_SHIM_RS_VERSION" \
      --root "$rs_root" --target-dir "$TOOLS_ROOT/target" --quiet \
      || { log "cargo install containerd-runc-shim@$RUNC_SHIM_RS_VERSION failed"; exit 1; }
  fi
done

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
# One module and build cache for every Go build here and in the tests.
go_env() {
  env GOPATH=/var/cache/hyperbox/go GOMODCACHE=/var/cache/hyperbox/go/mod \
    GOCACHE=/var/cache/hyperbox/go/cache GOTOOLCHAIN=local "$@"
}
# Fetch the suite's modules into the shared cache once, so test runs need
# no module proxy.
(
  cd "$(dirname "$0")/../integration/containerd-testsuite"
  go_env GOFLAGS=-mod=readonly "$GO_BIN" mod download
) || { log "go mod download for integration/containerd-testsuite failed (containerd v2 modules)"; exit 1; }

# True when every "binary|version-flag" in $2.. runs and prints version $1
# (as a whole version: 2.4.2 is not 2.4.20).
built_at() {
  local want=$1 spec bin flag out
  shift
  for spec in "$@"; do
    bin=${spec%%|*} flag=${spec#*|}
    out=$("$bin" "$flag" 2>/dev/null) || return 1
    grep -qE "(^|[^0-9.])v?${want//./\\.}([^0-9.]|\$)" <<<"$out" || return 1
  done
}
# Builds into a fresh directory and swaps it in whole, so an interrupted or
# failed build never leaves a mix of versions behind. $1: final dir, $2: what
# (module@version, for the error), $3..: the build command, run with $out set
# to the new directory.
build_into() {
  local dir=$1 what=$2
  shift 2
  local out="$dir.new.$$"
  rm -rf "$out" && mkdir -p "$out"
  if ! out="$out" "$@"; then
    rm -rf "$out"
    log "building $what failed (see the go output above)"
    exit 1
  fi
  rm -rf "$dir" && mv "$out" "$dir"
}
# The source directory of module $1 at version $2 in the module cache.
module_dir() {
  local json
  # -json reports a failure in the JSON on stdout, not on stderr.
  json=$(cd / && go_env "$GO_BIN" mod download -json "$1@$2") || { printf '%s\n' "$json" >&2; return 1; }
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json"
}

# containerd 2.x and its runc shim, next to Debian's 1.7: the tests run
# either line (HYPERBOX_CONTAINERD_LINE). btrfs is left out (it needs
# libbtrfs headers; the tests disable the plugin anyway).
ctd2_dir="$GO_BIN_ROOT/containerd-v$CONTAINERD2_VERSION"
if ! built_at "$CONTAINERD2_VERSION" "$ctd2_dir/containerd|--version" \
  "$ctd2_dir/containerd-shim-runc-v2|-v" "$ctd2_dir/ctr|--version"; then
  log "building containerd v$CONTAINERD2_VERSION into $ctd2_dir (once; a few minutes)"
  build_ctd2() {
    local m=github.com/containerd/containerd/v2/cmd
    go_env GOBIN="$out" CGO_ENABLED=1 GOFLAGS=-buildvcs=false nice "$GO_BIN" install -tags no_btrfs \
      "$m/containerd@v$CONTAINERD2_VERSION" "$m/containerd-shim-runc-v2@v$CONTAINERD2_VERSION" \
      "$m/ctr@v$CONTAINERD2_VERSION"
  }
  build_into "$ctd2_dir" "github.com/containerd/containerd/v2@v$CONTAINERD2_VERSION" build_ctd2
fi

# crictl and critest. critest is a compiled Go test (cmd/critest holds only
# _test.go files), so `go install` cannot build it: both are built in the
# module's own directory with its go.sum, stamped with the version as the
# project's Makefile does.
cri_dir="$GO_BIN_ROOT/cri-tools-v$CRI_TOOLS_VERSION"
if ! built_at "$CRI_TOOLS_VERSION" "$cri_dir/crictl|--version" "$cri_dir/critest|-version"; then
  log "building cri-tools v$CRI_TOOLS_VERSION (crictl, critest) into $cri_dir (once)"
  build_cri_tools() {
    local src
    src=$(module_dir sigs.k8s.io/cri-tools "v$CRI_TOOLS_VERSION") && [ -d "$src" ] || return 1
    local ld="-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRI_TOOLS_VERSION"
    (cd "$src" && go_env CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly" \
      nice "$GO_BIN" build -trimpath -ldflags "$ld" -o "$out/crictl" ./cmd/crictl) || return 1
    (cd "$src" && go_env CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly" \
      nice "$GO_BIN" test -c -trimpath -ldflags "$ld" -o "$out/critest" ./cmd/critest)
  }
  build_into "$cri_dir" "sigs.k8s.io/cri-tools@v$CRI_TOOLS_VERSION" build_cri_tools
fi
# The SOCI snapshotter (soci-snapshotter-grpc, the `soci` CLI), a lazy-loading
# peer for the benchmarks (integration/src/soci.rs). Both commands live in the
# nested module github.com/awslabs/soci-snapshotter/cmd, which has no release
# tags of its own (the proxy serves it only as a pseudo-version, pinned here
# to the commit of the v$SOCI_VERSION tag) and reaches the root module through
# `replace => ../`, a path its module zip lacks. So the cmd module is copied
# out of the module cache, its replace swapped for a require of the root
# module at the tag, and built there, stamped as the Makefile does. The zTOC
# code is cgo and links zlib statically (`-l:libz.a`): zlib1g-dev.
SOCI_CMD_MODULE="github.com/awslabs/soci-snapshotter/cmd@v0.0.0-20260930233240-61147fe7c929"
SOCI_REVISION="61147fe7c929"
soci_dir="$GO_BIN_ROOT/soci-snapshotter-v$SOCI_VERSION"
if ! built_at "$SOCI_VERSION" "$soci_dir/soci-snapshotter-grpc|--version" "$soci_dir/soci|--version"; then
  log "building soci-snapshotter v$SOCI_VERSION (soci, soci-snapshotter-grpc) into $soci_dir (once; a few minutes)"
  if ! dpkg-query -W -f='${Status}' zlib1g-dev 2>/dev/null | grep -q "install ok installed"; then
    apt-get install -y -qq --no-install-recommends zlib1g-dev >/dev/null
  fi
  build_soci() {
    local src work rc=0
    src=$(module_dir "${SOCI_CMD_MODULE%@*}" "${SOCI_CMD_MODULE#*@}") && [ -d "$src" ] || return 1
    work=$(mktemp -d) || return 1
    cp -r "$src/." "$work/" && chmod -R u+w "$work" || rc=1
    local m=github.com/awslabs/soci-snapshotter
    local ld="-X $m/version.Version=v$SOCI_VERSION -X $m/version.Revision=$SOCI_REVISION"
    [ "$rc" -ne 0 ] || (cd "$work" \
      && go_env "$GO_BIN" mod edit -dropreplace "$m@v0.0.0" -dropreplace "$m@v0.0.0-local" \
        -require "$m@v$SOCI_VERSION" \
      && go_env CGO_ENABLED=1 GOFLAGS="-buildvcs=false -mod=mod" nice "$GO_BIN" build -trimpath \
        -ldflags "$ld" -o "$out/" ./soci ./soci-snapshotter-grpc) || rc=1
    rm -rf "$work"
    return "$rc"
  }
  build_into "$soci_dir" "$SOCI_CMD_MODULE (soci-snapshotter v$SOCI_VERSION)" build_soci
fi

# nerdctl. Its go.mod requires the in-repository module mod/tigron (a test
# framework) through `replace => ./mod/tigron`, a directory its module zip
# lacks and the proxy does not serve. The nerdctl binary reaches it only
# through cmd/nerdctl/helpers/testing_linux.go (helpers for nerdctl's own
# tests), so the module is copied out of the cache, that file and the
# tigron requirement dropped, and the binary built there with the module's
# go.sum, stamped with the version as its Makefile does.
nerdctl_dir="$GO_BIN_ROOT/nerdctl-v$NERDCTL_VERSION"
if ! built_at "$NERDCTL_VERSION" "$nerdctl_dir/nerdctl|--version"; then
  log "building nerdctl v$NERDCTL_VERSION into $nerdctl_dir (once; a few minutes)"
  build_nerdctl() {
    local src work rc=0 m=github.com/containerd/nerdctl/v2
    src=$(module_dir "$m" "v$NERDCTL_VERSION") && [ -d "$src" ] || return 1
    work=$(mktemp -d) || return 1
    cp -r "$src/." "$work/" && chmod -R u+w "$work" || rc=1
    local ld="-X $m/pkg/version.Version=v$NERDCTL_VERSION -X $m/pkg/version.Revision=$NERDCTL_REVISION"
    [ "$rc" -ne 0 ] || (cd "$work" \
      && rm cmd/nerdctl/helpers/testing_linux.go \
      && go_env "$GO_BIN" mod edit -droprequire "$m/mod/tigron" -dropreplace "$m/mod/tigron@v0.0.0" \
      && go_env CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod" nice "$GO_BIN" build -trimpath \
        -ldflags "$ld" -o "$out/nerdctl" ./cmd/nerdctl) || rc=1
    rm -rf "$work"
    return "$rc"
  }
  build_into "$nerdctl_dir" "github.com/containerd/nerdctl/v2@v$NERDCTL_VERSION" build_nerdctl
fi

# Debian 12's kernels for the guests of integration/src/vm.rs: 6.12 (a pure
# cgroup v2 node; file-backed EROFS without fanotify pre-content events) and
# 6.1 (neither: EROFS on loop devices only). Each is the newest bookworm build,
# unpacked, not installed (the host's boot is untouched): the image goes to
# $KERNELS_DIR/<version>/vmlinuz and the modules to /lib/modules/<version>,
# where the guest, which sees this machine's files, loads them from.
KERNELS_DIR=/var/cache/hyperbox/kernels
# guest_kernel <glob of versions> <package name pattern> <what>
guest_kernel() {
  local glob=$1 pattern=$2 what=$3 have="" k kv
  for k in "$KERNELS_DIR"/$glob/vmlinuz; do
    kv=$(basename "$(dirname "$k")")
    [ -f "$k" ] && [ -f "/lib/modules/$kv/modules.dep" ] && have="$kv"
  done
  if [ -n "$have" ]; then
    # Kept: a newer build in the archive is no reason to download 100 MB.
    log "guest kernel $have present"
    return 0
  fi
  local kpkg kver kwork rc=0
  kpkg=$(apt-cache search --names-only "$pattern" | awk '{print $1}' | sort -V | tail -1)
  if [ -z "$kpkg" ]; then
    log "no $pattern in the apt lists ($what)"
    return 1
  fi
  kver=${kpkg#linux-image-}
  kver=${kver%-unsigned}
  log "unpacking kernel $kver into $KERNELS_DIR/$kver and /lib/modules/$kver"
  kwork=$(mktemp -d /var/tmp/hyperbox-kernel.XXXXXX)
  (
    set -e
    cd "$kwork"
    apt-get download -qq "$kpkg"
    dpkg-deb -x "$kwork"/linux-image-*.deb "$kwork/x"
    mods=""
    for d in lib usr/lib; do
      if [ -d "$kwork/x/$d/modules/$kver" ]; then mods="$kwork/x/$d/modules/$kver"; fi
    done
    [ -n "$mods" ] && [ -f "$kwork/x/boot/vmlinuz-$kver" ] || { log "$kpkg has no vmlinuz-$kver or modules"; exit 1; }
    mkdir -p "$KERNELS_DIR/$kver"
    cp "$kwork/x/boot/vmlinuz-$kver" "$KERNELS_DIR/$kver/vmlinuz"
    rm -rf "/lib/modules/$kver"
    mkdir -p /lib/modules
    cp -a "$mods" "/lib/modules/$kver"
    depmod -a "$kver"
  ) || rc=$?
  rm -rf "$kwork"
  if [ "$rc" -ne 0 ]; then
    rm -rf "${KERNELS_DIR:?}/$kver"
    log "could not unpack $kpkg"
    return 1
  fi
}
guest_kernel '6.12.*' '^linux-image-6\.12\.[0-9.]*\+deb12-amd64-unsigned$' "Debian 12's 6.12 kernel" || exit 1
guest_kernel '6.1.0-*' '^linux-image-6\.1\.0-[0-9]*-amd64-unsigned$' "Debian 12's 6.1 kernel" || exit 1

# Verify what the tests depend on, by running it.
containerd --version | grep -q 'v\?1\.7\.24' || { log "containerd is not 1.7.24: $(containerd --version)"; exit 1; }
built_at "$CONTAINERD2_VERSION" "$ctd2_dir/containerd|--version" "$ctd2_dir/containerd-shim-runc-v2|-v" \
  || { log "containerd $CONTAINERD2_VERSION in $ctd2_dir does not run"; exit 1; }
built_at "$CRI_TOOLS_VERSION" "$cri_dir/crictl|--version" "$cri_dir/critest|-version" \
  || { log "cri-tools $CRI_TOOLS_VERSION in $cri_dir does not run"; exit 1; }
built_at "$SOCI_VERSION" "$soci_dir/soci-snapshotter-grpc|--version" "$soci_dir/soci|--version" \
  || { log "soci-snapshotter $SOCI_VERSION in $soci_dir does not run"; exit 1; }
built_at "$NERDCTL_VERSION" "$nerdctl_dir/nerdctl|--version" \
  || { log "nerdctl $NERDCTL_VERSION in $nerdctl_dir does not run"; exit 1; }
runc --version >/dev/null
docker-registry --version >/dev/null 2>&1 || test -x /usr/bin/docker-registry
test -x /bin/busybox
vng --version >/dev/null
qemu-system-x86_64 --version >/dev/null
log "ok: $(containerd --version | awk '{print $1, $3}'), containerd $("$ctd2_dir/containerd" --version | awk '{print $3}') in $ctd2_dir, $("$cri_dir/crictl" --version 2>/dev/null), $(runc --version | head -1), registry $(dpkg-query -W -f='${Version}' docker-registry)"
