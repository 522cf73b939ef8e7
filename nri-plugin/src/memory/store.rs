//! What the agent learned about each workload (the peak working set of its
//! past runs), kept in `<state_dir>/workloads.json` so restarts lose
//! nothing.
//!
//! A JSON file rewritten atomically (temp file, fsync, rename) rather than
//! a database: it holds one small record per workload, operators can read
//! it, and a torn write cannot happen. A corrupt file is moved aside (named
//! in the log) and learning starts over, rather than blocking the agent.
//!
//! Keys are namespaced (`agent::workload_key`). Version 1 files, written
//! before that, are read as they are: their default keys
//! (`<pod namespace>/<container>@<repository>`) are spelled as today and
//! keep sizing their workloads; their annotation keys (a bare
//! `hyperbox.dev/workload` value) cannot be told apart by namespace, so no
//! new key reaches them. They stay in the file, unread, and each annotated
//! workload learns again from its next run. The file is written as version
//! 2 from the first save on.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::state_file::SaveError;

/// One workload's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Peak working set of each finished run, oldest first.
    pub runs: VecDeque<u64>,
    /// Unix time of the last update.
    pub updated: u64,
}

impl Workload {
    /// The working set estimate (p95 of run peaks).
    pub fn working_set(&self) -> Option<u64> {
        let runs: Vec<u64> = self.runs.iter().copied().collect();
        super::policy::p95(&runs)
    }

    /// The largest run peak.
    pub fn peak(&self) -> Option<u64> {
        self.runs.iter().copied().max()
    }
}

/// The file's format: 2 since keys are namespaced.
const VERSION: u32 = 2;

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    workloads: BTreeMap<String, Workload>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    workloads: BTreeMap<String, Workload>,
    keep: usize,
}

impl Store {
    /// Opens `<dir>/workloads.json`, keeping `keep` runs per workload.
    pub fn open(dir: &Path, keep: usize) -> std::io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("workloads.json");
        let workloads = match crate::state_file::load::<File>(&path, "workload store")? {
            Some(f) => {
                if f.version < VERSION {
                    tracing::info!(file = %path.display(), version = f.version,
                        "workload store predates namespaced keys: annotated workloads learn again");
                }
                f.workloads
            }
            None => BTreeMap::new(),
        };
        Ok(Store {
            path,
            workloads,
            keep: keep.max(1),
        })
    }

    /// A workload's record.
    pub fn get(&self, key: &str) -> Option<Workload> {
        self.workloads.get(key).cloned()
    }

    /// Every workload.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Workload)> {
        self.workloads.iter()
    }

    /// Records a finished run's peak working set and saves.
    pub fn record_run(&mut self, key: &str, peak: u64) -> Result<(), SaveError> {
        let w = self.workloads.entry(key.to_string()).or_default();
        w.runs.push_back(peak);
        while w.runs.len() > self.keep {
            w.runs.pop_front();
        }
        w.updated = hyperbox_api::time::unix_now();
        self.save()
    }

    fn save(&self) -> Result<(), SaveError> {
        crate::state_file::save(
            &self.path,
            &File {
                version: VERSION,
                workloads: self.workloads.clone(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_survive_reopening_and_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), 3).unwrap();
        for peak in [10, 20, 30, 40] {
            s.record_run("ns/app@repo", peak).unwrap();
        }
        let s = Store::open(dir.path(), 3).unwrap();
        let w = s.get("ns/app@repo").unwrap();
        assert_eq!(w.runs, VecDeque::from(vec![20, 30, 40]));
        assert_eq!(w.working_set(), Some(40));
        assert_eq!(w.peak(), Some(40));
        assert!(s.get("other").is_none());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("workloads.json"), b"{not json").unwrap();
        let s = Store::open(dir.path(), 3).unwrap();
        assert_eq!(s.all().count(), 0);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), b"{not json");
    }

    #[test]
    fn version_1_default_keys_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = r#"{"version":1,"workloads":{
            "shop/web@reg/team/web":{"runs":[100],"updated":1},
            "frontend":{"runs":[999],"updated":1}}}"#;
        std::fs::write(dir.path().join("workloads.json"), v1).unwrap();
        let mut s = Store::open(dir.path(), 3).unwrap();
        assert_eq!(s.get("shop/web@reg/team/web").unwrap().runs, [100]);
        // The namespaced annotation key starts afresh.
        assert!(s.get("shop/frontend").is_none());
        s.record_run("shop/frontend", 7).unwrap();
        let text = std::fs::read_to_string(dir.path().join("workloads.json")).unwrap();
        let f: File = serde_json::from_str(&text).unwrap();
        assert_eq!(f.version, 2);
        assert_eq!(f.workloads.len(), 3);
    }
}
