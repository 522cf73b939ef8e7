//! The agent's seccomp state: the store of learned profiles, and one
//! [`Run`] per container created with a mode other than `off`, from its
//! creation (the decision) to its stop (the learning) — plus the reports
//! of syscalls outside installed profiles.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use hyperbox_api::annotations::SECCOMP_MODE;
use hyperbox_api::time::unix_now;
use hyperbox_api::types::{
    ProfileDetail, ProfileSummary, SeccompAction, SeccompDecision, SeccompReport,
};
use hyperbox_config::SeccompMode;

use super::decide::{self, ModeFrom};
use super::names::{self, Arch};
use super::profile::{self, Learned, SpecKind};
use super::store::{Profile, Store};
use crate::state_file::SaveError;

/// Reports kept for `hb profile show` (the newest).
const REPORTS_KEPT: usize = 512;

/// One container's seccomp run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Its workload.
    pub workload: String,
    /// The decision at creation.
    pub decision: SeccompDecision,
    /// Its syscalls are learned at stop.
    pub learn: bool,
    /// The installed profile's allowed names (empty when none installed).
    pub allowed: BTreeSet<String>,
    /// Its cgroup directory (v2, or v1 memory), to attribute audit
    /// records by `/proc/<pid>/cgroup`.
    pub cgroup_dir: Option<PathBuf>,
    /// Syscalls already reported, once per container.
    pub reported: HashSet<(Arch, u32)>,
    /// The profile went into the spec through NRI's adjustment.
    pub via_nri: bool,
}

impl Run {
    /// A profile was installed for it.
    pub fn installed(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// Its installed profile allows syscall `nr` of `arch`.
    pub fn allows(&self, arch: Arch, nr: u32) -> bool {
        names::name(arch, nr).is_some_and(|n| self.allowed.contains(&n))
    }

    /// Under a complaining profile: what falls outside it is allowed, so
    /// the tracer sees it, counting for the container's whole life.
    pub fn complains(&self) -> bool {
        self.installed() && self.decision.mode == SeccompMode::Complain
    }

    /// Under an enforcing profile: denials never reach the tracer's
    /// enter hook, only its exit hook sees them (refusals).
    pub fn enforces(&self) -> bool {
        self.installed() && self.decision.mode == SeccompMode::Enforce
    }

    /// Its syscalls are counted for its whole life (learning, or
    /// complaining).
    pub fn counts_whole_life(&self) -> bool {
        self.learn || self.complains()
    }
}

/// The agent's seccomp state.
#[derive(Debug)]
pub struct Seccomp {
    cfg: hyperbox_config::Seccomp,
    store: Mutex<Store>,
    runs: Mutex<HashMap<String, Run>>,
    reports: Mutex<VecDeque<SeccompReport>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A learned profile libseccomp refused (counted, logged, not installed).
#[derive(Debug)]
pub struct Refused(pub String);

impl Seccomp {
    /// Opens the store under `state_dir`.
    pub fn open(cfg: hyperbox_config::Seccomp, state_dir: &Path) -> std::io::Result<Seccomp> {
        Ok(Seccomp {
            cfg,
            store: Mutex::new(Store::open(state_dir)?),
            runs: Mutex::new(HashMap::new()),
            reports: Mutex::new(VecDeque::new()),
        })
    }

    /// A container's mode and where it came from: the workload's override,
    /// else its annotation, else the default.
    pub fn mode_of(
        &self,
        workload: &str,
        annotations: &HashMap<String, String>,
    ) -> (SeccompMode, ModeFrom) {
        if let Some(m) = lock(&self.store).get(workload).and_then(|p| p.mode) {
            return (m, ModeFrom::Override);
        }
        match annotations.get(SECCOMP_MODE) {
            Some(v) => match SeccompMode::parse(v) {
                Some(m) => (m, ModeFrom::Annotation),
                None => {
                    tracing::warn!(value = %v, "unknown {SECCOMP_MODE} value; using seccomp.default_mode");
                    (self.cfg.default_mode, ModeFrom::Default)
                }
            },
            None => (self.cfg.default_mode, ModeFrom::Default),
        }
    }

    /// The mode asked for, the workload's learned profile and the decision
    /// for a container of `workload` whose spec profile is of `kind`.
    fn decide(
        &self,
        workload: &str,
        annotations: &HashMap<String, String>,
        kind: SpecKind,
    ) -> (SeccompMode, Option<Profile>, decide::Outcome) {
        let (configured, from) = self.mode_of(workload, annotations);
        let profile = lock(&self.store).get(workload).cloned();
        let out = decide::decide(
            &self.cfg,
            configured,
            from,
            kind,
            profile.as_ref(),
            unix_now(),
        );
        (configured, profile, out)
    }

