//! The CRI validation suite (`critest` of cri-tools) against a private
//! containerd, with its test images served by the harness's own registry.
//!
//! critest pulls from registry.k8s.io and gcr.io, which test machines cannot
//! reach. Its `--registry-prefix` does not help: it rewrites the references
//! it pulls but creates containers with the original ones. So the upstream
//! registries are mirrored instead, the way operators do it: a `hosts.toml`
//! per upstream name ([`mirror_upstreams`]) sends containerd (and hyperbox,
//! which reads the same format) to the local registry, where
//! [`push_images`] put stand-ins under the upstream repository paths, built
//! from static busybox like every image of the harness: the same users,
//! groups, files and tags the originals have (see cri-tools' `images/`),
//! and busybox `httpd` behind scripts named `nginx` and `httpd` where the
//! suite wants a web server (it checks the process name, a pid file, port
//! 80 or 12003 and a 200 answer). The one image that cannot be stood in for
//! is `test-image-digest`, pulled by the upstream digest.
//!
//! [`run`] drives critest with a JSON report and returns each spec's state,
//! so a test can compare runtimes spec by spec.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::image::{Compression, ImageSpec, Layer, RunConfig};
use crate::tools::{Error, critest_bin};

type Result<T> = std::result::Result<T, Error>;

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let action = action.into();
    move |source| Error::Io { action, source }
}

/// `/etc/passwd` and `/etc/group` with the accounts cri-tools' images have
/// (busybox's `www-data` is uid 33; the predefined-group image adds
/// `default-user` 1000 in group 50000).
fn accounts_layer() -> Layer {
    Layer::new(Compression::Gzip)
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\n\
             default-user:x:1000:1000::/home/default-user:/bin/sh\n\
             nobody:x:65534:65534:nobody:/:/bin/false\n",
            0o644,
        )
        .file(
            "etc/group",
            "root:x:0:\nwww-data:x:33:\ndefault-user:x:1000:\n\
             group-defined-in-image:x:50000:default-user\nnogroup:x:65534:\n",
            0o644,
        )
}

fn busybox(cmd: &[&str]) -> ImageSpec {
    let mut spec = ImageSpec::busybox(cmd).expect("busybox for critest images");
    spec.layers.push(accounts_layer());
    spec
}

/// busybox with the file `/<name>` added (cri-tools' `image-test`).
fn with_file(name: &str) -> ImageSpec {
    let mut spec = busybox(&["sh"]);
    spec.layers
        .push(Layer::new(Compression::Gzip).file(name, "", 0o644));
    spec
}

fn with_user(user: &str) -> ImageSpec {
    let mut spec = busybox(&["sh"]);
    spec.run.user = user.into();
    spec
}

/// A web server named `name` on `port`: a script of that name (so `pidof`
/// finds it) that records its pid like nginx does and runs busybox httpd.
fn web_server(name: &str, port: u16) -> ImageSpec {
    let script = format!(
        "#!/bin/sh\n# critest stand-in for {name}: busybox httpd on port {port}.\n\
         echo \"{name} starting on port {port}\"\nmkdir -p /var/run\necho $$ >/var/run/nginx.pid\n\
         httpd -f -p {port} -h /www &\nwait\n"
    );
    let mut spec = busybox(&[]);
    spec.layers.push(
        Layer::new(Compression::Gzip)
            .dir("usr", 0o755)
            .dir("usr/sbin", 0o755)
            .file(&format!("usr/sbin/{name}"), script, 0o755)
            .dir("www", 0o755)
            .file("www/index.html", format!("<h1>{name}</h1>\n"), 0o644),
    );
    spec.run = RunConfig {
        entrypoint: vec![format!("/usr/sbin/{name}")],
        env: vec!["PATH=/usr/sbin:/bin:/usr/bin".into()],
        working_dir: "/".into(),
        ..Default::default()
    };
    spec
}

/// The harness's pause image with a layer of its own: with the same
/// content as the sandbox image the instance already pulled, it would get
/// that image's id and a third name, and critest counts the names.
fn pause() -> ImageSpec {
    let mut spec = crate::cri::pause_image_spec().expect("busybox for the pause image");
    spec.layers
        .push(Layer::new(Compression::Gzip).file("critest-pause", "", 0o644));
    spec
}

