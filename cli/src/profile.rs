//! `hb profile`: the seccomp profiles the agent learned per workload, read
//! and steered through its local API (`/v1/profiles`).
//!
//! Workload keys hold `/`, `@` and `:`, so they travel as percent-encoded
//! query values (`hyperbox_api::endpoints`), never as path segments.

use anyhow::{Result, bail};
use hyperbox_api::client::Error as ClientError;
use hyperbox_api::time::rfc3339;
use hyperbox_api::types::{ProfileDetail, ProfileDiff, ProfileSummary, SeccompReport, SetMode};
use hyperbox_config::SeccompMode;

use crate::agent::{block_on, client, print_json, short};
use crate::table;

/// The words `hb profile set-mode` takes.
const MODES: &str = "off, learn, complain, enforce, auto, clear";

/// The profile formats the agent renders.
pub const FORMATS: [&str; 3] = ["oci", "localhost", "spo"];

/// `set-mode`'s MODE: a mode, or `clear` (`None`: back to the annotation
/// or `seccomp.default_mode`).
fn parse_mode(s: &str) -> Result<Option<SeccompMode>> {
    if s == "clear" {
        return Ok(None);
    }
    match SeccompMode::parse(s) {
        Some(m) if m.as_str() == s => Ok(Some(m)),
        _ => bail!("unknown seccomp mode {s:?}: use one of {MODES}"),
    }
}

fn check_workload(w: &str) -> Result<()> {
    if w.trim().is_empty() {
        bail!("no workload given (hb profile ls lists them)");
    }
    Ok(())
}

/// The agent's error, with its own words alone when it answered 404 (the
/// request's encoded path would only obscure them), and where to find the
/// workload keys when it names one it does not know.
fn agent_error(e: ClientError) -> anyhow::Error {
    match &e {
        ClientError::Status { message, .. } if e.is_not_found() && !message.is_empty() => {
            anyhow::anyhow!(not_found(message))
        }
        _ => e.into(),
    }
}

fn not_found(message: &str) -> String {
    if message.starts_with("no profile learned for workload") {
        format!("{message} (hb profile ls lists the learned ones)")
    } else {
        message.to_string()
    }
}

fn when(secs: u64) -> String {
    if secs == 0 { "-".into() } else { rfc3339(secs) }
}

fn state(s: &ProfileSummary) -> String {
    match s.enforcing_since {
        Some(t) => format!("enforcing since {}", when(t)),
        None => "learning".into(),
    }
}

fn mode(s: &ProfileSummary) -> &'static str {
    s.mode.map_or("-", SeccompMode::as_str)
}

/// The table of `hb profile ls`, by workload.
fn ls_table(list: &[ProfileSummary]) -> String {
    let mut list: Vec<&ProfileSummary> = list.iter().collect();
    list.sort_by(|a, b| a.workload.cmp(&b.workload));
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.workload.clone(),
                mode(s).to_string(),
                state(s),
                s.syscalls.to_string(),
                s.runs.to_string(),
                s.stable_runs.to_string(),
                s.review.to_string(),
            ]
        })
        .collect();
    table::render(
        &[
            "WORKLOAD", "MODE", "STATE", "SYSCALLS", "RUNS", "STABLE", "REVIEW",
        ],
        &rows,
    )
}

/// `hb profile ls`.
pub fn ls(config: &hyperbox_config::Config, json: bool) -> Result<()> {
    let list: Vec<ProfileSummary> = block_on(client(config).profiles())?.map_err(agent_error)?;
    if json {
        return print_json(&list);
    }
    if list.is_empty() {
        println!(
            "no profiles learned yet: run containers with seccomp.hyperbox.dev/mode=learn \
             (or set seccomp.default_mode)"
        );
        return Ok(());
    }
    print!("{}", ls_table(&list));
    Ok(())
}

/// How many of the latest reports `hb profile show` prints.
const REPORTS_SHOWN: usize = 10;

