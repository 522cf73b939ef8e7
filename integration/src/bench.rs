//! Helpers for the benchmarks in `integration/benches/`: percentiles and
//! writing a section of `docs/benchmarks.md` that each run replaces.

use std::path::PathBuf;
use std::time::Duration;

/// The link the pull benchmarks shape the harness proxy to: 100 Mbit/s
/// with 20 ms per request, a node pulling from a registry in its region.
pub const LINK: crate::proxy::Shaping = crate::proxy::Shaping {
    latency: Duration::from_millis(20),
    bits_per_sec: Some(100_000_000),
};

/// True when run by `cargo bench` (which passes `--bench`); under
/// `cargo test` a benchmark runs a one-iteration smoke instead.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The `p`-th percentile (0–100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Replaces the section `name` of docs/benchmarks.md (between
/// `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`), appending it if absent.
pub fn write_section(name: &str, body: &str) -> std::io::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    let (start, end) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let section = format!("{start}\n{}\n{end}", body.trim_end());
    let new = match (doc.find(&start), doc.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &doc[..a], section, &doc[b + end.len()..]),
        _ => format!("{}\n{}\n", doc.trim_end(), section),
    };
    std::fs::write(&path, new)?;
    Ok(path)
}

/// Resident memory of process `pid` (`VmRSS`), bytes; 0 when gone.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One line describing the machine, for the record.
pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0);
    format!(
        "{cpus} CPUs, {} GiB RAM, kernel {}",
        mem_kb / (1 << 20),
        kernel.trim()
    )
}

/// The median of `ratios` with a distribution-free 95 % confidence
/// interval: the order statistics whose rank a binomial(n, ½) count
/// excludes with at most 2.5 % on each side. On a machine whose run times
/// wander by ±15 % between runs, pairing runs back to back and reading the
/// median of their ratios is what makes a difference of a few per cent
/// visible; the interval says how sure that figure is. With fewer than 6
/// ratios no 95 % interval exists and the extremes are given.
pub fn median_with_ci(ratios: &[f64]) -> (f64, f64, f64) {
    assert!(!ratios.is_empty(), "no samples");
    let mut s = ratios.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    // P(X <= k) for X ~ binomial(n, 1/2), summed in floats (n is small).
    let mut coef = 1.0f64;
    let mut cdf = 0.0f64;
    let half_n = 0.5f64.powi(n as i32);
    let mut k = 0usize;
    loop {
        let next = cdf + coef * half_n;
        if next > 0.025 || k >= n / 2 {
            break;
        }
        cdf = next;
        coef = coef * (n - k) as f64 / (k + 1) as f64;
        k += 1;
    }
    // k values (0..k) have tail mass <= 2.5 %: the interval is the k-th
    // smallest to the k-th largest (1-based), or the extremes when k = 0.
    let lo = s[k.saturating_sub(1)];
    let hi = s[n - k.max(1)];
    (median, lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(100));
        assert_eq!(
            percentile(&[Duration::from_millis(7)], 99.0),
            Duration::from_millis(7)
        );
    }

    #[test]
    fn median_interval_uses_binomial_ranks() {
        // n = 21: P(X <= 5) = 1.33 %, P(X <= 6) = 3.9 %, so the interval is
        // the 6th smallest to the 6th largest.
        let r: Vec<f64> = (1..=21).map(f64::from).collect();
        assert_eq!(median_with_ci(&r), (11.0, 6.0, 16.0));
        // n = 6: P(X = 0) = 1.6 %: the extremes.
        let r: Vec<f64> = [3.0, 1.0, 2.0, 6.0, 5.0, 4.0].to_vec();
        assert_eq!(median_with_ci(&r), (3.5, 1.0, 6.0));
        // Too few for any interval: still the extremes, never a panic.
        assert_eq!(median_with_ci(&[2.0, 1.0]), (1.5, 1.0, 2.0));
    }
}
