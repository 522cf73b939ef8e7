//! A fixed-size rolling history of samples (one per sampling interval), so
//! `hb psi` and the metrics can show a trend without the agent's memory
//! growing with uptime.

use std::collections::VecDeque;

pub use hyperbox_api::types::Sample;

/// The last `capacity` samples, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
}

impl History {
    /// An empty history keeping `capacity` samples.
    pub fn new(capacity: usize) -> History {
        History {
            samples: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
        }
    }

    /// Adds a sample, dropping the oldest when full.
    pub fn push(&mut self, s: Sample) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// The newest sample.
    pub fn last(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// All samples, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// The largest usage in the history.
    pub fn peak_usage(&self) -> u64 {
        self.samples.iter().map(|s| s.usage).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_capacity_samples() {
        let mut h = History::new(3);
        for i in 0..5u64 {
            h.push(Sample {
                at: i,
                usage: 10 * i,
                ..Default::default()
            });
        }
        let at: Vec<u64> = h.iter().map(|s| s.at).collect();
        assert_eq!(at, vec![2, 3, 4]);
        assert_eq!(h.last().unwrap().usage, 40);
        assert_eq!(h.peak_usage(), 40);
    }
}
