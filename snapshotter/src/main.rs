//! `hyperbox-snapshotter`: the containerd proxy snapshotter daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// containerd proxy snapshotter; plug it in with `[proxy_plugins.hyperbox]`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file (default /etc/hyperbox/config.toml; defaults apply if it is absent).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `hyperbox_snapshotter=debug` (or RUST_LOG).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    hyperbox_api::daemon::init_logging(&args.log_level);
    let result = (|| -> anyhow::Result<()> {
        let config = hyperbox_config::Config::load(args.config.as_deref())?;
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(hyperbox_snapshotter::server::run(&config))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyperbox-snapshotter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
