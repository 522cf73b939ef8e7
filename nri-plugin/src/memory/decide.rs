//! What the controller changes, decided from a snapshot of the state and
//! nothing else: no clock, no cgroup, no NRI, so every rule is a unit
//! test. [`crate::memory::apply`] carries the changes out.

use std::time::Duration;

use hyperbox_api::types::{Action, Decision, Route, Sample, Source};
use hyperbox_config::{Memory, MemoryPolicy};

use crate::memory::policy::{self, Bounds, Running};

/// One container as the controller sees it at a tick.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Container id.
    pub id: String,
    /// Its memory policy.
    pub policy: MemoryPolicy,
    /// Its workload runs.
    pub started: bool,
    /// How it reached the agent.
    pub source: Source,
    /// Floor and ceiling.
    pub bounds: Bounds,
    /// The limit in force.
    pub limit: Option<u64>,
    /// The newest sample.
    pub last: Option<Sample>,
    /// The largest working set in its sample history.
    pub recent_peak: u64,
    /// A PSI trigger fired since the last tick.
    pub triggered: bool,
    /// Time since the last raise or the creation-time size.
    pub since_change: Option<Duration>,
    /// Samples taken.
    pub samples: usize,
}

/// What holds for every container at a tick.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    /// The memory knobs.
    pub cfg: &'a Memory,
    /// The node's memory `some avg10`, %.
    pub memory_some: f64,
    /// The node's memory, bytes (the ceiling of an unlimited container).
    pub mem_total: u64,
    /// A runtime is connected over NRI.
    pub nri_connected: bool,
}

/// A limit to change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Container id.
    pub id: String,
    /// [`Action::Raise`] or [`Action::Lower`].
    pub action: Action,
    /// The limit in force.
    pub from: Option<u64>,
    /// The new limit.
    pub to: u64,
    /// Why, for people.
    pub reason: String,
    /// How to apply it first.
    pub route: Route,
}

impl Change {
    /// The decision to record once it was applied by `via` (`None`:
    /// it could not be, because of `failure`).
    pub fn decision(&self, at: u64, via: Result<Route, (Route, String)>) -> Decision {
        match via {
            Ok(via) => Decision {
                at,
                action: self.action,
                from: self.from,
                to: Some(self.to),
                reason: self.reason.clone(),
                via,
            },
            Err((tried, failure)) => Decision {
                at,
                action: self.action.failed(),
                from: self.from,
                to: Some(self.to),
                reason: format!("{} — not applied: {failure}", self.reason),
                via: tried,
            },
        }
    }
}