    /// Decides container `id`'s profile at creation and starts its run.
    /// `spec` is the spec's `linux.seccomp` (`kind` how it was chosen);
    /// `nri` when NRI's adjustment will carry an installed profile. A
    /// learned profile that does not compile is never installed (the
    /// runtime's stays) and comes back as [`Refused`].
    #[allow(clippy::too_many_arguments)]
    pub fn at_create(
        &self,
        id: &str,
        workload: &str,
        annotations: &HashMap<String, String>,
        kind: SpecKind,
        spec: Option<&serde_json::Value>,
        cgroup_dir: Option<PathBuf>,
        nri: bool,
    ) -> (SeccompDecision, Option<Refused>) {
        if kind == SpecKind::RuntimeDefault
            && let Some(p) = spec
            && let Err(e) = lock(&self.store).remember_default(p)
        {
            tracing::warn!(error = %hyperbox_api::error_chain(&e), "remember the runtime's default profile");
        }
        let (configured, profile, out) = self.decide(workload, annotations, kind);
        let mut decision = SeccompDecision {
            configured,
            mode: out.mode,
            action: SeccompAction::Keep,
            profile: None,
            workload: workload.to_string(),
            allowed: 0,
            reason: out.reason,
        };
        let mut refused = None;
        let mut allowed = BTreeSet::new();
        if out.install
            && let Some(p) = &profile
        {
            let oci = profile::oci(&p.learned(), out.mode);
            match profile::compile(&oci) {
                Ok(c) => {
                    allowed = c.allowed;
                    decision.allowed = allowed.len();
                    decision.action = SeccompAction::Install;
                    decision.profile = Some(oci);
                    if out.switch
                        && let Err(e) = lock(&self.store).mark_enforcing(workload)
                    {
                        tracing::warn!(error = %hyperbox_api::error_chain(&e), "save the switch to enforcing");
                    }
                }
                Err(e) => {
                    let why = hyperbox_api::error_chain(&e);
                    decision.mode = SeccompMode::Off;
                    decision.reason = format!(
                        "the learned profile of {workload} does not compile ({why}); the {} profile stays",
                        kind.as_str()
                    );
                    refused = Some(Refused(why));
                }
            }
        }
        if decision.mode != SeccompMode::Off {
            lock(&self.runs).insert(
                id.to_string(),
                Run {
                    workload: workload.to_string(),
                    learn: out.learn,
                    via_nri: nri && decision.action == SeccompAction::Install,
                    decision: decision.clone(),
                    allowed,
                    cgroup_dir,
                    reported: HashSet::new(),
                },
            );
        }
        (decision, refused)
    }

    /// A container registered without a decision at creation (the shim
    /// did not ask, or containerd 1.7's NRI with runc's shim): nothing can
    /// be installed any more, but it learns when the decision at creation
    /// would have had it learn.
    pub fn learn_only(
        &self,
        id: &str,
        workload: &str,
        annotations: &HashMap<String, String>,
        kind: SpecKind,
    ) {
        let (configured, _, out) = self.decide(workload, annotations, kind);
        if !out.learn {
            return;
        }
        lock(&self.runs).insert(
            id.to_string(),
            Run {
                workload: workload.to_string(),
                learn: true,
                via_nri: false,
                decision: SeccompDecision {
                    configured,
                    mode: SeccompMode::Learn,
                    action: SeccompAction::Keep,
                    profile: None,
                    workload: workload.to_string(),
                    allowed: 0,
                    reason: format!("registered after creation; {}", out.reason),
                },
                allowed: BTreeSet::new(),
                cgroup_dir: None,
                reported: HashSet::new(),
            },
        );
    }

    /// Container `id`'s run, if it has one.
    pub fn run(&self, id: &str) -> Option<Run> {
        lock(&self.runs).get(id).cloned()
    }

