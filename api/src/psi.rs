//! Pressure stall information as the kernel writes it (`/proc/pressure/*`,
//! a cgroup's `*.pressure`), parsed into [`crate::types::Pressure`]: the
//! agent samples it for memory policy and `hb psi`, the snapshotter reads
//! the node's I/O pressure to hold back background fills.

use crate::types::{Pressure, PsiLine as Line};

/// Errors of parsing a PSI file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    /// A line is not `some|full avg10=.. avg60=.. avg300=.. total=..`.
    #[error("PSI line {line:?}: {problem}")]
    Line {
        /// The offending line (at most 80 bytes of it).
        line: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// No `some` line.
    #[error("PSI text has no \"some\" line")]
    NoSome,
}

/// Parses the text of `/proc/pressure/*` or a cgroup's `*.pressure`.
pub fn parse(text: &str) -> Result<Pressure, ParseError> {
    let mut some = None;
    let mut full = None;
    for raw in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = |problem| ParseError::Line {
            line: raw.chars().take(80).collect(),
            problem,
        };
        let mut words = raw.split_ascii_whitespace();
        let kind = words.next().ok_or(bad("empty"))?;
        let mut line = Line::default();
        let mut seen = 0u8;
        for w in words {
            let (k, v) = w.split_once('=').ok_or(bad("field without '='"))?;
            let f = |v: &str| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or(bad("average is not a number"))
            };
            match k {
                "avg10" => (line.avg10, seen) = (f(v)?, seen | 1),
                "avg60" => (line.avg60, seen) = (f(v)?, seen | 2),
                "avg300" => (line.avg300, seen) = (f(v)?, seen | 4),
                "total" => {
                    line.total_us = v.parse().map_err(|_| bad("total is not an integer"))?;
                    seen |= 8;
                }
                _ => {}
            }
        }
        if seen != 15 {
            return Err(bad("missing avg10, avg60, avg300 or total"));
        }
        match kind {
            "some" => some = Some(line),
            "full" => full = Some(line),
            _ => return Err(bad("neither \"some\" nor \"full\"")),
        }
    }
    Ok(Pressure {
        some: some.ok_or(ParseError::NoSome)?,
        full,
    })
}

/// Reads and parses a PSI file.
pub fn read(path: &std::path::Path) -> std::io::Result<Pressure> {
    let text = std::fs::read_to_string(path)?;
    parse(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let p = parse(
            "some avg10=1.50 avg60=0.20 avg300=0.00 total=12345\n\
             full avg10=0.75 avg60=0.10 avg300=0.00 total=678\n",
        )
        .unwrap();
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.total_us, 12345);
        assert_eq!(p.full.unwrap().avg10, 0.75);
        // cpu.pressure on older kernels: some only.
        let p = parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").unwrap();
        assert!(p.full.is_none());
    }

    #[test]
    fn malformed_text_is_an_error_naming_the_line() {
        for bad in [
            "",
            "some avg10=x avg60=0 avg300=0 total=0",
            "some avg10=1 avg60=0 avg300=0",
            "most avg10=1 avg60=0 avg300=0 total=0",
            "some avg10=-1 avg60=0 avg300=0 total=0",
            "some avg10=NaN avg60=0 avg300=0 total=0",
            "some avg10=1 avg60=0 avg300=0 total=-5",
            "full avg10=1 avg60=0 avg300=0 total=5",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = parse("some avg10 avg60=0").unwrap_err().to_string();
        assert!(e.contains("some avg10"), "{e}");
    }

    #[test]
    fn random_text_never_panics() {
        let alphabet = b"somefulavg10=.3 \n-total";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut parsed = 0;
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(seed % 90) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push(alphabet[(seed % alphabet.len() as u64) as usize] as char);
            }
            parsed += usize::from(parse(&s).is_ok());
        }
        // Random soup is almost never a valid PSI file.
        assert!(parsed < 50, "{parsed} random strings parsed");
    }

    #[test]
    fn this_kernel_reports_node_pressure() {
        // Every machine we run on has PSI (DESIGN §6); the real files parse.
        if !std::path::Path::new("/proc/pressure").exists()
            && std::env::var_os("HYPERBOX_REQUIRE_ALL").is_none()
        {
            eprintln!("skipped: this kernel has no PSI (/proc/pressure)");
            return;
        }
        for r in ["memory", "cpu", "io"] {
            let p = read(std::path::Path::new(&format!("/proc/pressure/{r}")));
            assert!(p.is_ok(), "/proc/pressure/{r}: {p:?}");
        }
    }
}