/// Every image critest pulls on Linux: `(spec, repository, tags)`, the
/// repository without its upstream registry.
pub fn images() -> Vec<(ImageSpec, String, Vec<&'static str>)> {
    let e2e = |r: &str| format!("e2e-test-images/{r}");
    let own = |r: &str| format!("k8s-staging-cri-tools/{r}");
    let mut out = vec![
        (busybox(&["sh"]), e2e("busybox"), vec!["1.29-2"]),
        (pause(), "pause".to_string(), vec!["3.9"]),
        (web_server("nginx", 80), e2e("nginx"), vec!["1.14-2"]),
        (web_server("httpd", 80), e2e("httpd"), vec!["2.4.39-4"]),
        (
            web_server("nginx", 12003),
            own(&format!(
                "hostnet-nginx-{}",
                std::env::consts::ARCH.replace("x86_64", "amd64")
            )),
            vec!["latest"],
        ),
        (
            with_file("same-image"),
            own("test-image-tags"),
            vec!["1", "2", "3"],
        ),
        (
            with_file("test-image-tag"),
            own("test-image-tag"),
            vec!["test", "all"],
        ),
        (
            with_user("1002"),
            own("test-image-user-uid"),
            vec!["latest"],
        ),
        (
            with_user("www-data"),
            own("test-image-user-username"),
            vec!["latest"],
        ),
        (
            with_user("1003:1004"),
            own("test-image-user-uid-group"),
            vec!["latest"],
        ),
        (
            with_user("www-data:1004"),
            own("test-image-user-username-group"),
            vec!["latest"],
        ),
        (
            with_user("1000"),
            own("test-image-predefined-group"),
            vec!["latest"],
        ),
    ];
    for name in [
        "test-image-1",
        "test-image-2",
        "test-image-3",
        "test-image-latest",
        "test-image-digest",
    ] {
        out.push((with_file(name), own(name), vec!["latest"]));
    }
    out
}

/// The registries critest's images come from.
pub const UPSTREAMS: [&str; 3] = ["registry.k8s.io", "gcr.io", "k8s.gcr.io"];

/// Writes a `hosts.toml` into `certs_d` for each of [`UPSTREAMS`] that
/// sends pulls to `registry` (`host:port`, plain HTTP).
pub fn mirror_upstreams(certs_d: &Path, registry: &str) -> Result<()> {
    for up in UPSTREAMS {
        let dir = certs_d.join(up);
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  \
                 capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .map_err(io(format!("write {}/hosts.toml", dir.display())))?;
    }
    Ok(())
}

/// Builds [`images`] under `work` and pushes them to `registry` (`host:port`).
pub async fn push_images(
    registry: &str,
    work: &Path,
) -> std::result::Result<(), crate::image::Error> {
    for (i, (spec, repo, tags)) in images().into_iter().enumerate() {
        let built = spec.build(&work.join(format!("critest-{i}")))?;
        for tag in tags {
            built.push(registry, &repo, tag).await?;
        }
    }
    Ok(())
}

/// What became of one spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// Passed.
    Passed,
    /// Failed, panicked, timed out or was interrupted.
    Failed,
    /// Skipped (by focus or by the spec itself) or pending.
    Skipped,
}

/// critest's result: every spec by its full name.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Spec name (container texts and leaf text) → state.
    pub specs: BTreeMap<String, State>,
    /// Seconds each spec that ran took.
    pub seconds: BTreeMap<String, f64>,
    /// critest's output.
    pub log: PathBuf,
}

impl Outcome {
    /// Names of the specs in `state`.
    pub fn with(&self, state: State) -> Vec<&str> {
        self.specs
            .iter()
            .filter(|(_, s)| **s == state)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// `passed, failed, skipped`.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.with(State::Passed).len(),
            self.with(State::Failed).len(),
            self.with(State::Skipped).len(),
        )
    }
}

/// How to run the suite.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--ginkgo.focus` regular expressions (all specs when empty).
    pub focus: Vec<String>,
    /// `--ginkgo.skip` regular expressions.
    pub skip: Vec<String>,
    /// critest `--parallel` (1: sequential).
    pub parallel: u32,
    /// critest `--runtime-handler`: the CRI runtime handler of every pod
    /// (containerd's default runtime when `None`).
    pub runtime_handler: Option<String>,
}

