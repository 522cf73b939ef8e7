//! The PSI parser (`nri-plugin/src/psi`): arbitrary text as a
//! `/proc/pressure/*` or cgroup `*.pressure` file. What it accepts must be
//! finite, non-negative averages.

#![no_main]

use hyperbox_nri::psi;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = psi::parse(text) else {
        return;
    };
    for line in std::iter::once(&p.some).chain(p.full.as_ref()) {
        for avg in [line.avg10, line.avg60, line.avg300] {
            assert!(avg.is_finite() && avg >= 0.0, "average {avg}");
        }
    }
});
