//! Carries out the controller's [`Change`]s: NRI `UpdateContainers` for
//! CRI containers while a runtime is connected, else (or when the runtime
//! refuses) a direct write to the container's cgroup; then records the
//! decision, putting the limit back when nothing could apply it.

use hyperbox_api::time::unix_now;
use hyperbox_api::types::Route;
use hyperbox_nri_proto::api;

use crate::agent::Agent;
use crate::memory::decide::Change;

/// Applies one change and records how it went.
pub async fn apply(agent: &Agent, change: Change) {
    let id = change.id.as_str();
    let Some(target) = agent.state.begin_change(&change) else {
        return;
    };
    let resources = agent.resources_for(change.to, target.had_swap);
    let high = resources
        .unified
        .get("memory.high")
        .and_then(|h| h.parse().ok());
    let mut tried = change.route;
    let mut outcome = Err(String::new());
    if change.route == Route::NriUpdate {
        let update = api::ContainerUpdate {
            container_id: id.into(),
            linux: Some(api::LinuxContainerUpdate {
                resources: Some(resources),
            }),
            ignore_failure: false,
        };
        outcome = match agent.link.update_containers(vec![update]).await {
            Ok(failed) if failed.is_empty() => Ok(Route::NriUpdate),
            Ok(_) => Err("the runtime could not apply the update".to_string()),
            Err(e) => Err(hyperbox_api::error_chain(&e)),
        };
        if let Err(e) = &outcome {
            tracing::warn!(container = id, error = %e, "NRI update failed; writing the cgroup directly");
        }
    }
    if outcome.is_err() {
        outcome = match &target.cgroup {
            Some(cg) => cg
                .set_limit(change.to, high)
                .map(|()| {
                    tried = Route::Cgroup;
                    Route::Cgroup
                })
                .map_err(|e| format!("cgroup write: {e}")),
            None => Err("the container's cgroup is unknown".into()),
        };
    }
    let decision = change.decision(unix_now(), outcome.map_err(|e| (tried, e)));
    if decision.action.is_failed() {
        agent.metrics.apply_errors.inc();
        tracing::warn!(container = id, reason = %decision.reason, "memory limit change failed");
    } else {
        tracing::info!(container = id, action = decision.action.as_str(), from = ?change.from, to = change.to, via = decision.via.as_str(), reason = %change.reason, "memory limit changed");
        agent.metrics.decision(decision.action);
    }
    agent.state.settle_change(id, decision);
}
