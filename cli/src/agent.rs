//! `hb psi`, `hb policy explain`, `hb trace` and `hb top` (and, through
//! these helpers, `hb profile`): read the node
//! agent's local API on `agent.address` through `hyperbox_api::Client`,
//! whose answers are the agent's own types.
//!
//! `--json` prints the answer with its keys sorted (through
//! `serde_json::Value`), as `hb` always has, so scripts diffing the output
//! see no change.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;

use anyhow::{Context, Result, bail};
use hyperbox_api::Client;
use hyperbox_api::types::{EventLine, SeccompAction, SeccompDecision, TopRow, Trace, TraceEvent};
use serde::Serialize;

use crate::table;

/// Runs one call of the (async) client on a runtime of this thread.
pub(crate) fn block_on<F: Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    Ok(rt.block_on(f))
}

pub(crate) fn client(config: &hyperbox_config::Config) -> Client {
    Client::new(&config.agent.address)
}

/// Prints `v` as pretty JSON with sorted keys.
pub(crate) fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::to_value(v)?)?
    );
    Ok(())
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |f| format!("{f:.2}%"))
}

fn size(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| table::bytes(b as i64))
}

/// The first 12 bytes of an id, cut back to a character boundary (ids
/// come from the agent as sent by its callers, not always ASCII).
pub(crate) fn short(id: &str) -> &str {
    &id[..id.floor_char_boundary(12)]
}

/// `hb psi`.
pub fn psi(config: &hyperbox_config::Config, json: bool) -> Result<()> {
    let v = block_on(client(config).psi())??;
    if json {
        return print_json(&v);
    }
    println!(
        "node (cgroups {}, memory {}):",
        v.cgroup_layout,
        size(Some(v.mem_total))
    );
    let mut rows = Vec::new();
    for (r, p) in [
        ("memory", v.node.memory),
        ("cpu", v.node.cpu),
        ("io", v.node.io),
    ] {
        rows.push(vec![
            r.to_string(),
            pct(Some(p.some.avg10)),
            pct(Some(p.some.avg60)),
            pct(Some(p.some.avg300)),
            pct(p.full.map(|f| f.avg10)),
        ]);
    }
    print!(
        "{}",
        table::render(
            &["RESOURCE", "SOME10", "SOME60", "SOME300", "FULL10"],
            &rows
        )
    );
    println!();
    let mut rows = Vec::new();
    for c in &v.containers {
        rows.push(vec![
            short(&c.id).to_string(),
            format!("{}/{}", c.namespace, c.pod),
            c.name.clone(),
            c.policy.as_str().to_string(),
            size(c.working_set),
            size(c.limit),
            pct(c.memory_some_avg10),
            pct(c.memory_full_avg10),
            c.oom_kills.to_string(),
        ]);
    }
    print!(
        "{}",
        table::render(
            &[
                "CONTAINER",
                "POD",
                "NAME",
                "POLICY",
                "WORKING SET",
                "LIMIT",
                "MEM SOME10",
                "MEM FULL10",
                "OOM"
            ],
            &rows
        )
    );
    Ok(())
}