/// The human header of `hb profile show`.
fn show_header(d: &ProfileDetail) -> String {
    let s = &d.summary;
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!("workload   {}", s.workload));
    line(format!(
        "mode       {}",
        s.mode.map_or(
            "- (no override: the annotation or seccomp.default_mode)".into(),
            |m| format!("{} (hb profile set-mode)", m.as_str())
        )
    ));
    line(format!("state      {}", state(s)));
    line(format!(
        "runs       {}, the last {} in a row added nothing",
        s.runs, s.stable_runs
    ));
    line(format!(
        "syscalls   {} ({} 64-bit, {} 32-bit); first learned {}, last grew {}",
        s.syscalls,
        d.syscalls.len(),
        d.compat.len(),
        when(s.first_learned),
        when(s.grown_at)
    ));
    if d.review.is_empty() {
        line("review     none".into());
    } else {
        let mut review: Vec<(&String, &u64)> = d.review.iter().collect();
        review.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        let items: Vec<String> = review.iter().map(|(n, c)| format!("{n} ({c})")).collect();
        line(format!(
            "review     {} reported outside the profile, not learned: {}",
            review.len(),
            items.join(", ")
        ));
    }
    if !d.reports.is_empty() {
        let skip = d.reports.len().saturating_sub(REPORTS_SHOWN);
        line(String::new());
        line(if skip > 0 {
            format!("latest reports ({skip} earlier, --json lists all):")
        } else {
            "latest reports:".into()
        });
        out.push_str(&reports_table(&d.reports[skip..]));
    }
    out
}

fn reports_table(reports: &[SeccompReport]) -> String {
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                when(r.at),
                short(&r.container).to_string(),
                r.syscall.clone(),
                r.outcome.clone(),
                r.comm.clone(),
            ]
        })
        .collect();
    table::render(&["TIME", "CONTAINER", "SYSCALL", "OUTCOME", "COMM"], &rows)
}

/// `hb profile show`. With `format` (and not `json`) only the profile
/// document, so the output can be saved as a Localhost profile or applied
/// with kubectl.
pub fn show(
    config: &hyperbox_config::Config,
    workload: &str,
    format: Option<&str>,
    json: bool,
) -> Result<()> {
    check_workload(workload)?;
    if let Some(f) = format
        && !FORMATS.contains(&f)
    {
        bail!("unknown format {f:?}: use one of {}", FORMATS.join(", "));
    }
    let d: ProfileDetail = block_on(client(config).profile(workload, format.unwrap_or("oci")))?
        .map_err(agent_error)?;
    if json {
        return print_json(&d);
    }
    let doc = serde_json::to_string_pretty(&d.profile)?;
    if format.is_some() {
        println!("{doc}");
        return Ok(());
    }
    print!("{}", show_header(&d));
    println!("\nprofile (oci; --format localhost or spo prints only the file to save or apply):");
    println!("{doc}");
    Ok(())
}

/// The lines of `hb profile diff`.
fn diff_text(d: &ProfileDiff) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            format!("{} ({})", v.join(", "), v.len())
        }
    };
    format!(
        "only in {}: {}\nonly in {}: {}\nin both: {}\n",
        d.a,
        list(&d.only_a),
        d.b,
        list(&d.only_b),
        d.both
    )
}

/// `hb profile diff A [B]` (`B`: `default`, the runtime's default profile).
pub fn diff(config: &hyperbox_config::Config, a: &str, b: &str, json: bool) -> Result<()> {
    check_workload(a)?;
    check_workload(b)?;
    let d: ProfileDiff = block_on(client(config).profile_diff(a, b))?.map_err(agent_error)?;
    if json {
        return print_json(&d);
    }
    print!("{}", diff_text(&d));
    Ok(())
}

/// `hb profile set-mode WORKLOAD MODE`.
pub fn set_mode(
    config: &hyperbox_config::Config,
    workload: &str,
    mode: &str,
    json: bool,
) -> Result<()> {
    check_workload(workload)?;
    let mode = parse_mode(mode)?;
    let body = SetMode {
        workload: workload.to_string(),
        mode,
    };
    block_on(client(config).set_profile_mode(&body))?.map_err(agent_error)?;
    if json {
        return print_json(&body);
    }
    match mode {
        Some(m) => println!(
            "{workload}: seccomp mode {} from its next container",
            m.as_str()
        ),
        None => println!(
            "{workload}: override cleared; the annotation or seccomp.default_mode decides \
             from its next container"
        ),
    }
    Ok(())
}

