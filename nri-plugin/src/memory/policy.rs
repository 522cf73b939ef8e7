//! The memory policy's arithmetic, free of I/O so every rule is unit-tested:
//! the headroom for a node pressure, the limit at creation, and the
//! raise/lower/hold decision while a container runs.

use std::time::Duration;

use hyperbox_config::Memory;

/// The limits a decision must stay within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Never below: `memory.floor_bytes`, or the container's request.
    pub floor: u64,
    /// Never above: the limit the user set (`None`: only the node's memory).
    pub ceiling: Option<u64>,
}

impl Bounds {
    /// Bounds from the config floor, the user's request and limit.
    pub fn new(cfg: &Memory, request: Option<u64>, user_limit: Option<u64>) -> Bounds {
        let floor = cfg.floor_bytes.max(request.unwrap_or(0));
        Bounds {
            // A user limit below our floor wins: we never raise past it.
            floor: user_limit.map_or(floor, |l| floor.min(l)),
            ceiling: user_limit,
        }
    }

    /// `v` clamped into the bounds.
    pub fn clamp(&self, v: u64) -> u64 {
        let v = v.max(self.floor);
        self.ceiling.map_or(v, |c| v.min(c))
    }
}

impl From<Bounds> for hyperbox_api::types::Bounds {
    fn from(b: Bounds) -> Self {
        hyperbox_api::types::Bounds {
            floor: b.floor,
            ceiling: b.ceiling,
        }
    }
}

/// Headroom multiplier for node memory pressure `node_some` (avg10, %):
/// `headroom` on a calm node, shrinking linearly to `min_headroom` at
/// `node_pressure_high`, so limits get tighter as memory gets scarce.
pub fn headroom(cfg: &Memory, node_some: f64) -> f64 {
    let t = (node_some / cfg.node_pressure_high).clamp(0.0, 1.0);
    cfg.headroom - (cfg.headroom - cfg.min_headroom) * t
}

/// The working set estimate of a workload from the peaks of its past runs:
/// the 95th percentile (nearest rank), so one outlier run does not inflate
/// every later limit but a regular peak counts.
pub fn p95(peaks: &[u64]) -> Option<u64> {
    if peaks.is_empty() {
        return None;
    }
    let mut v = peaks.to_vec();
    v.sort_unstable();
    let rank = ((v.len() as f64) * 0.95).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// What to do at creation.
#[derive(Debug, Clone, PartialEq)]
pub struct Initial {
    /// The limit to set (`None`: leave the container's own).
    pub limit: Option<u64>,
    /// Why.
    pub reason: String,
}

/// The limit at creation for a workload whose learned working set is
/// `working_set` (`None`: never seen), under node pressure `node_some`.
pub fn initial(
    cfg: &Memory,
    working_set: Option<u64>,
    runs: usize,
    node_some: f64,
    bounds: Bounds,
) -> Initial {
    let Some(ws) = working_set else {
        return Initial {
            limit: None,
            reason: "no history for this workload yet: learning, limit left as requested".into(),
        };
    };
    let h = headroom(cfg, node_some);
    let raw = (ws as f64 * h) as u64;
    let limit = bounds.clamp(raw);
    let mut reason = format!(
        "working set p95 {} over {runs} run(s) × headroom {h:.2} (node memory pressure {node_some:.1}%) = {}",
        bytes(ws),
        bytes(raw)
    );
    if limit != raw {
        reason.push_str(&format!(", clamped to {}", bytes(limit)));
        if Some(limit) == bounds.ceiling {
            reason.push_str(" (the user's limit)");
        } else {
            reason.push_str(" (the floor)");
        }
    }
    Initial {
        limit: Some(limit),
        reason,
    }
}

/// A running container's state, as the controller sees it.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// Current hard limit (`None`: unlimited).
    pub limit: Option<u64>,
    /// Current working set.
    pub working_set: u64,
    /// The largest working set in the recent sample history: lowering
    /// aims above this, so a calm moment between peaks does not shrink a
    /// container below what it regularly needs.
    pub recent_peak: u64,
    /// The container's own memory stall, `some avg10` %.
    pub stall: f64,
    /// A PSI trigger fired since the last decision.
    pub triggered: bool,
    /// Time since the agent last set this container's limit upwards or at
    /// creation (a fresh size is trusted for `cooldown_secs`).
    pub since_change: Option<Duration>,
    /// Samples seen so far (lowering waits for a few).
    pub samples: usize,
}

