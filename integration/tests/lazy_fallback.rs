//! The lazy path's FUSE fallback (`hyperbox_kernel::fuse`): on this host
//! by configuration, and on the kernels most nodes run, Debian 12's 6.1
//! (no file-backed EROFS, no pre-content events) and 6.12 (file-backed
//! EROFS, no pre-content events), booted as guests that see this
//! machine's files (`hyperbox_integration::vm`).

use std::time::Duration;

use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::{require, require_containers, vm};

/// Forced onto FUSE on a host that has fanotify pre-content events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_images_are_pulled_lazily_through_fuse() {
    require_containers!();
    hyperbox_integration::lazy::pull_serve_restart_complete("lazy_backend = \"fuse\"\n").await;
}

/// What the guests run: the default configuration, on a kernel that can
/// only serve lazily through FUSE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside the guests of lazy_pulls_work_on_kernels_without_pre_content_events"]
async fn a_lazy_pull_on_this_kernel() {
    assert!(vm::inside(), "meant for the guests");
    require_containers!();
    let pre_content = std::process::Command::new(hyperbox_integration::binaries::path("hb"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let doctor: serde_json::Value = serde_json::from_slice(&pre_content.stdout).unwrap();
    assert_eq!(
        doctor
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == "fanotify_pre_content"))
            .map(|f| f["available"].clone()),
        Some(serde_json::Value::Bool(false)),
        "this kernel has pre-content events: {doctor:#}"
    );
    // The scenario checks hb doctor and the daemon both say FUSE.
    hyperbox_integration::lazy::pull_serve_restart_complete("").await;
}

/// Boots each older kernel and runs the lazy scenario in it with the
/// default configuration: `hb doctor` says FUSE, and the pull, the reads,
/// the kill -9 and the completion work as on the host.
#[test]
fn lazy_pulls_work_on_kernels_without_pre_content_events() {
    if vm::inside() {
        return; // the guest runs a_lazy_pull_on_this_kernel, not this one
    }
    require!(Prereq::Root, Prereq::Vm("6.1."), Prereq::Vm("6.12."));
    for bin in ["hyperbox-snapshotter", "hyperbox-nri", "hb"] {
        hyperbox_integration::binaries::path(bin);
    }
    let exe = std::env::current_exe().unwrap();
    for prefix in ["6.1.", "6.12."] {
        let kernel = vm::kernels(prefix).remove(0);
        let script = format!(
            "set -e; echo GUEST $(uname -r); exec {} --exact --test-threads 1 --ignored a_lazy_pull_on_this_kernel",
            vm::quote(&exe.to_string_lossy())
        );
        let mut env = vm::forwarded_env();
        env.push((hyperbox_integration::binaries::BUILT_ENV.into(), "1".into()));
        env.push(("HYPERBOX_REQUIRE_ALL".into(), "1".into()));
        let out = vm::run(&kernel, &script, &env, Duration::from_secs(1800));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(80)..].join("\n")
        };
        assert!(
            stdout.contains(&format!("GUEST {}", kernel.version)),
            "the guest did not boot {}:\n{}\n{}",
            kernel.version,
            tail(&stdout),
            tail(&stderr)
        );
        for l in stdout.lines().filter(|l| l.starts_with("test ")) {
            eprintln!("guest {}: {l}", kernel.version);
        }
        let kept = vm::keep_output(&format!("lazy-{}", kernel.version), &out);
        assert!(
            out.status.success() && stdout.contains("test result: ok. 1 passed; 0 failed"),
            "the lazy scenario on {}: {}\n{}\nthe guest's whole output: {}\n{}",
            kernel.version,
            out.status,
            Some(vm::test_failures(&stdout))
                .filter(|f| !f.is_empty())
                .unwrap_or_else(|| tail(&stdout)),
            kept.display(),
            tail(&stderr)
        );
    }
}
