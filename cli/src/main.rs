//! `hb`: the hyperbox operator's command line. Tables for people, `--json`
//! for scripts.

mod doctor;
mod snapshots;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Operate hyperbox on this node.
#[derive(Debug, Parser)]
#[command(name = "hb", version, about)]
struct Args {
    /// Config file (default /etc/hyperbox/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Snapshots held by hyperbox-snapshotter.
    Snapshots {
        #[command(subcommand)]
        command: SnapshotsCommand,
    },
    /// Kernel features hyperbox depends on, and how each was detected.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotsCommand {
    /// List snapshots.
    Ls {
        /// containerd filter, e.g. `kind==committed` or `labels."containerd.io/gc.root"`;
        /// repeat for OR.
        #[arg(long = "filter")]
        filters: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = (|| -> anyhow::Result<()> {
        let config = hyperbox_config::Config::load(args.config.as_deref())?;
        match args.command {
            Command::Doctor { json } => doctor::run(&config, json),
            Command::Snapshots {
                command: SnapshotsCommand::Ls { filters, json },
            } => tokio::runtime::Runtime::new()?.block_on(snapshots::ls(&config, filters, json)),
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