    /// Containers running under a complaining profile.
    pub fn complaining(&self) -> Vec<String> {
        lock(&self.runs)
            .iter()
            .filter(|(_, r)| r.complains())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether container `id`'s syscalls are learned.
    pub fn learns(&self, id: &str) -> bool {
        lock(&self.runs).get(id).is_some_and(|r| r.learn)
    }

    /// Container `id` stopped with these syscall counts (the tracer's keys):
    /// a learning run's syscalls join its workload's profile. Returns the
    /// workload and the names added.
    pub fn finish(
        &self,
        id: &str,
        counts: Option<&BTreeMap<u32, u64>>,
    ) -> Result<Option<(String, Vec<String>)>, SaveError> {
        let Some(run) = lock(&self.runs).remove(id) else {
            return Ok(None);
        };
        let (true, Some(counts)) = (run.learn, counts) else {
            return Ok(None);
        };
        let mut learned = Learned::default();
        for key in counts.keys() {
            let (arch, nr) = names::split(*key);
            // A number libseccomp cannot name cannot be allowed by name
            // either: it stays denied (ENOSYS above the profile's range).
            if let Some(n) = names::name(arch, nr) {
                match arch {
                    Arch::X8664 => learned.syscalls.insert(n),
                    Arch::X86 => learned.compat.insert(n),
                };
            }
        }
        let added = lock(&self.store).learn_run(&run.workload, &learned)?;
        Ok(Some((run.workload, added)))
    }

    /// The container whose cgroup holds `pid` now, among those with an
    /// installed profile.
    pub fn container_of_pid(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let paths: Vec<&str> = text
            .lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .filter(|p| p.len() > 1)
            .collect();
        lock(&self.runs)
            .iter()
            .filter(|(_, r)| r.installed())
            .find(|(_, r)| {
                r.cgroup_dir.as_ref().is_some_and(|d| {
                    let d = d.to_string_lossy();
                    paths.iter().any(|p| d.ends_with(p))
                })
            })
            .map(|(id, _)| id.clone())
    }

    /// A syscall outside container `id`'s installed profile: the report,
    /// the first time for this container (`None` after, or when `id` has
    /// no installed profile).
    pub fn report(
        &self,
        id: &str,
        arch: Arch,
        nr: u32,
        pid: u32,
        comm: &str,
    ) -> Option<SeccompReport> {
        let mut runs = lock(&self.runs);
        let run = runs.get_mut(id).filter(|r| r.installed())?;
        if !run.reported.insert((arch, nr)) {
            return None;
        }
        let syscall = names::display(arch, nr);
        let report = SeccompReport {
            at: unix_now(),
            container: id.to_string(),
            workload: run.workload.clone(),
            mode: run.decision.mode,
            syscall: syscall.clone(),
            nr,
            arch: arch.as_str().to_string(),
            outcome: if run.decision.mode == SeccompMode::Complain {
                "allowed".into()
            } else {
                "denied".into()
            },
            pid,
            comm: comm.to_string(),
        };
        let workload = run.workload.clone();
        drop(runs);
        if let Err(e) = lock(&self.store).review(&workload, &names::label(arch, &syscall)) {
            tracing::warn!(error = %hyperbox_api::error_chain(&e), "save a reviewed syscall");
        }
        let mut reports = lock(&self.reports);
        reports.push_back(report.clone());
        while reports.len() > REPORTS_KEPT {
            reports.pop_front();
        }
        Some(report)
    }

    /// Every learned workload.
    pub fn summaries(&self) -> Vec<ProfileSummary> {
        lock(&self.store)
            .all()
            .map(|(k, p)| summary(k, p))
            .collect()
    }

    /// One workload's profile in `format` (`oci`, `localhost`, `spo`), as
    /// it would be installed in `enforce` (or `complain`, when that is
    /// its override).
    pub fn detail(&self, workload: &str, format: &str) -> Option<ProfileDetail> {
        let p = lock(&self.store).get(workload).cloned()?;
        let mode = match p.mode {
            Some(SeccompMode::Complain) => SeccompMode::Complain,
            _ => SeccompMode::Enforce,
        };
        let oci = profile::oci(&p.learned(), mode);
        let shaped = match format {
            "localhost" => profile::localhost(&oci),
            "spo" => profile::spo(&oci, workload),
            _ => oci,
        };
        let reports = lock(&self.reports)
            .iter()
            .filter(|r| r.workload == workload)
            .cloned()
            .collect();
        Some(ProfileDetail {
            summary: summary(workload, &p),
            syscalls: p.syscalls.iter().cloned().collect(),
            compat: p.compat.iter().cloned().collect(),
            review: p.review.clone(),
            reports,
            profile: shaped,
        })
    }

    /// The allowed names of `what`: a learned workload's profile, or
    /// `default`, the runtime's default profile as last seen (a syscall it
    /// allows under argument conditions counts as allowed, so a workload
    /// that learned `clone` is not shown needing more than the default).
    pub fn allowed_of(&self, what: &str) -> Option<BTreeSet<String>> {
        let store = lock(&self.store);
        if what == "default" {
            return store.runtime_default().map(profile::permitted_names);
        }
        store.get(what).map(|p| profile::allowed(&p.learned()))
    }

    /// `hb profile set-mode`.
    pub fn set_mode(&self, workload: &str, mode: Option<SeccompMode>) -> Result<(), SaveError> {
        lock(&self.store).set_mode(workload, mode)
    }

    /// `hb profile forget`.
    pub fn forget(&self, workload: &str) -> Result<bool, SaveError> {
        lock(&self.store).forget(workload)
    }
}

fn summary(workload: &str, p: &Profile) -> ProfileSummary {
    ProfileSummary {
        workload: workload.to_string(),
        mode: p.mode,
        enforcing_since: p.enforcing_since,
        syscalls: p.len(),
        runs: p.runs,
        stable_runs: p.stable_runs,
        first_learned: p.first_learned,
        grown_at: p.grown_at,
        review: p.review.len(),
    }
}
