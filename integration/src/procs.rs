//! Process lookups through `/proc`, used to find and end what a containerd
//! instance started (shims and their containers) even after containerd itself
//! is gone.

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One entry of `/proc`.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Command name from `stat` (known even for zombies).
    pub comm: String,
    /// State letter from `stat` (`R`, `S`, `Z`, …).
    pub state: char,
    /// Arguments, split at NUL.
    pub cmdline: Vec<String>,
}

/// Every process visible in `/proc` right now.
pub fn all() -> Vec<ProcInfo> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read)
        .collect()
}

/// Reads one process; `None` if it has exited meanwhile.
pub fn read(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces and ')'.
    let close = stat.rfind(')')?;
    let comm = stat[stat.find('(')? + 1..close].to_string();
    let mut rest = stat[close + 2..].split(' ');
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    Some(ProcInfo {
        pid,
        ppid,
        comm,
        state,
        cmdline,
    })
}

/// Processes whose arguments contain `needle` as one whole argument.
pub fn with_arg(needle: &str) -> Vec<ProcInfo> {
    all()
        .into_iter()
        .filter(|p| p.cmdline.iter().any(|a| a == needle))
        .collect()
}

/// All descendants of `root` (not `root` itself), deepest last.
pub fn descendants(root: i32) -> Vec<i32> {
    let procs = all();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in procs.iter().filter(|c| c.ppid == p) {
            out.push(c.pid);
            frontier.push(c.pid);
        }
    }
    out
}

/// SIGKILLs `pids` and waits up to `timeout` for them to disappear.
pub fn kill_and_wait(pids: &[i32], timeout: Duration) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Makes this process the reaper of its orphaned descendants.
///
/// containerd's shims daemonize; their orphaned processes go to the nearest
/// subreaper, else to PID 1, and not every PID 1 reaps (this workplace's does
/// not). Becoming the subreaper lets teardown reap them with
/// [`reap_zombie_children`].
pub fn become_subreaper() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// Reaps our zombie children whose command name starts with `prefix`.
/// Only such named children are waited for, so the exit status of a child
/// that some `std::process::Child` owns is never stolen.
pub fn reap_zombie_children(prefix: &str) {
    let me = std::process::id() as i32;
    for p in all() {
        if p.ppid == me && p.state == 'Z' && p.comm.starts_with(prefix) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(p.pid), None);
        }
    }
}

/// Sends `signal` to a daemon the harness started and waits for it to
/// exit; one still running after 15 s (stuck, say, on a read its own lazy
/// path holds) is killed, so no test leaves it behind.
pub fn stop_child(child: &mut Option<std::process::Child>, signal: Signal, name: &str) {
    if let Some(mut c) = child.take() {
        let _ = kill(Pid::from_raw(c.id() as i32), signal);
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(c.try_wait(), Ok(None)) {
            eprintln!("{name} ignored {signal}; killing it");
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}