/// Runs critest against containerd at `address` (whose upstream registries
/// are mirrored, see [`mirror_upstreams`]), writing its report and log in
/// `out`.
pub fn run(address: &Path, out: &Path, opts: &Options) -> Result<Outcome> {
    std::fs::create_dir_all(out).map_err(io(format!("create {}", out.display())))?;
    let endpoint = format!("unix://{}", address.display());
    // critest reads /etc/crictl.yaml unless told otherwise; give it ours.
    let config = out.join("crictl.yaml");
    std::fs::write(
        &config,
        format!("runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\n"),
    )
    .map_err(io("write critest config"))?;
    let report = out.join("report.json");
    let log_path = out.join("critest.log");
    let log = std::fs::File::create(&log_path).map_err(io("create critest log"))?;
    let mut cmd = Command::new(critest_bin());
    cmd.arg(format!("--config={}", config.display()))
        .arg(format!("--runtime-endpoint={endpoint}"))
        .arg(format!("--image-endpoint={endpoint}"))
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.timeout=2h");
    // Only above 1: ginkgo refuses go test's own `-parallel` (which
    // critest's flag shadows) once it is set at all.
    if opts.parallel > 1 {
        cmd.arg(format!("--parallel={}", opts.parallel));
    }
    if let Some(h) = &opts.runtime_handler {
        cmd.arg(format!("--runtime-handler={h}"));
    }
    for f in &opts.focus {
        cmd.arg(format!("--ginkgo.focus={f}"));
    }
    for s in &opts.skip {
        cmd.arg(format!("--ginkgo.skip={s}"));
    }
    tracing::info!(?cmd, "running critest");
    let status = cmd
        .current_dir(out)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("dup critest log"))?)
        .stderr(log)
        .status()
        .map_err(io(format!("run {}", critest_bin().display())))?;
    let text = std::fs::read_to_string(&report).map_err(|source| Error::Io {
        action: format!(
            "read critest's report (critest exited with {status}; its log: {})",
            log_path.display()
        ),
        source,
    })?;
    parse_report(&text, log_path).map_err(|e| Error::NotJson {
        command: format!("critest report {}: {e}", report.display()),
        output: text.chars().take(2000).collect(),
    })
}

/// Reads ginkgo's JSON report: a list of suites, each with `SpecReports`.
fn parse_report(text: &str, log: PathBuf) -> std::result::Result<Outcome, String> {
    let suites: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Outcome {
        log,
        ..Default::default()
    };
    for suite in suites.as_array().ok_or("not a list of suites")? {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                continue;
            }
            let mut name: Vec<&str> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str())
                .collect();
            name.push(spec["LeafNodeText"].as_str().unwrap_or_default());
            let name = name.join(" ");
            let state = match spec["State"].as_str().unwrap_or_default() {
                "passed" => State::Passed,
                "skipped" | "pending" => State::Skipped,
                _ => State::Failed,
            };
            if state != State::Skipped
                && let Some(ns) = spec["RunTime"].as_f64()
            {
                out.seconds.insert(name.clone(), ns / 1e9);
            }
            out.specs.insert(name, state);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_states_and_names() {
        let text = r#"[{"SpecReports":[
            {"LeafNodeType":"BeforeSuite","State":"passed"},
            {"LeafNodeType":"It","ContainerHierarchyTexts":["[k8s.io] Image Manager"],"LeafNodeText":"public image","State":"passed","RunTime":2000000000},
            {"LeafNodeType":"It","ContainerHierarchyTexts":["[k8s.io] Streaming","runtime should"],"LeafNodeText":"exec","State":"timedout","RunTime":1},
            {"LeafNodeType":"It","ContainerHierarchyTexts":[],"LeafNodeText":"apparmor","State":"skipped"}
        ]}]"#;
        let o = parse_report(text, PathBuf::new()).unwrap();
        assert_eq!(o.counts(), (1, 1, 1));
        assert_eq!(
            o.with(State::Failed),
            ["[k8s.io] Streaming runtime should exec"]
        );
        assert_eq!(o.seconds["[k8s.io] Image Manager public image"], 2.0);
    }

    #[test]
    fn every_image_has_a_repository() {
        let imgs = images();
        assert!(imgs.iter().all(|(_, r, t)| !r.is_empty() && !t.is_empty()));
        assert!(
            imgs.iter()
                .any(|(_, r, _)| r == "k8s-staging-cri-tools/hostnet-nginx-amd64")
        );
    }
}