/// The changes for this tick: adaptive, running containers with a sample
/// are raised when they stall and lowered when calm, as
/// [`policy::adjust`] rules. Changes for CRI containers go through NRI
/// while a runtime is connected, the others to the cgroup.
pub fn decide(node: &Node<'_>, containers: &[Candidate]) -> Vec<Change> {
    containers
        .iter()
        .filter(|c| c.policy == MemoryPolicy::Adaptive && c.started)
        .filter_map(|c| {
            let s = c.last?;
            let now = Running {
                limit: c.limit,
                working_set: s.usage,
                recent_peak: c.recent_peak,
                stall: s.memory_some,
                triggered: c.triggered,
                since_change: c.since_change,
                samples: c.samples,
            };
            let (action, to, reason) =
                match policy::adjust(node.cfg, now, node.memory_some, node.mem_total, c.bounds) {
                    policy::Action::Hold => return None,
                    policy::Action::Raise { to, reason } => (Action::Raise, to, reason),
                    policy::Action::Lower { to, reason } => (Action::Lower, to, reason),
                };
            let route = if c.source == Source::Nri && node.nri_connected {
                Route::NriUpdate
            } else {
                Route::Cgroup
            };
            Some(Change {
                id: c.id.clone(),
                action,
                from: c.limit,
                to,
                reason,
                route,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn running(id: &str, limit: u64, working_set: u64, stall: f64) -> Candidate {
        Candidate {
            id: id.into(),
            policy: MemoryPolicy::Adaptive,
            started: true,
            source: Source::Nri,
            bounds: Bounds {
                floor: 16 * MIB,
                ceiling: Some(1024 * MIB),
            },
            limit: Some(limit),
            last: Some(Sample {
                at: 1,
                memory_some: stall,
                memory_full: 0.0,
                usage: working_set,
            }),
            recent_peak: working_set,
            triggered: false,
            since_change: None,
            samples: 10,
        }
    }

    fn node(cfg: &Memory) -> Node<'_> {
        Node {
            cfg,
            memory_some: 0.0,
            mem_total: 8 << 30,
            nri_connected: true,
        }
    }

    #[test]
    fn a_stalling_container_is_raised_through_nri() {
        let cfg = Memory::default();
        let changes = decide(&node(&cfg), &[running("a", 100 * MIB, 99 * MIB, 30.0)]);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let c = &changes[0];
        assert_eq!((c.action, c.route), (Action::Raise, Route::NriUpdate));
        assert_eq!((c.from, c.to), (Some(100 * MIB), 125 * MIB));
        assert!(c.reason.contains("30.0%"), "{}", c.reason);
    }

    #[test]
    fn a_fired_trigger_raises_without_a_high_average() {
        let cfg = Memory::default();
        let mut c = running("a", 100 * MIB, 50 * MIB, 0.0);
        c.triggered = true;
        c.since_change = Some(Duration::ZERO);
        let changes = decide(&node(&cfg), &[c]);
        assert_eq!(changes[0].action, Action::Raise);
        assert!(changes[0].reason.contains("trigger"), "{:?}", changes[0]);
    }

    #[test]
    fn a_calm_container_is_lowered_after_the_cooldown_only() {
        let cfg = Memory::default();
        let mut c = running("a", 400 * MIB, 100 * MIB, 0.0);
        c.since_change = Some(Duration::from_secs(cfg.cooldown_secs));
        let changes = decide(&node(&cfg), std::slice::from_ref(&c));
        assert_eq!(changes[0].action, Action::Lower);
        assert_eq!(changes[0].to, 150 * MIB);
        c.since_change = Some(Duration::from_secs(cfg.cooldown_secs.saturating_sub(1)));
        assert!(decide(&node(&cfg), &[c]).is_empty());
    }

    #[test]
    fn lowering_never_goes_below_the_floor_or_request() {
        let cfg = Memory::default();
        let mut c = running("a", 400 * MIB, MIB, 0.0);
        c.bounds = Bounds::new(&cfg, Some(256 * MIB), None);
        let changes = decide(&node(&cfg), std::slice::from_ref(&c));
        assert_eq!(changes[0].to, 256 * MIB, "{changes:?}");
        // Already at the request: nothing to lower.
        c.limit = Some(256 * MIB);
        assert!(decide(&node(&cfg), &[c]).is_empty());
    }

    #[test]
    fn raising_never_goes_above_the_users_limit() {
        let cfg = Memory::default();
        let mut c = running("a", 100 * MIB, 99 * MIB, 30.0);
        c.bounds = Bounds::new(&cfg, None, Some(110 * MIB));
        assert_eq!(
            decide(&node(&cfg), std::slice::from_ref(&c))[0].to,
            110 * MIB
        );
        c.limit = Some(110 * MIB);
        assert!(decide(&node(&cfg), &[c]).is_empty());
    }

    #[test]
    fn only_running_adaptive_containers_with_a_sample_change() {
        let cfg = Memory::default();
        let mut observe = running("observe", 100 * MIB, 99 * MIB, 30.0);
        observe.policy = MemoryPolicy::Observe;
        let mut stopped = running("stopped", 100 * MIB, 99 * MIB, 30.0);
        stopped.started = false;
        let mut unsampled = running("unsampled", 100 * MIB, 99 * MIB, 30.0);
        unsampled.last = None;
        let changes = decide(
            &node(&cfg),
            &[
                observe,
                stopped,
                unsampled,
                running("go", 100 * MIB, 99 * MIB, 30.0),
            ],
        );
        let ids: Vec<&str> = changes.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["go"]);
    }

    #[test]
    fn without_nri_changes_go_to_the_cgroup() {
        let cfg = Memory::default();
        let mut n = node(&cfg);
        n.nri_connected = false;
        let changes = decide(&n, &[running("a", 100 * MIB, 99 * MIB, 30.0)]);
        assert_eq!(changes[0].route, Route::Cgroup);
        let mut local = running("b", 100 * MIB, 99 * MIB, 30.0);
        local.source = Source::Local;
        assert_eq!(decide(&node(&cfg), &[local])[0].route, Route::Cgroup);
    }

    #[test]
    fn a_failed_change_is_recorded_as_failed_with_its_reason() {
        let cfg = Memory::default();
        let c = &decide(&node(&cfg), &[running("a", 100 * MIB, 99 * MIB, 30.0)])[0];
        let d = c.decision(7, Err((Route::Cgroup, "cgroup write: EACCES".into())));
        assert_eq!(d.action, Action::RaiseFailed);
        assert_eq!(d.via, Route::Cgroup);
        assert!(
            d.reason.ends_with("not applied: cgroup write: EACCES"),
            "{}",
            d.reason
        );
        let ok = c.decision(7, Ok(Route::NriUpdate));
        assert_eq!(
            (ok.action, ok.via, ok.to),
            (Action::Raise, Route::NriUpdate, Some(125 * MIB))
        );
    }
}
