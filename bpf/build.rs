//! Compiles the eBPF programs in `src/programs/` with clang (BPF target),
//! into `$OUT_DIR`, for `include_bytes!`. The Rust toolchain here has no
//! rust-src, so the programs are C (DESIGN §6).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // One object per file in src/programs; add names here as they land.
    const PROGRAMS: &[&str] = &["tracer"];
    for name in PROGRAMS {
        let src = format!("src/programs/{name}.bpf.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .args(["-D__TARGET_ARCH_x86", "-I/usr/include/x86_64-linux-gnu"])
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!("run {clang} to build {src}: {e} (install clang and libbpf-dev)")
            });
        assert!(status.success(), "{clang} failed on {src}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
}