/// The controller's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Raise to `to`.
    Raise {
        /// New limit.
        to: u64,
        /// Why.
        reason: String,
    },
    /// Lower to `to`.
    Lower {
        /// New limit.
        to: u64,
        /// Why.
        reason: String,
    },
    /// Change nothing.
    Hold,
}

/// Samples needed before a limit is lowered.
const MIN_SAMPLES_TO_LOWER: usize = 3;

/// Raise when the container stalls on memory, lower when it is calm and
/// well under its limit, within `bounds`.
pub fn adjust(
    cfg: &Memory,
    now: Running,
    node_some: f64,
    node_total: u64,
    bounds: Bounds,
) -> Action {
    let current = now.limit.unwrap_or(node_total);
    if now.stall > cfg.stall_target || now.triggered {
        let step = (current as f64 * (1.0 + cfg.raise_step)) as u64;
        let to = bounds.clamp(step.max(current + 1));
        if to <= current || now.limit.is_none() {
            return Action::Hold;
        }
        let why = if now.stall > cfg.stall_target {
            format!(
                "memory stall {:.1}% > target {:.1}%",
                now.stall, cfg.stall_target
            )
        } else {
            "PSI trigger fired (stall within the trigger window)".to_string()
        };
        return Action::Raise {
            to,
            reason: format!("{why}: +{:.0}%", cfg.raise_step * 100.0),
        };
    }
    let cooled = now
        .since_change
        .is_none_or(|d| d >= Duration::from_secs(cfg.cooldown_secs));
    if !cooled || now.samples < MIN_SAMPLES_TO_LOWER || now.stall > cfg.stall_target / 4.0 {
        return Action::Hold;
    }
    let h = headroom(cfg, node_some);
    let base = now.working_set.max(now.recent_peak);
    let want = bounds.clamp((base as f64 * h) as u64);
    if (want as f64) < current as f64 * (1.0 - cfg.lower_min_change) {
        Action::Lower {
            to: want,
            reason: format!(
                "calm (stall {:.1}%): recent peak working set {} × headroom {h:.2}",
                now.stall,
                bytes(base)
            ),
        }
    } else {
        Action::Hold
    }
}

