//! The real `ctr` of an instance's containerd line, run against it: what
//! a user at a shell types, for tests and benchmarks that go through the
//! CLI rather than the API client (`--seccomp`, `--mount`, `--runtime`).

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::containerd::{Containerd, Line};
use crate::gobin;

/// The `ctr` binary of the instance's line.
pub fn bin(ctd: &Containerd) -> PathBuf {
    match ctd.line() {
        Line::V1_7 => PathBuf::from("/usr/bin/ctr"),
        Line::V2 => gobin::ctr(),
    }
}

/// `args`, with a `run` that names no cgroup given one under the
/// instance's own prefix: ctr's default, `/<namespace>/<id>`, is shared by
/// every containerd on the machine.
pub fn isolated(ctd: &Containerd, args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if args.first() == Some(&"run") && !args.contains(&"--cgroup") {
        let cgroup = format!("{}/ctr-{:08x}", ctd.cgroup_prefix(), rand::random::<u32>());
        out.splice(1..1, ["--cgroup".to_string(), cgroup]);
    }
    out
}

/// `ctr args` against the instance, not started.
pub fn command(ctd: &Containerd, args: &[&str]) -> Command {
    let mut c = Command::new(bin(ctd));
    c.arg("--address")
        .arg(ctd.address())
        .args(isolated(ctd, args));
    c
}

/// Runs `ctr args`; its output whatever the status.
pub fn output(ctd: &Containerd, args: &[&str]) -> Output {
    command(ctd, args).output().expect("run ctr")
}

/// Runs `ctr args`; stdout, or a panic with stderr and containerd's log.
pub fn run(ctd: &Containerd, args: &[&str]) -> String {
    let out = output(ctd, args);
    assert!(
        out.status.success(),
        "ctr {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ctr images pull` from the test registry (plain HTTP; 2.x's ctr pulls
/// through the client, as 1.7's does, with `--local`).
pub fn pull(ctd: &Containerd, reference: &str) {
    let mut args = vec!["images", "pull", "--plain-http"];
    if ctd.line() == Line::V2 {
        args.push("--local");
    }
    args.push(reference);
    run(ctd, &args);
}
