//! `hyperbox-nri`: the node agent daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// hyperbox node agent: NRI plugin with PSI-driven memory limits.
///
/// Runs as an external NRI plugin (dials agent.nri_socket), or is launched
/// by containerd from its NRI plugin dir (the socket arrives on fd 3).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file (default /etc/hyperbox/config.toml, or $HYPERBOX_CONFIG;
    /// defaults apply if the default file is absent).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `hyperbox_nri=debug` (or RUST_LOG).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    hyperbox_api::daemon::init_logging(&args.log_level);
    let result = (|| -> anyhow::Result<()> {
        // containerd launches pre-registered plugins without arguments; the
        // environment (or a wrapper script) names the config then.
        let path = args
            .config
            .clone()
            .or_else(|| std::env::var_os("HYPERBOX_CONFIG").map(PathBuf::from));
        let config = hyperbox_config::Config::load(path.as_deref())?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(hyperbox_nri::daemon::run(&config))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyperbox-nri: {e:#}");
            ExitCode::FAILURE
        }
    }
}
