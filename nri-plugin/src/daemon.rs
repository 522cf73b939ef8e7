//! The agent's life cycle: open what it learned, bind its sockets, start
//! the controller, and serve NRI until a signal (external plugin) or until
//! containerd closes the socket it handed us (pre-registered plugin).

use std::sync::Arc;

use anyhow::{Context, Result};
use hyperbox_api::daemon::bind_unix;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::access::{Access, Peer};
use crate::agent::Agent;
use crate::cgroup::{Layout, Parents};
use crate::memory::store::Store;
use hyperbox_nri_proto::plugin::{self, Endpoint, Identity, Link};

async fn serve_endpoints(agent: &Arc<Agent>, cfg: &hyperbox_config::Config) -> Result<()> {
    let access = Access::for_group(&cfg.agent.api_group)?
        .with_cgroup_parents(Parents::new(&cfg.agent.cgroup_parents)?);
    let api = bind_unix(&cfg.agent.address, cfg.agent.socket_mode)?;
    if let Some(gid) = access.gid() {
        // The group's members reach the socket through its group bits.
        std::os::unix::fs::chown(&cfg.agent.address, None, Some(gid.as_raw())).with_context(
            || {
                format!(
                    "give agent.address {} to agent.api_group",
                    cfg.agent.address.display()
                )
            },
        )?;
    }
    // Each connection's peer credentials (SO_PEERCRED) decide what it may do.
    let router = crate::http::api_router(agent.clone(), Arc::new(access))
        .into_make_service_with_connect_info::<Peer>();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api, router).await {
            tracing::error!(error = %e, "local API server stopped");
        }
    });
    if !cfg.agent.metrics_address.is_empty() {
        let tcp = TcpListener::bind(&cfg.agent.metrics_address)
            .await
            .with_context(|| format!("bind agent.metrics_address {}", cfg.agent.metrics_address))?;
        let router = crate::http::metrics_router(agent.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, router).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    Ok(())
}

/// Reports syscalls outside installed seccomp profiles from the kernel's
/// audit records, for the agent's life.
async fn read_seccomp_audit(agent: Arc<Agent>) {
    let mut reader = match crate::seccomp::audit::Reader::open() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the kernel's audit records (needs CAP_AUDIT_READ): syscalls outside seccomp profiles go unreported");
            return;
        }
    };
    loop {
        match reader.next().await {
            Ok(records) => {
                let late: Vec<_> = records
                    .into_iter()
                    .filter(|r| !agent.seccomp_audit(r, false))
                    .collect();
                if !late.is_empty() {
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        // Past the tracer's drain period (50 ms) and then some.
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        for r in &late {
                            agent.seccomp_audit(r, true);
                        }
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit records unreadable; seccomp reports stop");
                return;
            }
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT, or until a pre-registered plugin's
/// socket closes.
pub async fn run(cfg: &hyperbox_config::Config) -> Result<()> {
    let layout = Layout::detect(std::path::Path::new("/sys/fs/cgroup"));
    let store = Store::open(&cfg.agent.state_dir, cfg.memory.history_runs)
        .with_context(|| format!("open agent.state_dir {}", cfg.agent.state_dir.display()))?;
    let link = Arc::new(Link::default());
    let tracing = crate::trace::Tracing::load(&cfg.tracing, &layout);
    tokio::spawn(tracing.clone().read_events());
    let seccomp = crate::seccomp::runs::Seccomp::open(cfg.seccomp.clone(), &cfg.agent.state_dir)
        .with_context(|| format!("open agent.state_dir {}", cfg.agent.state_dir.display()))?;
    let (agent, jobs) = Agent::new(
        cfg.memory.clone(),
        layout.clone(),
        store,
        link.clone(),
        tracing,
        seccomp,
    );
    if let Some(dir) = cfg.agent.address.parent() {
        let _ = agent.shim_journal.set(dir.join("shim-skipped.log"));
    }
    let endpoint = Endpoint::from_env();
    let preconnected = endpoint.is_some();
    let endpoint = endpoint.unwrap_or_else(|| Endpoint::Dial(cfg.agent.nri_socket.clone()));
    let id = Identity::from_env_or(&cfg.agent.plugin_name, &cfg.agent.plugin_index);
    tracing::info!(cgroups = layout.name(), endpoint = ?endpoint, name = %id.name, index = %id.index, "hyperbox agent starting");

    // containerd's CRI fails to start when a plugin it launched does not
    // register, so a launched agent serves NRI even if its other sockets
    // cannot be bound; a dialling agent refuses to start half-way.
    if let Err(e) = serve_endpoints(&agent, cfg).await {
        if preconnected {
            tracing::error!(
                error = format!("{e:#}"),
                "agent endpoints unavailable; serving NRI only"
            );
        } else {
            return Err(e);
        }
    }
    if cfg.agent.prewarm {
        let window = std::time::Duration::from_secs(cfg.agent.prewarm_window_secs);
        let starts = crate::prewarm::Starts::open(&cfg.agent.state_dir, window)
            .with_context(|| format!("open agent.state_dir {}", cfg.agent.state_dir.display()))?;
        let starts = Arc::new(starts);
        let _ = agent.starts.set(starts.clone());
        tokio::spawn(crate::prewarm::keep_saved(starts.clone()));
        let settings = crate::prewarm::Settings {
            interval: std::time::Duration::from_secs(cfg.agent.prewarm_interval_secs),
            min_starts: cfg.agent.prewarm_min_starts,
            max_pressure: f64::from(cfg.agent.prewarm_max_pressure),
            snapshotter: cfg.snapshotter.control_address.clone(),
            pressure_dir: std::path::PathBuf::from("/proc/pressure"),
        };
        if settings.snapshotter.as_os_str().is_empty() {
            tracing::warn!(
                "agent.prewarm is on but snapshotter.control_address is empty: image starts are counted, nothing is prewarmed"
            );
        } else {
            tokio::spawn(crate::prewarm::run(starts, settings, agent.clone()));
        }
    }
    tokio::spawn(crate::memory::controller::run(agent.clone(), jobs));
    tokio::spawn(read_seccomp_audit(agent.clone()));
    {
        // Complaining containers' syscalls outside their profile, as the
        // tracer counts them, every 2 s (audit records report sooner).
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tick.tick().await;
                agent.sweep_complaints();
            }
        });
    }
    if let Some(mut refusals) = agent.tracing.refusals() {
        let agent = agent.clone();
        tokio::spawn(async move {
            while let Some(r) = refusals.recv().await {
                agent.seccomp_refused(&r);
            }
        });
    }

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let result = tokio::select! {
        r = plugin::run(endpoint, id, agent.clone(), link) => r.map_err(anyhow::Error::from),
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    if let Some(starts) = agent.starts.get() {
        starts.flush();
    }
    // Leave no socket that looks alive to the next agent.
    let _ = std::fs::remove_file(&cfg.agent.address);
    let tracing = agent.tracing.clone();
    // The exporter's flush blocks on HTTP driven by this runtime.
    let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    tracing::info!("hyperbox agent stopped");
    result
}
