//! The memory controller: samples the node's and each container's pressure
//! and usage every `sample_interval_secs` (or at once when a PSI trigger
//! fires), decides raises and lowers for adaptive containers, applies them
//! (NRI `UpdateContainers` for CRI containers, a direct cgroup write for
//! the rest or when the runtime refuses), and saves what each finished run
//! taught.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyperbox_config::MemoryPolicy;
use tokio::sync::mpsc;

use crate::agent::{Agent, Decision, Job, Source};
use crate::memory::policy::{self, Action, Running};
use crate::nri::api;
use crate::psi::history::Sample;
use crate::psi::trigger::{Fired, Trigger};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the controller forever.
pub async fn run(agent: Arc<Agent>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let node_trigger = arm_node_trigger(&agent);
    loop {
        let interval = Duration::from_secs(agent.memory_config().sample_interval_secs);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.wake.notified() => {}
            Some(job) = jobs.recv() => {
                handle(&agent, job).await;
                continue;
            }
            fired = wait_trigger(node_trigger.as_ref()) => {
                if fired == Fired::Pressure {
                    agent.metrics.trigger_wakeups.inc();
                }
            }
        }
        tick(&agent).await;
    }
}

async fn wait_trigger(t: Option<&Trigger>) -> Fired {
    match t {
        Some(t) => t.wait().await,
        None => std::future::pending().await,
    }
}

fn arm_node_trigger(agent: &Agent) -> Option<Trigger> {
    let cfg = agent.memory_config();
    match Trigger::arm(
        Path::new("/proc/pressure/memory"),
        Duration::from_millis(cfg.trigger_stall_ms),
        Duration::from_millis(cfg.trigger_window_ms),
    ) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "no node PSI trigger; sampling only");
            None
        }
    }
}

async fn handle(agent: &Agent, job: Job) {
    match job {
        Job::Finished { workload, peak } => {
            let saved = agent
                .store
                .lock()
                .expect("store")
                .record_run(&workload, peak);
            match saved {
                Ok(()) => {
                    tracing::info!(workload = %workload, peak = %policy::bytes(peak), "learned a run's working set")
                }
                Err(e) => {
                    tracing::error!(workload = %workload, error = %crate::error_chain(&e), "could not save what was learned")
                }
            }
        }
    }
}

/// One pass: node pressure, then every container.
pub async fn tick(agent: &Arc<Agent>) {
    sample_node(agent);
    let ids: Vec<String> = agent
        .containers
        .lock()
        .expect("containers")
        .keys()
        .cloned()
        .collect();
    for id in ids {
        sample_container(agent, &id);
        if let Some((update, decision)) = decide(agent, &id) {
            apply(agent, &id, update, decision).await;
        }
    }
}

fn sample_node(agent: &Agent) {
    let read = |r: &str| crate::psi::read(Path::new(&format!("/proc/pressure/{r}")));
    let (m, c, i) = (read("memory"), read("cpu"), read("io"));
    let mut node = agent.node.lock().expect("node");
    match (m, c, i) {
        (Ok(m), Ok(c), Ok(i)) => {
            node.0 = crate::agent::Node {
                memory: m,
                cpu: c,
                io: i,
                at: unix_now(),
            };
            let at = node.0.at;
            node.1.push(Sample {
                at,
                memory_some: m.some.avg10,
                memory_full: m.full.map(|f| f.avg10).unwrap_or(0.0),
                usage: 0,
            });
        }
        (m, c, i) => {
            agent.metrics.read_errors.inc();
            let e = m.err().or(c.err()).or(i.err());
            tracing::debug!(error = ?e, "node PSI unreadable");
        }
    }
}

fn sample_container(agent: &Arc<Agent>, id: &str) {
    let cgroup = {
        let map = agent.containers.lock().expect("containers");
        match map.get(id) {
            Some(t) if t.started => t.cgroup.clone(),
            _ => None,
        }
    };
    let Some(cg) = cgroup else { return };
    let stat = match cg.memory_stat() {
        Ok(s) => s,
        Err(e) => {
            // Gone between stop and remove: not an error worth a metric.
            if cg.exists() {
                agent.metrics.read_errors.inc();
                tracing::debug!(container = id, error = %e, "memory stat unreadable");
            }
            return;
        }
    };
    let pressure = cg.pressure().and_then(Result::ok);
    let mut map = agent.containers.lock().expect("containers");
    let Some(t) = map.get_mut(id) else { return };
    t.history.push(Sample {
        at: unix_now(),
        memory_some: pressure.map(|p| p.some.avg10).unwrap_or(0.0),
        memory_full: pressure
            .and_then(|p| p.full)
            .map(|f| f.avg10)
            .unwrap_or(0.0),
        usage: stat.working_set,
    });
    t.samples += 1;
    t.peak_working_set = t.peak_working_set.max(stat.working_set);
    t.oom_kills = stat.oom_kills;
    if t.policy == MemoryPolicy::Adaptive
        && !t.trigger_armed
        && let Some(file) = cg.pressure_file()
    {
        let cfg = agent.memory_config();
        match Trigger::arm(
            &file,
            Duration::from_millis(cfg.trigger_stall_ms),
            Duration::from_millis(cfg.trigger_window_ms),
        ) {
            Ok(trigger) => {
                t.trigger_armed = true;
                tokio::spawn(watch(agent.clone(), id.to_string(), trigger));
            }
            Err(e) => {
                tracing::debug!(container = id, error = %crate::error_chain(&e), "no PSI trigger")
            }
        }
    }
}

