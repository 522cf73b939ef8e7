//! `hb`: the hyperbox operator's command line. Tables for people, `--json`
//! for scripts.

mod agent;
mod doctor;
mod image;
mod index;
mod prefetch;
mod prewarm;
mod profile;
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
    /// Images, pulled through containerd onto hyperbox's remote path.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Memory pressure of the node and of each container the agent tracks.
    Psi {
        /// Machine-readable output (with each container's sample history).
        #[arg(long)]
        json: bool,
    },
    /// What the agent's eBPF tracer saw of a container: syscall counts,
    /// execs, opens and OOM kills, from its first instruction.
    Trace {
        /// Container id or id prefix.
        container: String,
        /// Machine-readable output (with --follow: one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Stream its events live until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Traced containers with their syscall and exec rates, refreshed.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Print one sample (taken over one interval) and exit.
        #[arg(long)]
        once: bool,
        /// One JSON object per sample.
        #[arg(long)]
        json: bool,
    },
    /// The node agent's policy decisions.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Seccomp profiles the agent learned per workload: list, show,
    /// compare, set a workload's mode, forget.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Kernel features hyperbox depends on, and how each was detected.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Build and push the image's hyperbox index (chunk digests of each
    /// layer's EROFS image and a map of it onto the layer blob, as an OCI
    /// artifact beside the image) so nodes pull it lazily.
    Index {
        /// Image reference.
        reference: String,
        /// Bytes per verified chunk: a multiple of 4096. Default: 16 KiB,
        /// doubled until the image has at most 65,536 chunks.
        #[arg(long)]
        chunk_size: Option<u64>,
        /// Tar bytes between gzip checkpoints: a read inflates at most this
        /// much before its bytes; smaller spans cost more index (a 32 KiB
        /// window each, about 10 KiB compressed).
        #[arg(long, default_value_t = hyperbox_erofs::map::DEFAULT_SPAN)]
        span: u64,
        /// Push each layer's EROFS image as a blob of its own (index
        /// version 2, which nodes older than version 3 read) instead of a
        /// map onto the layer blob.
        #[arg(long)]
        erofs_blobs: bool,
        /// Leave out the tables of 4 KiB block digests that let nodes fetch
        /// and check a read's blocks rather than whole chunks (index
        /// version 3, which nodes older than version 4 read).
        #[arg(long)]
        no_block_digests: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image with the labels nerdctl and CRI send, so the snapshotter
    /// fetches its layers itself; prints one line per layer.
    Pull {
        /// Image reference, e.g. `registry.example/app:1.2` or `busybox`.
        reference: String,
        /// containerd's socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        address: PathBuf,
        /// containerd namespace (`k8s.io` for images the kubelet should see).
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Snapshotter to unpack into.
        #[arg(long, default_value = "hyperbox")]
        snapshotter: String,
        /// One JSON object per line: a `layer` event per layer, then `done`.
        #[arg(long)]
        json: bool,
    },
    /// Fetch the learned prefetch lists of the image's lazy layers into the
    /// snapshotter's cache now, ahead of its next pull (the agent does this
    /// by itself for images that start often, see `agent.prewarm`).
    Prewarm {
        /// Image reference (it must have a hyperbox index).
        reference: String,
        /// Stop when the node's I/O `some avg10` (%) reaches this; 0 never.
        #[arg(long, default_value_t = 0.0)]
        max_io_pressure: f64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Prefetch lists learned from real runs (what containers of the image
    /// first read), shared beside the image's hyperbox index.
    Prefetch {
        #[command(subcommand)]
        command: PrefetchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PrefetchCommand {
    /// Push this node's learned lists for the image, merged after those
    /// the registry holds, so other nodes fetch those bytes first.
    Push {
        /// Image reference (it must have a hyperbox index).
        reference: String,
        /// Push this node's lists alone instead of merging.
        #[arg(long)]
        replace: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the lists the registry holds for the image and this node's.
    Show {
        /// Image reference (it must have a hyperbox index).
        reference: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// What the agent decided for a container and why: bounds, what was
    /// learned for its workload, headroom, every change.
    Explain {
        /// Container id, id prefix or name.
        container: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ProfileCommand {
    /// Learned profiles: mode override, learning or enforcing, size, runs.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One workload's profile: a summary, the syscalls reported outside it,
    /// then the profile itself.
    Show {
        /// Workload key, as `hb profile ls` lists it.
        workload: String,
        /// Print only the profile, in this form: `oci` (the spec's
        /// linux.seccomp), `localhost` (a file for the kubelet's seccomp
        /// directory) or `spo` (a Security Profiles Operator object).
        #[arg(long, value_parser = profile::FORMATS)]
        format: Option<String>,
        /// Machine-readable output: everything the agent knows of it.
        #[arg(long)]
        json: bool,
    },
    /// Syscalls one profile allows and the other does not.
    Diff {
        /// Workload key, or `default` (the runtime's default profile).
        a: String,
        /// Workload key, or `default`.
        #[arg(default_value = "default")]
        b: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Set a workload's seccomp mode for its next containers, over its
    /// annotation and seccomp.default_mode.
    SetMode {
        /// Workload key.
        workload: String,
        /// off, learn, complain, enforce, auto, or clear (drop the override).
        mode: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Drop what was learned for a workload (it learns afresh).
    Forget {
        /// Workload key.
        workload: String,
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
            Command::Psi { json } => agent::psi(&config, json),
            Command::Top {
                interval,
                once,
                json,
            } => {
                if !(0.1..=3600.0).contains(&interval) {
                    anyhow::bail!("--interval must be between 0.1 and 3600 seconds");
                }
                agent::top(
                    &config,
                    std::time::Duration::from_secs_f64(interval),
                    once,
                    json,
                )
            }
            Command::Trace {
                container,
                json,
                follow,
            } => agent::trace(&config, &container, json, follow),
            Command::Policy {
                command: PolicyCommand::Explain { container, json },
            } => agent::explain(&config, &container, json),
            Command::Profile { command } => match command {
                ProfileCommand::Ls { json } => profile::ls(&config, json),
                ProfileCommand::Show {
                    workload,
                    format,
                    json,
                } => profile::show(&config, &workload, format.as_deref(), json),
                ProfileCommand::Diff { a, b, json } => profile::diff(&config, &a, &b, json),
                ProfileCommand::SetMode {
                    workload,
                    mode,
                    json,
                } => profile::set_mode(&config, &workload, &mode, json),
                ProfileCommand::Forget { workload } => profile::forget(&config, &workload),
            },
            Command::Image {
                command:
                    ImageCommand::Index {
                        reference,
                        chunk_size,
                        span,
                        erofs_blobs,
                        no_block_digests,
                        json,
                    },
            } => tokio::runtime::Runtime::new()?.block_on(index::run(
                &config,
                &reference,
                index::Options {
                    chunk_size,
                    span,
                    erofs_blobs,
                    block_digests: !no_block_digests,
                },
                json,
            )),
            Command::Image {
                command:
                    ImageCommand::Pull {
                        reference,
                        address,
                        namespace,
                        snapshotter,
                        json,
                    },
            } => tokio::runtime::Runtime::new()?.block_on(image::pull(
                &config,
                &image::PullArgs {
                    reference,
                    address,
                    namespace,
                    snapshotter,
                    json,
                },
            )),
            Command::Image {
                command:
                    ImageCommand::Prefetch {
                        command:
                            PrefetchCommand::Push {
                                reference,
                                replace,
                                json,
                            },
                    },
            } => tokio::runtime::Runtime::new()?
                .block_on(prefetch::push(&config, &reference, replace, json)),
            Command::Image {
                command:
                    ImageCommand::Prefetch {
                        command: PrefetchCommand::Show { reference, json },
                    },
            } => {
                tokio::runtime::Runtime::new()?.block_on(prefetch::show(&config, &reference, json))
            }
            Command::Image {
                command:
                    ImageCommand::Prewarm {
                        reference,
                        max_io_pressure,
                        json,
                    },
            } => tokio::runtime::Runtime::new()?.block_on(prewarm::run(
                &config,
                &reference,
                max_io_pressure,
                json,
            )),
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