/// `hb profile forget WORKLOAD`.
pub fn forget(config: &hyperbox_config::Config, workload: &str) -> Result<()> {
    check_workload(workload)?;
    block_on(client(config).forget_profile(workload))?.map_err(agent_error)?;
    println!("{workload}: learned profile forgotten");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn modes_are_the_annotation_words_or_clear() {
        assert_eq!(parse_mode("enforce").unwrap(), Some(SeccompMode::Enforce));
        assert_eq!(parse_mode("off").unwrap(), Some(SeccompMode::Off));
        assert_eq!(parse_mode("auto").unwrap(), Some(SeccompMode::Auto));
        assert_eq!(parse_mode("clear").unwrap(), None);
        let err = parse_mode("enforcing").unwrap_err().to_string();
        assert!(err.contains("\"enforcing\""), "{err}");
        assert!(err.contains(MODES), "{err}");
        // Exact words only: what is accepted is what the agent stores.
        assert!(parse_mode(" learn").is_err());
        assert!(parse_mode("").is_err());
    }

    fn summary(workload: &str, mode: Option<SeccompMode>, since: Option<u64>) -> ProfileSummary {
        ProfileSummary {
            workload: workload.into(),
            mode,
            enforcing_since: since,
            syscalls: 143,
            runs: 7,
            stable_runs: 5,
            first_learned: 1_709_200_000,
            grown_at: 1_709_208_000,
            review: 1,
        }
    }

    #[test]
    fn ls_shows_mode_override_and_state() {
        let t = ls_table(&[
            summary("z/web@1", Some(SeccompMode::Enforce), Some(1_709_208_000)),
            summary("a/db@2", None, None),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("WORKLOAD  MODE     STATE"), "{t}");
        // Sorted by workload.
        assert!(lines[1].starts_with("a/db@2   "), "{t}");
        assert!(lines[1].contains(" -        learning "), "{t}");
        assert!(
            lines[2].contains("enforce  enforcing since 2024-02-29T12:00:00Z  143"),
            "{t}"
        );
    }

    fn report(at: u64, syscall: &str) -> SeccompReport {
        SeccompReport {
            at,
            container: "0123456789abcdef".into(),
            workload: "ns/w@1".into(),
            mode: SeccompMode::Complain,
            syscall: syscall.into(),
            nr: 101,
            arch: "x86_64".into(),
            outcome: "allowed".into(),
            pid: 42,
            comm: "strace".into(),
        }
    }

    #[test]
    fn show_header_names_review_counts_and_latest_reports() {
        let d = ProfileDetail {
            summary: summary("ns/w@1", Some(SeccompMode::Complain), None),
            syscalls: vec!["read".into(), "write".into()],
            compat: vec!["x86:read".into()],
            review: BTreeMap::from([("mount".to_string(), 1), ("ptrace".to_string(), 3)]),
            reports: (0..12)
                .map(|i| report(1_709_208_000 + i, &format!("s{i}")))
                .collect(),
            profile: serde_json::json!({"defaultAction": "SCMP_ACT_LOG"}),
        };
        let h = show_header(&d);
        assert!(h.contains("workload   ns/w@1\n"), "{h}");
        assert!(
            h.contains("mode       complain (hb profile set-mode)\n"),
            "{h}"
        );
        assert!(
            h.contains("runs       7, the last 5 in a row added nothing"),
            "{h}"
        );
        assert!(h.contains("syscalls   143 (2 64-bit, 1 32-bit)"), "{h}");
        // Most reported first.
        assert!(
            h.contains(
                "review     2 reported outside the profile, not learned: ptrace (3), mount (1)\n"
            ),
            "{h}"
        );
        assert!(
            h.contains("latest reports (2 earlier, --json lists all):"),
            "{h}"
        );
        assert!(!h.contains(" s1 "), "{h}");
        assert!(
            h.contains("2024-02-29T12:00:11Z  0123456789ab  s11      allowed  strace"),
            "{h}"
        );
    }

    #[test]
    fn diff_lists_each_side_and_counts_both() {
        let d = ProfileDiff {
            a: "ns/w@1".into(),
            b: "default".into(),
            only_a: vec!["io_uring_setup".into()],
            only_b: vec![],
            both: 140,
        };
        assert_eq!(
            diff_text(&d),
            "only in ns/w@1: io_uring_setup (1)\nonly in default: (none)\nin both: 140\n"
        );
    }

    #[test]
    fn a_404_reads_as_the_agents_words() {
        assert_eq!(
            not_found("no profile learned for workload \"x/y\""),
            "no profile learned for workload \"x/y\" (hb profile ls lists the learned ones)"
        );
        // `default` is no workload: the agent's words say what to do.
        let m = "the runtime's default profile has not been seen yet (run a container with it)";
        assert_eq!(not_found(m), m);
    }
}