/// Wakes the controller whenever the container's trigger fires, until its
/// cgroup goes away or the agent stops tracking it.
async fn watch(agent: Arc<Agent>, id: String, trigger: Trigger) {
    loop {
        if trigger.wait().await == Fired::Gone {
            break;
        }
        {
            let mut map = agent.containers.lock().expect("containers");
            let Some(t) = map.get_mut(&id) else { break };
            t.triggered = true;
        }
        agent.metrics.trigger_wakeups.inc();
        agent.wake.notify_one();
        // The kernel re-arms at most once per window; do not spin.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(t) = agent.containers.lock().expect("containers").get_mut(&id) {
        t.trigger_armed = false;
    }
}

fn decide(agent: &Agent, id: &str) -> Option<(api::ContainerUpdate, Decision)> {
    let cfg = agent.memory_config();
    let node_some = agent.node_memory_some();
    let mut map = agent.containers.lock().expect("containers");
    let t = map.get_mut(id)?;
    if t.policy != MemoryPolicy::Adaptive || !t.started {
        return None;
    }
    let s = t.last_sample()?;
    let now = Running {
        limit: t.limit,
        working_set: s.usage,
        recent_peak: t.history.peak_usage(),
        stall: s.memory_some,
        triggered: std::mem::take(&mut t.triggered),
        since_change: t.last_change.map(|r| r.elapsed()),
        samples: t.samples,
    };
    let (action, to, reason) = match policy::adjust(&cfg, now, node_some, agent.mem_total, t.bounds)
    {
        Action::Hold => return None,
        Action::Raise { to, reason } => {
            t.last_change = Some(Instant::now());
            ("raise", to, reason)
        }
        Action::Lower { to, reason } => ("lower", to, reason),
    };
    let from = t.limit;
    t.limit = Some(to);
    let resources = agent.resources_for(to, t.had_swap);
    let update = api::ContainerUpdate {
        container_id: id.into(),
        linux: Some(api::LinuxContainerUpdate {
            resources: Some(resources),
        }),
        ignore_failure: false,
    };
    let via = if t.source == Source::Nri && agent.link.is_connected() {
        "nri-update"
    } else {
        "cgroup"
    };
    Some((
        update,
        Decision {
            at: unix_now(),
            action: action.into(),
            from,
            to: Some(to),
            reason,
            via: via.into(),
        },
    ))
}

async fn apply(agent: &Agent, id: &str, update: api::ContainerUpdate, mut d: Decision) {
    let limit = d.to.unwrap_or(0);
    let high = update
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .and_then(|r| r.unified.get("memory.high"))
        .and_then(|h| h.parse().ok());
    let mut result = Err(String::new());
    if d.via == "nri-update" {
        result = match agent.link.update_containers(vec![update]).await {
            Ok(failed) if failed.is_empty() => Ok(()),
            Ok(_) => Err("the runtime could not apply the update".to_string()),
            Err(e) => Err(crate::error_chain(&e)),
        };
        if let Err(e) = &result {
            tracing::warn!(container = id, error = %e, "NRI update failed; writing the cgroup directly");
        }
    }
    if result.is_err() {
        let cg = agent
            .containers
            .lock()
            .expect("containers")
            .get(id)
            .and_then(|t| t.cgroup.clone());
        result = match cg {
            Some(cg) => cg
                .set_limit(limit, high)
                .map(|()| d.via = "cgroup".into())
                .map_err(|e| format!("cgroup write: {e}")),
            None => Err("the container's cgroup is unknown".into()),
        };
    }
    let mut map = agent.containers.lock().expect("containers");
    let Some(t) = map.get_mut(id) else { return };
    match result {
        Ok(()) => {
            tracing::info!(container = id, action = %d.action, from = ?d.from, to = limit, via = %d.via, reason = %d.reason, "memory limit changed");
            agent.metrics.decision(&d.action);
        }
        Err(e) => {
            agent.metrics.apply_errors.inc();
            tracing::warn!(container = id, error = %e, "memory limit change failed");
            t.limit = d.from;
            d.reason = format!("{} — not applied: {e}", d.reason);
            d.action = format!("{}-failed", d.action);
        }
    }
    t.decide(d);
}
