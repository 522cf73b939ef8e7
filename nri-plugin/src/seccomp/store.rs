//! What was learned of each workload's syscalls, kept in
//! `<state_dir>/seccomp.json` (see [`crate::state_file`]): the syscall
//! names, how many runs they come from and since when the set stopped
//! growing (what `auto` waits for), the operator's mode override, and the
//! syscalls reported outside an enforced profile, kept apart for review
//! (never learned silently: a compromised workload must not teach its
//! own profile).
//!
//! Names, not numbers: a profile outlives kernels and libseccomp versions,
//! and OCI profiles name syscalls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hyperbox_api::time::unix_now;
use hyperbox_config::SeccompMode;
use serde::{Deserialize, Serialize};

use super::profile::Learned;
use crate::state_file::SaveError;

/// One workload's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Syscalls learned through the 64-bit entry.
    pub syscalls: BTreeSet<String>,
    /// Through the 32-bit entry.
    #[serde(default)]
    pub compat: BTreeSet<String>,
    /// Runs learned from.
    pub runs: u32,
    /// Runs in a row that added no syscall.
    pub stable_runs: u32,
    /// First run learned (unix time; 0: none yet).
    pub first_learned: u64,
    /// Last time a run added a syscall.
    pub grown_at: u64,
    /// Last change.
    pub updated: u64,
    /// `hb profile set-mode`: overrides annotations and the default.
    #[serde(default)]
    pub mode: Option<SeccompMode>,
    /// `auto` switched this workload to enforcing at (unix time).
    #[serde(default)]
    pub enforcing_since: Option<u64>,
    /// Syscalls reported outside its profile, and how many containers
    /// made them.
    #[serde(default)]
    pub review: BTreeMap<String, u64>,
}

impl Profile {
    /// The learned sets.
    pub fn learned(&self) -> Learned {
        Learned {
            syscalls: self.syscalls.clone(),
            compat: self.compat.clone(),
        }
    }

    /// Learned syscalls, both entries.
    pub fn len(&self) -> usize {
        self.syscalls.len() + self.compat.len()
    }

    /// Nothing learned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    profiles: BTreeMap<String, Profile>,
    /// The runtime's default profile as last seen in a spec (for `hb
    /// profile diff W default`).
    #[serde(default)]
    runtime_default: Option<serde_json::Value>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    file: File,
}

impl Store {
    /// Opens `<dir>/seccomp.json`.
    pub fn open(dir: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("seccomp.json");
        let file =
            crate::state_file::load::<File>(&path, "seccomp profile store")?.unwrap_or_default();
        Ok(Store { path, file })
    }

    /// A workload's record.
    pub fn get(&self, key: &str) -> Option<&Profile> {
        self.file.profiles.get(key)
    }

    /// Every workload.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Profile)> {
        self.file.profiles.iter()
    }

    /// Adds a finished run's syscalls; returns the names it added. A run
    /// that made none (it never exec'd, or was not traced) teaches nothing
    /// and does not count as a stable run.
    pub fn learn_run(&mut self, key: &str, run: &Learned) -> Result<Vec<String>, SaveError> {
        if run.syscalls.is_empty() && run.compat.is_empty() {
            return Ok(Vec::new());
        }
        let now = unix_now();
        let p = self.file.profiles.entry(key.to_string()).or_default();
        let mut added: Vec<String> = run.syscalls.difference(&p.syscalls).cloned().collect();
        added.extend(
            run.compat
                .difference(&p.compat)
                .map(|n| super::names::label(super::names::Arch::X86, n)),
        );
        p.syscalls.extend(run.syscalls.iter().cloned());
        p.compat.extend(run.compat.iter().cloned());
        if p.runs == 0 {
            p.first_learned = now;
        }
        p.runs += 1;
        if added.is_empty() {
            p.stable_runs += 1;
        } else {
            p.stable_runs = 0;
            p.grown_at = now;
        }
        p.updated = now;
        self.save()?;
        Ok(added)
    }

    /// Sets (or with `None` clears) a workload's mode override.
    pub fn set_mode(&mut self, key: &str, mode: Option<SeccompMode>) -> Result<(), SaveError> {
        let p = self.file.profiles.entry(key.to_string()).or_default();
        p.mode = mode;
        if mode.is_some_and(|m| m != SeccompMode::Auto && m != SeccompMode::Enforce) {
            // Back to learning: `auto` decides afresh after.
            p.enforcing_since = None;
        }
        p.updated = unix_now();
        self.save()
    }

    /// Forgets a workload; `false` if it was unknown.
    pub fn forget(&mut self, key: &str) -> Result<bool, SaveError> {
        let known = self.file.profiles.remove(key).is_some();
        if known {
            self.save()?;
        }
        Ok(known)
    }

    /// `auto` switched `key` to enforcing.
    pub fn mark_enforcing(&mut self, key: &str) -> Result<(), SaveError> {
        if let Some(p) = self.file.profiles.get_mut(key)
            && p.enforcing_since.is_none()
        {
            p.enforcing_since = Some(unix_now());
            p.updated = unix_now();
            self.save()?;
        }
        Ok(())
    }

    /// Counts a syscall reported outside `key`'s profile, for review.
    pub fn review(&mut self, key: &str, syscall: &str) -> Result<(), SaveError> {
        let p = self.file.profiles.entry(key.to_string()).or_default();
        *p.review.entry(syscall.to_string()).or_default() += 1;
        p.updated = unix_now();
        self.save()
    }

    /// The runtime's default profile as last seen.
    pub fn runtime_default(&self) -> Option<&serde_json::Value> {
        self.file.runtime_default.as_ref()
    }

    /// Remembers the runtime's default profile, when it changed.
    pub fn remember_default(&mut self, profile: &serde_json::Value) -> Result<(), SaveError> {
        if self.file.runtime_default.as_ref() == Some(profile) {
            return Ok(());
        }
        self.file.runtime_default = Some(profile.clone());
        self.save()
    }

    fn save(&self) -> Result<(), SaveError> {
        let f = File {
            version: VERSION,
            profiles: self.file.profiles.clone(),
            runtime_default: self.file.runtime_default.clone(),
        };
        crate::state_file::save(&self.path, &f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(names: &[&str]) -> Learned {
        Learned {
            syscalls: names.iter().map(|s| s.to_string()).collect(),
            compat: Default::default(),
        }
    }

    #[test]
    fn runs_grow_the_set_and_stable_runs_count_from_the_last_growth() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.learn_run("w", &run(&["read", "write"])).unwrap().len(), 2);
        assert!(s.learn_run("w", &run(&["read"])).unwrap().is_empty());
        assert!(s.learn_run("w", &run(&[])).unwrap().is_empty());
        let p = s.get("w").unwrap();
        assert_eq!((p.runs, p.stable_runs), (2, 1), "an empty run is no run");
        assert_eq!(s.learn_run("w", &run(&["openat"])).unwrap(), ["openat"]);
        s.set_mode("w", Some(SeccompMode::Enforce)).unwrap();
        s.review("w", "ptrace").unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = s.get("w").unwrap();
        assert_eq!((p.runs, p.stable_runs, p.len()), (3, 0, 3));
        assert_eq!(p.mode, Some(SeccompMode::Enforce));
        assert_eq!(p.review["ptrace"], 1);
        assert!(!p.syscalls.contains("ptrace"), "reviewed, never learned");
    }

    #[test]
    fn a_corrupt_store_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seccomp.json"), b"{]").unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        assert_eq!(s.all().count(), 0);
        assert!(!s.forget("w").unwrap());
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
            .count();
        assert_eq!(aside, 1);
    }
}
