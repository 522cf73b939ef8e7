//! The lazy path's FUSE fallback (`hyperbox_kernel::fuse`): on this host
//! by configuration, and on the kernels most nodes run, Debian 12's 6.1
//! (no file-backed EROFS, no pre-content events) and 6.12 (file-backed
//! EROFS, no pre-content events), booted as guests that see this
//! machine's files (`hyperbox_integration::vm`).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyperbox_integration::prereq::Prereq;
use hyperbox_integration::{require, require_containers, vm};
use hyperbox_kernel::fanotify::{PreContent, Verdict};
use hyperbox_kernel::fuse::FuseReads;
use hyperbox_kernel::loopdev;

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
    for prefix in ["6.1.", "6.12."] {
        let kernel = vm::kernels(prefix).remove(0);
        vm::run_own_tests(
            &kernel,
            "lazy",
            "echo GUEST $(uname -r)",
            "GUEST",
            &["a_lazy_pull_on_this_kernel"],
            true,
        );
    }
}

/// Reads the first 4 KiB of a block device, past its page cache.
fn read_device(dev: &Path) -> std::io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    let mut buf = vec![0u8; 3 * 4096];
    let at = buf.as_ptr().align_offset(4096);
    let n = f.read_at(&mut buf[at..at + 4096], 0)?;
    Ok(buf[at..at + n].to_vec())
}

/// What the kernel says `dev` reads, once it says `want` (10 s at most).
fn wait_backing(dev: &Path, want: &Path) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = loopdev::backing_files()
            .into_iter()
            .find(|(d, _)| d == dev)
            .map(|(_, b)| b)
            .unwrap_or_default();
        if now == want || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The switching of the FUSE fallback, on real loop devices and FUSE:
/// a layer mounted while filling reads through FUSE (its reads asked of
/// the policy), is moved to its local file when complete (no more asks),
/// goes back through FUSE when refused afterwards (reads fail, even of
/// what FUSE served before), and a new file under a removed one's inode
/// number is never published with the old one's name or size.
#[test]
fn loop_devices_follow_a_lazy_file_through_completion_and_refusal() {
    if vm::inside() {
        return;
    }
    require!(Prereq::Root);
    let root = hyperbox_integration::footprint::owned_temp_dir("hb-fuse-").unwrap();
    let root = root.canonicalize().unwrap();
    fs::create_dir(root.join("lazy")).unwrap();
    let layer = root.join("lazy/a.erofs");
    let bytes: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(&layer, &bytes).unwrap();

    let fuse = Arc::new(FuseReads::mount(&root.join("fuse")).expect("mount the FUSE side"));
    let (asked, refuse) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    {
        let (fuse, asked, refuse) = (fuse.clone(), asked.clone(), refuse.clone());
        std::thread::spawn(move || {
            let mut events = Vec::new();
            while fuse.read_events(&mut events).is_ok() {
                for e in events.drain(..) {
                    asked.fetch_add(1, Ordering::SeqCst);
                    let v = if refuse.load(Ordering::SeqCst) {
                        Verdict::DenyEio
                    } else {
                        Verdict::Allow
                    };
                    let _ = fuse.respond(e, v);
                }
            }
        });
    }

    fuse.mark(&layer).unwrap();
    let twin = fuse
        .serve_path(&layer)
        .expect("a marked file is served through FUSE");
    assert!(twin.starts_with(fuse.dir()), "{}", twin.display());
    let dev = loopdev::attach(&twin).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(read_device(dev.path()).unwrap(), bytes[..4096]);
        assert!(
            asked.load(Ordering::SeqCst) > 0,
            "the read was not asked of the policy"
        );
        // Read once through FUSE's page cache too (the loop device reads
        // past it): kept across opens, it must not outlive a refusal.
        assert_eq!(fs::read(&twin).unwrap(), bytes);

        // Complete: the device reads the local file, and nothing is asked.
        fuse.unmark(&layer).unwrap();
        assert_eq!(
            wait_backing(dev.path(), &layer),
            layer,
            "not switched on completion"
        );
        let before = asked.load(Ordering::SeqCst);
        assert_eq!(read_device(dev.path()).unwrap(), bytes[..4096]);
        assert_eq!(
            asked.load(Ordering::SeqCst),
            before,
            "a complete layer's read was asked"
        );
        assert_eq!(
            fuse.serve_path(&layer).as_deref(),
            Some(layer.as_path()),
            "a complete but known file is mounted on a loop device over itself"
        );

        // Refused afterwards: back through FUSE, where reads fail.
        refuse.store(true, Ordering::SeqCst);
        fuse.mark(&layer).unwrap();
        assert_eq!(
            wait_backing(dev.path(), &twin),
            twin,
            "not switched back on refusal"
        );
        let err = read_device(dev.path()).expect_err("a refused layer's read succeeded");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let err = match fs::read(&twin) {
            Ok(b) => panic!(
                "a refused layer's cached pages were read ({} bytes)",
                b.len()
            ),
            Err(e) => e,
        };
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

        // The same inode, changed: published anew, its own name and size.
        let old_ino = fs::metadata(&layer).unwrap().ino();
        File::options()
            .write(true)
            .open(&layer)
            .unwrap()
            .set_len(8192)
            .unwrap();
        fuse.mark(&layer).unwrap();
        let changed = fuse.serve_path(&layer).unwrap();
        assert_ne!(
            changed, twin,
            "a changed file published under its earlier name"
        );
        assert_eq!(fs::metadata(&changed).unwrap().len(), 8192);

        // Removed and replaced: the next file is a new name, its own size,
        // whether or not it got the old inode number.
        fuse.forget(&layer).unwrap();
        fs::remove_file(&layer).unwrap();
        fs::write(&layer, &bytes[..4096]).unwrap();
        let reused = fs::metadata(&layer).unwrap().ino() == old_ino;
        eprintln!("the new file reused the inode number: {reused}");
        fuse.mark(&layer).unwrap();
        let next = fuse.serve_path(&layer).unwrap();
        assert!(
            next != twin && next != changed,
            "a new file published under an earlier name"
        );
        assert_eq!(fs::metadata(&next).unwrap().len(), 4096);
    }));
    drop(dev);
    let _ = nix::mount::umount2(fuse.dir(), nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir_all(&root);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
