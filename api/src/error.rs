//! Printing an error with its sources, once each.
//!
//! containerd shows users only the message of a gRPC status, and a log line
//! should carry the whole story, so errors are printed as
//! `action: cause: cause`. Error types in hyperbox follow the rule that a
//! message never repeats its source; a source that does (third-party
//! errors sometimes embed theirs) is skipped instead of printed twice.

use std::fmt;

/// Displays an error and its sources on one line, `a: b: c`.
///
/// ```
/// let e = std::io::Error::other("disk full");
/// assert_eq!(hyperbox_api::ErrorChain(&e).to_string(), "disk full");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'a));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut printed = self.0.to_string();
        f.write_str(&printed)?;
        let mut cur = self.0.source();
        while let Some(c) = cur {
            let m = c.to_string();
            if !printed.contains(&m) {
                write!(f, ": {m}")?;
                printed.push_str(&m);
            }
            cur = c.source();
        }
        Ok(())
    }
}

/// [`ErrorChain`] as a `String`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    ErrorChain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("open the store at /var/lib/x")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("fetch layer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn each_source_is_printed_once_in_order() {
        let e = Outer(std::io::Error::other("permission denied"));
        assert_eq!(
            error_chain(&e),
            "open the store at /var/lib/x: permission denied"
        );
        // A message that already embeds its source does not print it again.
        let e = Repeats(std::io::Error::other("timed out"));
        assert_eq!(error_chain(&e), "fetch layer: timed out");
    }
}