/// Bytes for people: `123.4 MiB`.
pub fn bytes(v: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut f = v as f64;
    let mut u = 0;
    while f >= 1024.0 && u < UNITS.len() - 1 {
        f /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v} B")
    } else {
        format!("{f:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn cfg() -> Memory {
        Memory::default()
    }

    #[test]
    fn headroom_shrinks_with_node_pressure() {
        let c = cfg();
        assert_eq!(headroom(&c, 0.0), c.headroom);
        assert_eq!(headroom(&c, c.node_pressure_high * 3.0), c.min_headroom);
        let mid = headroom(&c, c.node_pressure_high / 2.0);
        assert!((mid - (c.headroom + c.min_headroom) / 2.0).abs() < 1e-9);
    }

    #[test]
    fn p95_ignores_one_outlier_among_many() {
        assert_eq!(p95(&[]), None);
        assert_eq!(p95(&[7]), Some(7));
        let mut runs = vec![100; 39];
        runs.push(10_000);
        assert_eq!(p95(&runs), Some(100));
        let runs: Vec<u64> = (1..=20).collect();
        assert_eq!(p95(&runs), Some(19));
    }

    #[test]
    fn initial_limit_is_working_set_times_headroom_within_bounds() {
        let c = cfg();
        let b = Bounds::new(&c, None, None);
        let i = initial(&c, Some(100 * MIB), 3, 0.0, b);
        assert_eq!(i.limit, Some(150 * MIB));
        assert!(i.reason.contains("headroom 1.50"), "{}", i.reason);
        // Under node pressure the limit is tighter.
        let i = initial(&c, Some(100 * MIB), 3, 50.0, b);
        assert_eq!(i.limit, Some((100.0 * MIB as f64 * c.min_headroom) as u64));
        // Never above the user's limit, never below the floor or request.
        let b = Bounds::new(&c, None, Some(120 * MIB));
        let i = initial(&c, Some(100 * MIB), 3, 0.0, b);
        assert_eq!(i.limit, Some(120 * MIB));
        assert!(i.reason.contains("user's limit"), "{}", i.reason);
        let b = Bounds::new(&c, Some(64 * MIB), None);
        assert_eq!(initial(&c, Some(MIB), 1, 0.0, b).limit, Some(64 * MIB));
        // No history: nothing set.
        assert_eq!(initial(&c, None, 0, 0.0, b).limit, None);
    }

    #[test]
    fn a_user_limit_below_the_floor_is_respected() {
        let b = Bounds::new(&cfg(), None, Some(8 * MIB));
        assert_eq!(b.clamp(100 * MIB), 8 * MIB);
        assert_eq!(b.clamp(MIB), 8 * MIB);
    }

    fn running(limit: u64, ws: u64, stall: f64) -> Running {
        Running {
            limit: Some(limit),
            working_set: ws,
            recent_peak: ws,
            stall,
            triggered: false,
            since_change: None,
            samples: 10,
        }
    }

    #[test]
    fn stalls_raise_within_the_ceiling() {
        let c = cfg();
        let b = Bounds::new(&c, None, Some(200 * MIB));
        match adjust(&c, running(100 * MIB, 99 * MIB, 30.0), 0.0, 0, b) {
            Action::Raise { to, reason } => {
                assert_eq!(to, 125 * MIB);
                assert!(reason.contains("30.0%"), "{reason}");
            }
            a => panic!("{a:?}"),
        }
        // At the ceiling there is nothing to raise.
        assert_eq!(
            adjust(&c, running(200 * MIB, 199 * MIB, 30.0), 0.0, 0, b),
            Action::Hold
        );
        let mut r = running(100 * MIB, 10 * MIB, 0.0);
        r.triggered = true;
        assert!(matches!(adjust(&c, r, 0.0, 0, b), Action::Raise { .. }));
    }

    #[test]
    fn calm_containers_are_lowered_after_cooldown_with_hysteresis() {
        let c = cfg();
        let b = Bounds::new(&c, None, None);
        assert_eq!(
            adjust(&c, running(400 * MIB, 100 * MIB, 0.0), 0.0, 0, b),
            Action::Lower {
                to: 150 * MIB,
                reason: "calm (stall 0.0%): recent peak working set 100.0 MiB × headroom 1.50"
                    .into()
            }
        );
        // Within 10 % of the target: hold.
        assert_eq!(
            adjust(&c, running(160 * MIB, 100 * MIB, 0.0), 0.0, 0, b),
            Action::Hold
        );
        // Right after a raise or the creation-time size: hold.
        let mut r = running(400 * MIB, 100 * MIB, 0.0);
        r.since_change = Some(Duration::from_secs(1));
        assert_eq!(adjust(&c, r, 0.0, 0, b), Action::Hold);
        // A calm moment between peaks: aim above the recent peak.
        let mut r = running(400 * MIB, 10 * MIB, 0.0);
        r.recent_peak = 200 * MIB;
        assert!(matches!(
            adjust(&c, r, 0.0, 0, b),
            Action::Lower { to, .. } if to == 300 * MIB
        ));
        // Too few samples: hold.
        let mut r = running(400 * MIB, 100 * MIB, 0.0);
        r.samples = 1;
        assert_eq!(adjust(&c, r, 0.0, 0, b), Action::Hold);
        // Unlimited containers are sized once calm.
        let mut r = running(0, 100 * MIB, 0.0);
        r.limit = None;
        assert!(matches!(
            adjust(&c, r, 0.0, 8 << 30, b),
            Action::Lower { to, .. } if to == 150 * MIB
        ));
    }
}
