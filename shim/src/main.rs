//! The shim binary: containerd runs it as `start`, `delete` or the
//! long-running server.

use hyperbox_shim::service::HyperboxShim;

/// containerd's name for this runtime.
const RUNTIME: &str = "io.containerd.hyperbox.v1";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args
        .iter()
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!(
            "containerd-shim-hyperbox-v1:\n  Runtime: {RUNTIME}\n  Version: {}",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    if args.iter().any(|a| a == "-info" || a == "--info") {
        match hyperbox_shim::info::answer(RUNTIME) {
            Ok(bytes) => {
                use std::io::Write;
                let mut out = std::io::stdout();
                if out.write_all(&bytes).and_then(|()| out.flush()).is_ok() {
                    return;
                }
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("{RUNTIME}: -info: {e}");
                std::process::exit(1);
            }
        }
    }
    // One thread: a shim serves one pod, and every thread costs resident
    // memory on a node running hundreds of them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(containerd_shim::asynchronous::run::<HyperboxShim>(
        RUNTIME, None,
    ));
}
