#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a fixed time each and prints
# what libFuzzer reached: executions, exec/s, coverage (cov = edges,
# ft = features) and crashes. Not part of CI; the figures go into the
# `fuzz` section of docs/benchmarks.md.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 60 s, every target)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); on the stable
# toolchain RUSTC_BOOTSTRAP=1 lets it pass libFuzzer's sanitizer flags.
# Each target starts from its committed seeds in fuzz/corpus/<target>/ and
# writes what it discovers to a scratch corpus, so the seeds stay small. A
# crashing input is kept in fuzz/artifacts/<target>/; reproduce it with
# `cargo fuzz run <target> <file>` in fuzz/, then turn it into a unit test
# in the crate that owns the parser.
set -euo pipefail

secs=${1:-60}
[[ $secs =~ ^[0-9]+$ ]] || {
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
}
shift || true

root=$(cd "$(dirname "$0")/.." && pwd)
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/hyperbox/cargo-target}
export PATH=/var/cache/hyperbox/tools/bin:$HOME/.cargo/bin:$PATH
command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz not found: cargo install cargo-fuzz --locked" >&2
    exit 1
}

cd "$root/fuzz"
# -O: optimised; fuzz/Cargo.toml keeps debug assertions and overflow checks
# on in hyperbox's own crates.
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cargo fuzz list)
    cargo fuzz build -O >&2
else
    for t in "${targets[@]}"; do
        cargo fuzz build -O "$t" >&2
    done
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/hyperbox-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

rows=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/corpus/$t" "$scratch/tmp" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    log="$scratch/$t.log"
    echo "== $t: ${secs} s" >&2
    set +e
    # TMPDIR: targets that need a file (hosts_toml) write it under here.
    TMPDIR="$scratch/tmp" cargo fuzz run -O "$t" "$scratch/corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
        -timeout=10 >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "artifacts/$t" -type f | wc -l)
    crashes=$((after - before))
    # libFuzzer's last status line: "#N  DONE  cov: C ft: F corp: ... exec/s: E ..."
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    last_line=${done_line:-$(grep -E '^#[0-9]+' "$log" | tail -1 || true)}
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
    [[ -n $execs ]] || execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last_line")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last_line")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last_line")
    rate=$(( ${execs:-0} / (secs > 0 ? secs : 1) ))
    if [[ $rc -ne 0 ]]; then
        failed=1
        echo "$t: libFuzzer exited $rc; log follows" >&2
        tail -40 "$log" >&2
        [[ $crashes -gt 0 ]] || crashes="? (exit $rc)"
    fi
    echo "$last_line" >&2
    rows+=("| \`$t\` | $secs | ${execs:-?} | $rate | ${cov:-?} / ${ft:-?} | $crashes |")
done

echo
echo "| target | seconds | executions | exec/s | coverage (cov / ft) | crashes |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
exit "$failed"
