#!/usr/bin/env bash
# Runs the CRI validation suite (critest of cri-tools v1.37.0) against
# vanilla containerd and against containerd with hyperbox as CRI snapshotter
# and the node agent registered, in the same run, each on private sockets
# and directories with critest's images served from a local registry.
# Prints passed/failed/skipped for each and exits non-zero when hyperbox
# fails a spec that vanilla passes (or when a run could not be made).
#
# Usage (as root, after scripts/install-deps.sh):
#   scripts/critest.sh [--line 2|1.7|both] [--focus RE] [--skip RE]
#                      [--parallel N] [--out DIR]
#
#   --line      containerd line(s) to test (default 2)
#   --focus     ginkgo focus regex (default: the whole suite); repeatable
#   --skip      ginkgo skip regex; repeatable
#   --parallel  critest --parallel (default 1: sequential, as in CI)
#   --out       where reports, logs and summaries go (default: a new
#               directory under /tmp); one sub-directory per line
#
# The run is the ignored integration test
# `critest_full_suite_passes_on_hyperbox_as_on_vanilla`
# (integration/tests/critest.rs), so it uses the harness's containerd,
# registry, snapshotter and agent set-up and its teardown.
set -euo pipefail

lines=(2)
focus=()
skip=()
parallel=1
out=""

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
    --line)
        case "${2:-}" in
        both) lines=(1.7 2) ;;
        1.7 | 2) lines=("$2") ;;
        *)
            echo "critest.sh: --line takes 2, 1.7 or both" >&2
            exit 2
            ;;
        esac
        shift 2
        ;;
    --focus)
        focus+=("$2")
        shift 2
        ;;
    --skip)
        skip+=("$2")
        shift 2
        ;;
    --parallel)
        parallel="$2"
        shift 2
        ;;
    --out)
        out="$2"
        shift 2
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "critest.sh: unknown argument $1" >&2
        usage >&2
        exit 2
        ;;
    esac
done

if [[ $EUID -ne 0 ]]; then
    echo "critest.sh: needs root (containerd, mounts, cgroups)" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
go_bin="${HYPERBOX_GO_BIN:-/var/cache/hyperbox/go-bin}"
critest="$go_bin/cri-tools-v1.37.0/critest"
if [[ ! -x "$critest" ]]; then
    echo "critest.sh: $critest not built (sigs.k8s.io/cri-tools v1.37.0; run scripts/install-deps.sh)" >&2
    exit 2
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/hyperbox/cargo-target}"
if [[ -z "$out" ]]; then
    out="$(mktemp -d /tmp/hyperbox-critest.XXXXXX)"
fi
mkdir -p "$out"

join() {
    local IFS='|'
    echo "$*"
}

status=0
for line in "${lines[@]}"; do
    dir="$out/containerd-$line"
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "== critest on containerd $line (reports in $dir)"
    set +e
    HYPERBOX_CONTAINERD_LINE="$line" \
        HYPERBOX_REQUIRE_ALL=1 \
        HYPERBOX_CRITEST_DIR="$dir" \
        HYPERBOX_CRITEST_FOCUS="$(join "${focus[@]+"${focus[@]}"}")" \
        HYPERBOX_CRITEST_SKIP="$(join "${skip[@]+"${skip[@]}"}")" \
        HYPERBOX_CRITEST_PARALLEL="$parallel" \
        cargo test -p hyperbox-integration --test critest -- \
        --ignored --exact critest_full_suite_passes_on_hyperbox_as_on_vanilla \
        --nocapture --test-threads=1 >"$dir/test.log" 2>&1
    rc=$?
    set -e
    if [[ -f "$dir/summary.txt" ]]; then
        grep -E '^CRITEST (vanilla|hyperbox) \(' "$dir/summary.txt"
        if [[ -s "$dir/regressions.txt" ]]; then
            cat "$dir/regressions.txt"
        fi
    fi
    if [[ $rc -ne 0 ]]; then
        echo "critest.sh: containerd $line: FAILED (exit $rc); see $dir/test.log" >&2
        if [[ ! -f "$dir/summary.txt" ]]; then
            tail -n 40 "$dir/test.log" >&2
        fi
        status=1
    else
        echo "critest.sh: containerd $line: hyperbox passes every spec vanilla passes"
    fi
done
exit $status
