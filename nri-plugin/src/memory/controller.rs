//! The memory controller: samples the node's and each container's pressure
//! and usage every `sample_interval_secs` (or at once when a PSI trigger
//! fires), asks [`decide`] what to change for adaptive containers, has
//! [`apply`] carry it out, and saves what each finished run taught.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyperbox_api::time::unix_now;
use hyperbox_api::types::{NodePressure, Sample};
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::memory::apply::apply;
use crate::memory::decide::{self, decide};
use crate::memory::policy;
use crate::psi::trigger::{Fired, Trigger};
use crate::state::Job;

/// Runs the controller forever.
pub async fn run(agent: Arc<Agent>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let node_trigger = arm_node_trigger(&agent);
    loop {
        let interval = Duration::from_secs(agent.state.memory_config().sample_interval_secs);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.state.woken() => {}
            Some(job) = jobs.recv() => {
                handle(&agent, job);
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
    let cfg = agent.state.memory_config();
    match Trigger::arm(
        Path::new("/proc/pressure/memory"),
        Duration::from_millis(cfg.trigger_stall_ms),
        Duration::from_millis(cfg.trigger_window_ms),
    ) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %hyperbox_api::error_chain(&e), "no node PSI trigger; sampling only");
            None
        }
    }
}

fn handle(agent: &Agent, job: Job) {
    match job {
        Job::Finished { workload, peak } => match agent.state.record_run(&workload, peak) {
            Ok(()) => {
                tracing::info!(workload = %workload, peak = %policy::bytes(peak), "learned a run's working set")
            }
            Err(e) => {
                tracing::error!(workload = %workload, error = %hyperbox_api::error_chain(&e), "could not save what was learned")
            }
        },
    }
}

/// One pass: node pressure, every container's sample, then the changes
/// decided from them.
pub async fn tick(agent: &Arc<Agent>) {
    sample_node(agent);
    for id in agent.state.ids() {
        sample_container(agent, &id);
    }
    let cfg = agent.state.memory_config();
    let node = decide::Node {
        cfg: &cfg,
        memory_some: agent.state.node_memory_some(),
        mem_total: agent.mem_total,
        nri_connected: agent.link.is_connected(),
    };
    for change in decide(&node, &agent.state.candidates()) {
        apply(agent, change).await;
    }
}

fn sample_node(agent: &Agent) {
    let read = |r: &str| crate::psi::read(Path::new(&format!("/proc/pressure/{r}")));
    match (read("memory"), read("cpu"), read("io")) {
        (Ok(memory), Ok(cpu), Ok(io)) => agent.state.record_node(NodePressure {
            memory,
            cpu,
            io,
            at: unix_now(),
        }),
        (m, c, i) => {
            agent.metrics.read_errors.inc();
            let e = m.err().or(c.err()).or(i.err());
            tracing::debug!(error = ?e, "node PSI unreadable");
        }
    }
}

fn sample_container(agent: &Arc<Agent>, id: &str) {
    let Some(cg) = agent.state.sampling_target(id) else {
        return;
    };
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
    let sample = Sample {
        at: unix_now(),
        memory_some: pressure.map(|p| p.some.avg10).unwrap_or(0.0),
        memory_full: pressure
            .and_then(|p| p.full)
            .map(|f| f.avg10)
            .unwrap_or(0.0),
        usage: stat.working_set,
    };
    let wants_trigger = agent.state.record_sample(id, sample, stat.oom_kills);
    if wants_trigger != Some(true) {
        return;
    }
    let Some(file) = cg.pressure_file() else {
        return;
    };
    let cfg = agent.state.memory_config();
    match Trigger::arm(
        &file,
        Duration::from_millis(cfg.trigger_stall_ms),
        Duration::from_millis(cfg.trigger_window_ms),
    ) {
        Ok(trigger) => {
            agent.state.set_trigger_armed(id, true);
            tokio::spawn(watch(agent.clone(), id.to_string(), trigger));
        }
        Err(e) => {
            tracing::debug!(container = id, error = %hyperbox_api::error_chain(&e), "no PSI trigger")
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
        if !agent.state.mark_triggered(&id) {
            break;
        }
        agent.metrics.trigger_wakeups.inc();
        agent.state.wake();
        // The kernel re-arms at most once per window; do not spin.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.state.set_trigger_armed(&id, false);
}