/// `hb policy explain <container>`.
pub fn explain(config: &hyperbox_config::Config, container: &str, json: bool) -> Result<()> {
    if container.is_empty() || container.contains(['/', '?', '#', ' ']) {
        bail!("{container:?} is not a container id, id prefix or name");
    }
    let v = block_on(client(config).explain(container))??;
    if json {
        return print_json(&v);
    }
    let c = &v.container;
    println!("container  {}", c.id);
    println!("pod        {}/{}  name {}", c.pod_namespace, c.pod, c.name);
    println!("workload   {}", c.workload);
    println!(
        "policy     {} (from {}), via {}",
        c.policy.as_str(),
        c.policy_from.as_str(),
        c.source.as_str()
    );
    println!(
        "bounds     floor {}, ceiling {}",
        size(Some(c.bounds.floor)),
        c.bounds
            .ceiling
            .map_or("none (user set no limit)".into(), |b| table::bytes(
                b as i64
            ))
    );
    println!("limit now  {}", size(c.limit));
    let runs: Vec<String> = v.learned_runs.iter().map(|r| size(Some(*r))).collect();
    println!(
        "learned    {} run(s): working set p95 {}, peak {}{}",
        runs.len(),
        size(v.learned_working_set),
        size(v.learned_peak),
        if runs.is_empty() {
            String::new()
        } else {
            format!(" [{}]", runs.join(", "))
        }
    );
    println!(
        "headroom   {:.2} now (node memory pressure {})",
        v.headroom_now,
        pct(Some(v.node_memory_some_avg10))
    );
    for line in seccomp_lines(v.seccomp.as_ref(), &c.workload) {
        println!("{line}");
    }
    println!();
    let rows: Vec<Vec<String>> = v
        .decisions
        .iter()
        .map(|d| {
            vec![
                d.at.to_string(),
                d.action.as_str().to_string(),
                size(d.from),
                size(d.to),
                d.via.as_str().to_string(),
                d.reason.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["AT", "ACTION", "FROM", "TO", "VIA", "WHY"], &rows)
    );
    Ok(())
}

/// The seccomp decision's lines of `hb policy explain`, aligned with the
/// memory ones; `workload` is the container's, to name the profile's only
/// when it differs.
fn seccomp_lines(d: Option<&SeccompDecision>, workload: &str) -> Vec<String> {
    let Some(d) = d else {
        return vec!["seccomp    off (or the container stopped, or an older agent)".into()];
    };
    let action = match d.action {
        SeccompAction::Install => format!("install, {} syscalls allowed", d.allowed),
        SeccompAction::Keep => "keep the runtime's profile".into(),
    };
    let mut lines = vec![format!(
        "seccomp    {} (configured {}), {action}",
        d.mode.as_str(),
        d.configured.as_str()
    )];
    if !d.workload.is_empty() && d.workload != workload {
        lines.push(format!("           profile of workload {}", d.workload));
    }
    if !d.reason.is_empty() {
        lines.push(format!("           {}", d.reason));
    }
    lines
}

/// One streamed line for people; `None` for those shown as their JSON.
fn event_text(line: &EventLine) -> Option<String> {
    let EventLine::Event(e) = line else {
        return None;
    };
    match &e.event {
        TraceEvent::Exec(x) => Some(format!(
            "exec  pid {} {} [{}]",
            x.pid,
            x.path,
            x.args.join(" ")
        )),
        TraceEvent::Open { pid, path, flags } => {
            Some(format!("open  pid {pid} {path} flags {flags:#o}"))
        }
        TraceEvent::OomKill { pid } => Some(format!("OOM   pid {pid} killed")),
        TraceEvent::Flow(_) => None,
        TraceEvent::Seccomp(r) => Some(format!(
            "SECCOMP {} {} ({}) pid {} {} [{}]",
            r.outcome,
            r.syscall,
            r.arch,
            r.pid,
            r.comm,
            r.mode.as_str()
        )),
    }
}

/// `hb trace <container> --follow`: prints the container's events as the
/// agent streams them.
async fn follow(client: Client, container: &str, json: bool) -> Result<()> {
    let mut events = client.events(container).await?;
    while let Some(line) = events.next().await? {
        let text = match event_text(&line) {
            Some(text) if !json => text,
            _ => serde_json::to_string(&line)?,
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")?;
        out.flush()?;
    }
    Ok(())
}

/// What `hb top` shows of one container over an interval.
struct Rates {
    syscalls: f64,
    execs: f64,
}

fn rates(now: &TopRow, before: Option<&TopRow>, secs: f64) -> Rates {
    let delta = |f: fn(&TopRow) -> u64| {
        let a = f(now);
        let b = before.map_or(a, f);
        a.saturating_sub(b) as f64 / secs.max(0.001)
    };
    // Between samples after the window nothing is counted: the rate is
    // the one the agent measured last.
    let syscalls = match (now.live, now.counting, now.syscall_rate) {
        (true, false, Some(r)) => r,
        _ => delta(|r| r.syscalls),
    };
    Rates {
        syscalls,
        execs: delta(|r| r.execs),
    }
}

/// `hb top`: traced containers with their syscall rate, refreshed every
/// `interval` (or once, after one interval, with `once`).
pub fn top(
    config: &hyperbox_config::Config,
    interval: std::time::Duration,
    once: bool,
    json: bool,
) -> Result<()> {
    let client = client(config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let mut prev = rt.block_on(client.top())?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        std::thread::sleep(interval);
        let now = rt.block_on(client.top())?;
        let secs = (now.at_ms as f64 - prev.at_ms as f64) / 1000.0;
        let before: HashMap<&str, &TopRow> =
            prev.containers.iter().map(|c| (c.id.as_str(), c)).collect();
        let mut rows = Vec::new();
        let mut out = Vec::new();
        for c in &now.containers {
            let r = rates(c, before.get(c.id.as_str()).copied(), secs);
            out.push(serde_json::json!({
                "id": c.id,
                "name": c.name,
                "live": c.live,
                "syscalls_per_sec": r.syscalls,
                "execs_per_sec": r.execs,
                "syscalls": c.syscalls,
                "opens": c.opens,
                "oom_kills": c.oom_kills,
                "flows": c.flows,
                "open_flows": c.open_flows,
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
                "ring_drops": c.ring_drops,
                "sampled_out": c.sampled_out,
            }));
            rows.push((
                r.syscalls,
                vec![
                    short(&c.id).to_string(),
                    c.name.clone(),
                    if c.live { "running" } else { "stopped" }.to_string(),
                    format!("{:.0}", r.syscalls),
                    format!("{:.1}", r.execs),
                    c.syscalls.to_string(),
                    c.opens.to_string(),
                    c.flows.to_string(),
                    c.open_flows.to_string(),
                    format!("{}/{}", size(Some(c.bytes_in)), size(Some(c.bytes_out))),
                    c.oom_kills.to_string(),
                ],
            ));
        }
        if json {
            println!(
                "{}",
                serde_json::json!({"interval_secs": secs, "ring_drops": now.ring_drops, "sampled": now.sampled, "containers": out})
            );
        } else {
            rows.sort_by(|a, b| b.0.total_cmp(&a.0));
            if tty && !once {
                // Clear the screen and home the cursor.
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "hb top: every {secs:.1} s, ring buffer drops {}, opens sampled out {}",
                now.ring_drops, now.sampled
            );
            let rows: Vec<Vec<String>> = rows.into_iter().map(|(_, r)| r).collect();
            print!(
                "{}",
                table::render(
                    &[
                        "CONTAINER",
                        "NAME",
                        "STATE",
                        "SYSCALLS/S",
                        "EXECS/S",
                        "SYSCALLS",
                        "OPENS",
                        "TCP CLOSED",
                        "TCP OPEN",
                        "IN/OUT",
                        "OOM"
                    ],
                    &rows
                )
            );
        }
        if once {
            return Ok(());
        }
        prev = now;
    }
}

/// The syscall table of `hb trace`: its header and rows, busiest first
/// (ties in the order of the keys as text, as the JSON object lists them).
/// By name; by number from an agent that sends no names.
fn syscall_rows(v: &Trace) -> (&'static str, Vec<Vec<String>>) {
    let (header, mut rows): (_, Vec<(u64, String)>) = if v.syscall_names.is_empty() {
        (
            "SYSCALL NR",
            v.syscalls
                .iter()
                .map(|(nr, n)| (*n, nr.to_string()))
                .collect(),
        )
    } else {
        (
            "SYSCALL",
            v.syscall_names
                .iter()
                .map(|(name, n)| (*n, name.clone()))
                .collect(),
        )
    };
    rows.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let rows = rows
        .into_iter()
        .map(|(n, key)| vec![key, n.to_string()])
        .collect();
    (header, rows)
}

/// `hb trace <container>`: what the eBPF tracer saw of a container.
pub fn trace(
    config: &hyperbox_config::Config,
    container: &str,
    json: bool,
    follow_events: bool,
) -> Result<()> {
    if container.is_empty() || container.contains(['/', '?', '#', ' ']) {
        bail!("{container:?} is not a container id or id prefix");
    }
    let client = client(config);
    if follow_events {
        return block_on(follow(client, container, json))?;
    }
    let v = block_on(client.trace(container))??;
    if json {
        return print_json(&v);
    }
    println!(
        "container  {} ({}), {}",
        v.id,
        v.name,
        if v.live { "running" } else { "stopped" }
    );
    println!(
        "syscalls   {} calls, {} distinct; execs {}; opens {} ({} paths); OOM kills {}; lost to a full ring {}, opens sampled out {}",
        v.syscall_total,
        v.syscalls.len(),
        v.exec_count,
        v.open_count,
        v.opened.len(),
        v.oom_killed.len(),
        v.ring_drops,
        v.sampled_out
    );
    if let Some(r) = v.syscall_rate {
        println!("           {r:.0} syscalls/s");
    }
    if v.syscall_window_closed {
        println!(
            "           syscalls and opens counted over its first tracing.syscall_window_secs \
             and in {} sample(s) since",
            v.syscall_samples
        );
    }
    println!();
    let (header, mut rows) = syscall_rows(&v);
    // The busiest fifteen for people; --json has them all.
    let more = rows.len().saturating_sub(15);
    rows.truncate(15);
    print!("{}", table::render(&[header, "COUNT"], &rows));
    if more > 0 {
        println!("... {more} more (--json lists all)");
    }
    println!();
    let rows: Vec<Vec<String>> = v
        .execs
        .iter()
        .map(|e| vec![e.pid.to_string(), e.path.clone(), e.args.join(" ")])
        .collect();
    print!("{}", table::render(&["PID", "EXEC", "ARGS"], &rows));
    if !v.opened.is_empty() {
        println!("\nopened, in first-access order:");
        for p in &v.opened {
            println!("  {p}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use hyperbox_api::types::{ContainerEvent, Exec, StreamNote};

    use super::*;

    #[test]
    fn ids_are_shortened_on_character_boundaries() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
        // Byte 12 falls inside the sixth 'é'.
        assert_eq!(
            short("a\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}x"),
            "a\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}"
        );
    }

    fn row(syscalls: u64, execs: u64, live: bool, counting: bool) -> TopRow {
        TopRow {
            id: "c".into(),
            name: "n".into(),
            live,
            cgroup: 1,
            syscalls,
            counting,
            syscall_rate: Some(7.0),
            execs,
            opens: 0,
            oom_kills: 0,
            flows: 0,
            bytes_in: 0,
            bytes_out: 0,
            open_flows: 0,
            ring_drops: 0,
            sampled_out: 0,
        }
    }

    #[test]
    fn top_rates_are_deltas_or_the_agents_last_sample() {
        let r = rates(
            &row(300, 4, true, true),
            Some(&row(100, 2, true, true)),
            2.0,
        );
        assert_eq!((r.syscalls, r.execs), (100.0, 1.0));
        // A container first seen now has no rate yet.
        assert_eq!(rates(&row(300, 4, true, true), None, 2.0).syscalls, 0.0);
        // Not counted between samples: the agent's measured rate.
        let r = rates(
            &row(300, 4, true, false),
            Some(&row(300, 4, true, false)),
            2.0,
        );
        assert_eq!(r.syscalls, 7.0);
    }

    #[test]
    fn followed_events_read_for_people() {
        let ev = |event| {
            EventLine::Event(ContainerEvent {
                container: "c".into(),
                event,
            })
        };
        let exec = ev(TraceEvent::Exec(Exec {
            pid: 42,
            time_ns: 1,
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into()],
        }));
        assert_eq!(event_text(&exec).unwrap(), "exec  pid 42 /bin/sh [sh -c]");
        let open = ev(TraceEvent::Open {
            pid: 1,
            path: "/etc/hosts".into(),
            flags: 0o2000,
        });
        assert_eq!(
            event_text(&open).unwrap(),
            "open  pid 1 /etc/hosts flags 0o2000"
        );
        let seccomp = ev(TraceEvent::Seccomp(hyperbox_api::types::SeccompReport {
            at: 1,
            container: "c".into(),
            workload: "ns/w@1".into(),
            mode: hyperbox_config::SeccompMode::Enforce,
            syscall: "ptrace".into(),
            nr: 101,
            arch: "x86_64".into(),
            outcome: "denied".into(),
            pid: 7,
            comm: "strace".into(),
        }));
        assert_eq!(
            event_text(&seccomp).unwrap(),
            "SECCOMP denied ptrace (x86_64) pid 7 strace [enforce]"
        );
        let lagged = EventLine::Note(StreamNote::Lagged { missed: 3 });
        assert_eq!(event_text(&lagged), None);
    }

    fn trace_of(names: &str) -> Trace {
        let text = format!(
            r#"{{"id":"c","name":"n","cgroup":1,"live":true,"syscalls":{{"0":5,"1":9,"231":1}},
            {names}"syscall_total":15,"syscall_window_closed":false,"syscall_rate":null,
            "syscall_samples":0,"execs":[],"exec_count":0,"opened":[],"open_count":0,
            "oom_killed":[],"flows":[],"flow_count":0,"bytes_in":0,"bytes_out":0,
            "ring_drops":0,"sampled_out":0}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn trace_lists_syscalls_by_name_or_by_number_from_an_older_agent() {
        let t = trace_of(r#""syscall_names":{"read":5,"write":9,"exit_group":1,"x86:read":1},"#);
        let (header, rows) = syscall_rows(&t);
        assert_eq!(header, "SYSCALL");
        let keys: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(keys, ["write", "read", "exit_group", "x86:read"]);
        assert_eq!(rows[0][1], "9");
        let (header, rows) = syscall_rows(&trace_of(""));
        assert_eq!(header, "SYSCALL NR");
        let keys: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(keys, ["1", "0", "231"]);
    }

    #[test]
    fn explain_shows_the_seccomp_decision() {
        use hyperbox_config::SeccompMode;
        let d = SeccompDecision {
            configured: SeccompMode::Auto,
            mode: SeccompMode::Enforce,
            action: SeccompAction::Install,
            profile: None,
            workload: "ns/w@1".into(),
            allowed: 143,
            reason: "stable for 5 runs".into(),
        };
        assert_eq!(
            seccomp_lines(Some(&d), "ns/w@1"),
            [
                "seccomp    enforce (configured auto), install, 143 syscalls allowed",
                "           stable for 5 runs"
            ]
        );
        let keep = SeccompDecision {
            mode: SeccompMode::Learn,
            action: SeccompAction::Keep,
            allowed: 0,
            reason: String::new(),
            ..d
        };
        assert_eq!(
            seccomp_lines(Some(&keep), "other"),
            [
                "seccomp    learn (configured auto), keep the runtime's profile",
                "           profile of workload ns/w@1"
            ]
        );
        assert!(seccomp_lines(None, "w")[0].starts_with("seccomp    off"));
    }
}
