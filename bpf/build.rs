//! Compiles the eBPF programs in `src/programs/` with clang (BPF target),
//! into `$OUT_DIR`, for `include_bytes!`. The Rust toolchain here has no
//! rust-src, so the programs are C (DESIGN §6).
//!
//! `records.h`, the records shared with the Rust side, is also compiled on
//! its own, for the BPF target and for the host: it must not lean on what
//! a program includes before it, and its size and offset asserts must hold
//! in the host's C layout too, the one `#[repr(C)]` mirrors follow.

use std::path::PathBuf;
use std::process::Command;

/// Flags every compilation shares.
const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-Wall",
    "-Werror",
    "-D__TARGET_ARCH_x86",
    "-I/usr/include/x86_64-linux-gnu",
];

const RECORDS: &str = "src/programs/records.h";

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-changed={RECORDS}");
    println!("cargo:rerun-if-env-changed=CLANG");
    for target in [Some("bpf"), None] {
        let mut cmd = Command::new(&clang);
        if let Some(t) = target {
            cmd.args(["-target", t]);
        }
        cmd.args(CFLAGS).args(["-fsyntax-only", "-x", "c", RECORDS]);
        let what = format!("{RECORDS} ({} target)", target.unwrap_or("host"));
        run(&clang, &mut cmd, &what);
    }
    // One object per file in src/programs; add names here as they land.
    const PROGRAMS: &[&str] = &["tracer"];
    for name in PROGRAMS {
        let src = format!("src/programs/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let mut cmd = Command::new(&clang);
        cmd.args(["-target", "bpf"])
            .args(CFLAGS)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj);
        run(&clang, &mut cmd, &src);
    }
}

fn run(clang: &str, cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("run {clang} to build {what}: {e} (install clang and libbpf-dev)")
    });
    assert!(status.success(), "{clang} failed on {what}");
}
