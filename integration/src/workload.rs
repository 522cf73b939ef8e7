//! Workload programs for tests and benchmarks that busybox cannot play:
//! `workloads/syscalls.c` (a getpid/read/write loop, small-file copies, a
//! burst of opens), built static with the host's gcc once per process and
//! bind-mounted into busybox containers, which have no libc to link
//! against.

use std::path::{Path, PathBuf};

// Three programs of different kinds for the seccomp tests and benchmark,
// each deterministic in its output: `sh -c` scripts for the busybox image
// and a `python3 -c` one for the Debian + Python image
// (`crate::distro`).

/// A network server: busybox httpd on loopback, fetched three times.
pub const WEB_SERVER: &str = "httpd -p 127.0.0.1:8080 -h /etc && sleep 0.2 && \
    for i in 1 2 3; do wget -q -O - http://127.0.0.1:8080/passwd | head -n 1; done; \
    kill $(pidof httpd); echo served";
/// A shell pipeline.
pub const SHELL_PIPELINE: &str = "seq 1 2000 | sort -rn | head -n 50 | md5sum | cut -c1-8; \
    tr a-z A-Z < /etc/passwd | wc -l; ls -la /bin | grep -c busybox";
/// A language runtime doing file and network I/O.
pub const PYTHON_IO: &str = r#"
import json, os, socket, threading, tempfile
d = tempfile.mkdtemp()
for i in range(20):
    with open(os.path.join(d, f"f{i}.json"), "w") as f:
        json.dump({"i": i, "sq": i * i}, f)
total = sum(json.load(open(os.path.join(d, n)))["sq"] for n in sorted(os.listdir(d)))
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
def serve():
    c, _ = srv.accept(); c.sendall(c.recv(64).upper()); c.close()
t = threading.Thread(target=serve); t.start()
cli = socket.create_connection(srv.getsockname()); cli.sendall(b"ping")
print(total, cli.recv(64).decode()); t.join()
"#;

use std::process::Command;
use std::sync::OnceLock;

static SYSCALLS: OnceLock<PathBuf> = OnceLock::new();

/// The static `syscalls` binary (`syscalls loop|copy|opens N`).
pub fn syscalls_binary() -> PathBuf {
    SYSCALLS
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/syscalls.c");
            // A build product: kept beside the binaries in the target dir.
            let exe = std::env::current_exe().expect("test executable path");
            let dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("target/<profile> directory")
                .join("workloads");
            std::fs::create_dir_all(&dir).expect("workload dir");
            // Built under a private name, then renamed: test processes
            // running in parallel each build it, and none sees it half
            // written.
            let tmp = dir.join(format!("syscalls.{}", std::process::id()));
            let status = Command::new("gcc")
                .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
                .arg(&tmp)
                .arg(&src)
                .status()
                .expect("run gcc (install gcc and libc6-dev)");
            assert!(status.success(), "gcc failed on {}", src.display());
            let out = dir.join("syscalls");
            std::fs::rename(&tmp, &out).expect("install the workload binary");
            out
        })
        .clone()
}
