//! The seccomp decision at a container's creation, as a pure function of
//! its mode, how its spec profile was chosen, what was learned of its
//! workload and the node's `[seccomp]` config.
//!
//! Every doubt resolves to the runtime's own profile staying in place:
//! nothing learned yet, too little learned, a profile the user chose, an
//! Unconfined container nobody asked hyperbox to confine.

use hyperbox_config::{Seccomp, SeccompMode};

use super::profile::SpecKind;
use super::store::Profile;

/// Where a container's mode came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeFrom {
    /// `seccomp.hyperbox.dev/mode` on the container or its pod.
    Annotation,
    /// `hb profile set-mode` on its workload.
    Override,
    /// `seccomp.default_mode`.
    Default,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The mode in force for this run (`learn`, `complain`, `enforce`, or
    /// `off`).
    pub mode: SeccompMode,
    /// Install the learned profile (in `mode`, complain or enforce).
    pub install: bool,
    /// Count the run's syscalls into the workload's profile.
    pub learn: bool,
    /// `auto` reached its threshold with this run: mark it enforcing.
    pub switch: bool,
    /// Why, for people.
    pub reason: String,
}

/// Decides for a container whose mode is `mode` (from `from`), whose spec
/// profile is of `kind`, whose workload learned `profile`.
pub fn decide(
    cfg: &Seccomp,
    mode: SeccompMode,
    from: ModeFrom,
    kind: SpecKind,
    profile: Option<&Profile>,
    now: u64,
) -> Outcome {
    let learn = |reason: String| Outcome {
        mode: SeccompMode::Learn,
        install: false,
        learn: true,
        switch: false,
        reason,
    };
    let install = |mode, switch, reason| Outcome {
        mode,
        install: true,
        learn: false,
        switch,
        reason,
    };
    if mode == SeccompMode::Off {
        return Outcome {
            mode,
            install: false,
            learn: false,
            switch: false,
            reason: "seccomp mode off".into(),
        };
    }
    if mode == SeccompMode::Learn {
        return learn(format!(
            "learn: the {} profile stays; syscalls are recorded",
            kind.as_str()
        ));
    }
    let users_own = match kind {
        SpecKind::RuntimeDefault => false,
        SpecKind::Localhost => true,
        // Unconfined may be the user's choice; a mode asked for on the
        // container or its workload says it is not.
        SpecKind::Unconfined => from == ModeFrom::Default,
    };
    if users_own && !cfg.override_user_profiles {
        return learn(format!(
            "{} profile left alone (seccomp.override_user_profiles = false); learning only",
            kind.as_str()
        ));
    }
    let learned = profile.map_or(0, Profile::len);
    if learned < cfg.min_syscalls as usize {
        return learn(format!(
            "{}: {learned} syscall(s) learned, fewer than seccomp.min_syscalls ({}); learning with the {} profile",
            mode.as_str(),
            cfg.min_syscalls,
            kind.as_str()
        ));
    }
    let Some(p) = profile else {
        return learn("nothing learned yet".into());
    };
    match mode {
        SeccompMode::Complain | SeccompMode::Enforce => install(
            mode,
            false,
            format!(
                "{}: learned profile of {learned} syscall(s) from {} run(s)",
                mode.as_str(),
                p.runs
            ),
        ),
        SeccompMode::Auto => {
            if let Some(since) = p.enforcing_since {
                return install(
                    SeccompMode::Enforce,
                    false,
                    format!("auto: enforcing since {since} ({learned} syscalls)"),
                );
            }
            let learned_for = now.saturating_sub(p.first_learned);
            let stable = p.stable_runs >= cfg.auto_stable_runs;
            let long = learned_for >= cfg.auto_min_learn_secs;
            if stable && long {
                install(
                    SeccompMode::Enforce,
                    true,
                    format!(
                        "auto: stable for {} run(s) over {learned_for} s; enforcing {learned} syscalls from now on",
                        p.stable_runs
                    ),
                )
            } else {
                learn(format!(
                    "auto: learning ({}/{} stable runs, learned for {learned_for}/{} s)",
                    p.stable_runs, cfg.auto_stable_runs, cfg.auto_min_learn_secs
                ))
            }
        }
        SeccompMode::Off | SeccompMode::Learn => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(n: usize, runs: u32, stable: u32, first: u64) -> Profile {
        Profile {
            syscalls: (0..n).map(|i| format!("s{i}")).collect(),
            runs,
            stable_runs: stable,
            first_learned: first,
            ..Profile::default()
        }
    }

    fn cfg() -> Seccomp {
        Seccomp {
            auto_stable_runs: 3,
            auto_min_learn_secs: 100,
            ..Seccomp::default()
        }
    }

    #[test]
    fn auto_learns_until_stable_for_enough_runs_and_time_then_enforces() {
        let c = cfg();
        let d = |p: &Profile, now| {
            decide(
                &c,
                SeccompMode::Auto,
                ModeFrom::Annotation,
                SpecKind::RuntimeDefault,
                Some(p),
                now,
            )
        };
        let young = profile(40, 5, 5, 1000);
        assert_eq!(d(&young, 1050).mode, SeccompMode::Learn, "too soon");
        let unstable = profile(40, 5, 2, 1000);
        assert_eq!(d(&unstable, 5000).mode, SeccompMode::Learn, "still growing");
        let ready = d(&profile(40, 5, 3, 1000), 1100);
        assert!(ready.install && ready.switch && ready.mode == SeccompMode::Enforce);
        let mut on = profile(40, 5, 0, 1000);
        on.enforcing_since = Some(1100);
        let kept = d(&on, 1200);
        assert!(kept.install && !kept.switch && !kept.learn, "{kept:?}");
    }

    #[test]
    fn doubt_keeps_the_runtime_profile() {
        let c = cfg();
        let p = profile(40, 5, 5, 0);
        // Nothing (or too little) learned: enforce learns first.
        let none = decide(
            &c,
            SeccompMode::Enforce,
            ModeFrom::Annotation,
            SpecKind::RuntimeDefault,
            None,
            0,
        );
        assert!(!none.install && none.learn);
        let tiny = profile(2, 1, 0, 0);
        assert!(
            !decide(
                &c,
                SeccompMode::Enforce,
                ModeFrom::Annotation,
                SpecKind::RuntimeDefault,
                Some(&tiny),
                0
            )
            .install
        );
        // A user's Localhost profile stays unless the config says otherwise.
        assert!(
            !decide(
                &c,
                SeccompMode::Enforce,
                ModeFrom::Annotation,
                SpecKind::Localhost,
                Some(&p),
                0
            )
            .install
        );
        let over = Seccomp {
            override_user_profiles: true,
            ..cfg()
        };
        assert!(
            decide(
                &over,
                SeccompMode::Enforce,
                ModeFrom::Annotation,
                SpecKind::Localhost,
                Some(&p),
                0
            )
            .install
        );
        // Unconfined by default stays so; asked for explicitly it is confined.
        assert!(
            !decide(
                &c,
                SeccompMode::Enforce,
                ModeFrom::Default,
                SpecKind::Unconfined,
                Some(&p),
                0
            )
            .install
        );
        assert!(
            decide(
                &c,
                SeccompMode::Enforce,
                ModeFrom::Annotation,
                SpecKind::Unconfined,
                Some(&p),
                0
            )
            .install
        );
        let off = decide(
            &c,
            SeccompMode::Off,
            ModeFrom::Annotation,
            SpecKind::Unconfined,
            Some(&p),
            0,
        );
        assert!(!off.install && !off.learn);
    }
}
