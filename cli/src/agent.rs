//! `hb psi` and `hb policy explain`: read the node agent's local API on
//! `agent.address`.
//!
//! The API is HTTP/1.1 with JSON over a unix socket; one request per
//! connection (`Connection: close`), so a blocking std client of a few
//! lines does here what an HTTP client crate with a unix connector would.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::table;

/// GETs `path` from the agent; returns the JSON body of a 2xx reply.
pub fn get(socket: &Path, path: &str) -> Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to the agent at {} (is hyperbox-nri running? agent.address in the config)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: hyperbox-agent\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("read the agent's reply")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed reply from the agent")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("reply without a status")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    if !(200..300).contains(&status) {
        bail!("agent answered {status}: {}", body.trim());
    }
    serde_json::from_str(&body).context("agent reply is not JSON")
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn pct(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |f| format!("{f:.2}%"))
}

fn size(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |b| table::bytes(b as i64))
}

/// `hb psi`.
pub fn psi(config: &hyperbox_config::Config, json: bool) -> Result<()> {
    let v = get(&config.agent.address, "/v1/psi")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "node (cgroups {}, memory {}):",
        v["cgroup_layout"].as_str().unwrap_or("?"),
        size(&v["mem_total"])
    );
    let mut rows = Vec::new();
    for r in ["memory", "cpu", "io"] {
        let p = &v["node"][r];
        rows.push(vec![
            r.to_string(),
            pct(&p["some"]["avg10"]),
            pct(&p["some"]["avg60"]),
            pct(&p["some"]["avg300"]),
            pct(&p["full"]["avg10"]),
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
    for c in v["containers"].as_array().into_iter().flatten() {
        let id = c["id"].as_str().unwrap_or("");
        rows.push(vec![
            id[..id.len().min(12)].to_string(),
            format!(
                "{}/{}",
                c["namespace"].as_str().unwrap_or(""),
                c["pod"].as_str().unwrap_or("")
            ),
            c["name"].as_str().unwrap_or("").to_string(),
            c["policy"].as_str().unwrap_or("").to_string(),
            size(&c["working_set"]),
            size(&c["limit"]),
            pct(&c["memory_some_avg10"]),
            pct(&c["memory_full_avg10"]),
            c["oom_kills"].to_string(),
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
    let v = get(
        &config.agent.address,
        &format!("/v1/containers/{container}"),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let c = &v["container"];
    println!("container  {}", c["id"].as_str().unwrap_or(""));
    println!(
        "pod        {}/{}  name {}",
        c["pod_namespace"].as_str().unwrap_or(""),
        c["pod"].as_str().unwrap_or(""),
        c["name"].as_str().unwrap_or("")
    );
    println!("workload   {}", c["workload"].as_str().unwrap_or(""));
    println!(
        "policy     {} (from {}), via {}",
        c["policy"].as_str().unwrap_or(""),
        c["policy_from"].as_str().unwrap_or(""),
        c["source"].as_str().unwrap_or("")
    );
    println!(
        "bounds     floor {}, ceiling {}",
        size(&c["bounds"]["floor"]),
        c["bounds"]["ceiling"]
            .as_u64()
            .map_or("none (user set no limit)".into(), |b| table::bytes(
                b as i64
            ))
    );
    println!("limit now  {}", size(&c["limit"]));
    let runs: Vec<String> = v["learned_runs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(size)
        .collect();
    println!(
        "learned    {} run(s): working set p95 {}, peak {}{}",
        runs.len(),
        size(&v["learned_working_set"]),
        size(&v["learned_peak"]),
        if runs.is_empty() {
            String::new()
        } else {
            format!(" [{}]", runs.join(", "))
        }
    );
    println!(
        "headroom   {:.2} now (node memory pressure {})",
        v["headroom_now"].as_f64().unwrap_or(0.0),
        pct(&v["node_memory_some_avg10"])
    );
    println!();
    let mut rows = Vec::new();
    for d in v["decisions"].as_array().into_iter().flatten() {
        rows.push(vec![
            d["at"].as_u64().map_or("-".into(), |t| t.to_string()),
            d["action"].as_str().unwrap_or("").to_string(),
            size(&d["from"]),
            size(&d["to"]),
            d["via"].as_str().unwrap_or("").to_string(),
            d["reason"].as_str().unwrap_or("").to_string(),
        ]);
    }
    print!(
        "{}",
        table::render(&["AT", "ACTION", "FROM", "TO", "VIA", "WHY"], &rows)
    );
    Ok(())
}

/// `hb trace <container> --follow`: prints the container's events as the
/// agent streams them (chunked HTTP, one JSON object per line).
fn follow(socket: &Path, container: &str, json: bool) -> Result<()> {
    use std::io::BufRead;
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connect to the agent at {}", socket.display()))?;
    write!(
        s,
        "GET /v1/containers/{container}/events HTTP/1.1\r\nHost: hyperbox-agent\r\n\r\n"
    )?;
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("reply without a status")?;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        chunked |= h
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    if code != 200 {
        let mut body = String::new();
        let _ = r.read_to_string(&mut body);
        bail!("agent answered {code}: {}", dechunk(&body).trim());
    }
    let mut out = std::io::stdout().lock();
    loop {
        let mut data = Vec::new();
        if chunked {
            let mut size = String::new();
            if r.read_line(&mut size)? == 0 {
                return Ok(());
            }
            let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
            if n == 0 {
                return Ok(());
            }
            data.resize(n, 0);
            r.read_exact(&mut data)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        } else if r.read_until(b'\n', &mut data)? == 0 {
            return Ok(());
        }
        for line in String::from_utf8_lossy(&data).lines() {
            if json {
                writeln!(out, "{line}")?;
                continue;
            }
            let v: Value = serde_json::from_str(line).unwrap_or_default();
            let e = &v["event"];
            let text = match e["kind"].as_str() {
                Some("exec") => {
                    let args: Vec<&str> = e["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str())
                        .collect();
                    format!(
                        "exec  pid {} {} [{}]",
                        e["pid"],
                        e["path"].as_str().unwrap_or(""),
                        args.join(" ")
                    )
                }
                Some("open") => format!(
                    "open  pid {} {} flags {:#o}",
                    e["pid"],
                    e["path"].as_str().unwrap_or(""),
                    e["flags"].as_u64().unwrap_or(0)
                ),
                Some("oom_kill") => format!("OOM   pid {} killed", e["pid"]),
                _ => line.to_string(),
            };
            writeln!(out, "{text}")?;
        }
        out.flush()?;
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
    let sock = &config.agent.address;
    let mut prev = get(sock, "/v1/top")?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        std::thread::sleep(interval);
        let now = get(sock, "/v1/top")?;
        let secs = (now["at_ms"].as_u64().unwrap_or(0) as f64
            - prev["at_ms"].as_u64().unwrap_or(0) as f64)
            / 1000.0;
        let before: std::collections::HashMap<&str, &Value> = prev["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["id"].as_str()?, c)))
            .collect();
        let mut rows = Vec::new();
        let mut out = Vec::new();
        for c in now["containers"].as_array().into_iter().flatten() {
            let id = c["id"].as_str().unwrap_or("");
            let delta = |k: &str| {
                let a = c[k].as_u64().unwrap_or(0);
                let b = before.get(id).and_then(|p| p[k].as_u64()).unwrap_or(a);
                a.saturating_sub(b) as f64 / secs.max(0.001)
            };
            // Between samples after the window nothing is counted: the
            // rate is the one the agent measured last.
            let sys = match (
                c["live"].as_bool(),
                c["counting"].as_bool(),
                c["syscall_rate"].as_f64(),
            ) {
                (Some(true), Some(false), Some(r)) => r,
                _ => delta("syscalls"),
            };
            let execs = delta("execs");
            out.push(serde_json::json!({
                "id": id,
                "name": c["name"],
                "live": c["live"],
                "syscalls_per_sec": sys,
                "execs_per_sec": execs,
                "syscalls": c["syscalls"],
                "opens": c["opens"],
                "oom_kills": c["oom_kills"],
                "flows": c["flows"],
                "open_flows": c["open_flows"],
                "bytes_in": c["bytes_in"],
                "bytes_out": c["bytes_out"],
                "ring_drops": c["ring_drops"],
                "sampled_out": c["sampled_out"],
            }));
            rows.push((
                sys,
                vec![
                    id[..id.len().min(12)].to_string(),
                    c["name"].as_str().unwrap_or("").to_string(),
                    if c["live"] == true {
                        "running"
                    } else {
                        "stopped"
                    }
                    .to_string(),
                    format!("{sys:.0}"),
                    format!("{execs:.1}"),
                    c["syscalls"].to_string(),
                    c["opens"].to_string(),
                    c["flows"].to_string(),
                    c["open_flows"].as_u64().unwrap_or(0).to_string(),
                    format!("{}/{}", size(&c["bytes_in"]), size(&c["bytes_out"])),
                    c["oom_kills"].to_string(),
                ],
            ));
        }
        if json {
            println!(
                "{}",
                serde_json::json!({"interval_secs": secs, "ring_drops": now["ring_drops"], "sampled": now["sampled"], "containers": out})
            );
        } else {
            rows.sort_by(|a, b| b.0.total_cmp(&a.0));
            if tty && !once {
                // Clear the screen and home the cursor.
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "hb top: every {secs:.1} s, ring buffer drops {}, opens sampled out {}",
                now["ring_drops"],
                now["sampled"].as_u64().unwrap_or(0)
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
    if follow_events {
        return follow(&config.agent.address, container, json);
    }
    let v = get(
        &config.agent.address,
        &format!("/v1/containers/{container}/trace"),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "container  {} ({}), {}",
        v["id"].as_str().unwrap_or(""),
        v["name"].as_str().unwrap_or(""),
        if v["live"] == true {
            "running"
        } else {
            "stopped"
        }
    );
    println!(
        "syscalls   {} calls, {} distinct; execs {}; opens {} ({} paths); OOM kills {}; lost to a full ring {}, opens sampled out {}",
        v["syscall_total"],
        v["syscalls"].as_object().map_or(0, |m| m.len()),
        v["exec_count"],
        v["open_count"],
        v["opened"].as_array().map_or(0, |a| a.len()),
        v["oom_killed"].as_array().map_or(0, |a| a.len()),
        v["ring_drops"],
        v["sampled_out"]
    );
    if let Some(r) = v["syscall_rate"].as_f64() {
        println!("           {r:.0} syscalls/s");
    }
    if v["syscall_window_closed"] == true {
        println!(
            "           syscalls and opens counted over its first tracing.syscall_window_secs \
             and in {} sample(s) since",
            v["syscall_samples"]
        );
    }
    println!();
    let mut rows: Vec<Vec<String>> = v["syscalls"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(nr, n)| vec![nr.clone(), n.to_string()])
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r[1].parse::<u64>().unwrap_or(0)));
    // The busiest fifteen for people; --json has them all.
    let more = rows.len().saturating_sub(15);
    rows.truncate(15);
    print!("{}", table::render(&["SYSCALL NR", "COUNT"], &rows));
    if more > 0 {
        println!("... {more} more (--json lists all)");
    }
    println!();
    let rows: Vec<Vec<String>> = v["execs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let args: Vec<&str> = e["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .collect();
            vec![
                e["pid"].to_string(),
                e["path"].as_str().unwrap_or("").to_string(),
                args.join(" "),
            ]
        })
        .collect();
    print!("{}", table::render(&["PID", "EXEC", "ARGS"], &rows));
    let opened: Vec<&str> = v["opened"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .collect();
    if !opened.is_empty() {
        println!("\nopened, in first-access order:");
        for p in opened {
            println!("  {p}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(super::dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
