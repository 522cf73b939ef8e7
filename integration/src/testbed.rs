//! The usual starting point of an end-to-end test: a registry, a shaping and
//! fault-injecting proxy in front of it, the pause image pushed to it, and a
//! containerd that may pull from both over plain HTTP and uses that pause
//! image for CRI sandboxes.

use std::path::Path;

use tempfile::TempDir;

use crate::containerd::{Builder, Containerd};
use crate::image::ImageSpec;
use crate::proxy::FaultProxy;
use crate::registry::Registry;
use crate::snapshotter::SnapshotterDaemon;

/// Registry, proxy, containerd and optionally hyperbox's snapshotter. Fields
/// drop in order: containerd first, so it never outlives its plugins.
#[derive(Debug)]
pub struct Testbed {
    /// The private containerd.
    pub containerd: Containerd,
    /// hyperbox-snapshotter, plugged in as `[proxy_plugins.hyperbox]`.
    pub snapshotter: Option<SnapshotterDaemon>,
    /// The proxy in front of the registry (no shaping or faults until set).
    pub proxy: FaultProxy,
    /// The registry it pulls from.
    pub registry: Registry,
    /// Reference of the pause image in the registry.
    pub pause_image: String,
    work: TempDir,
}

impl Testbed {
    /// Starts a registry and a default containerd (NRI and CRI on).
    pub async fn start() -> Testbed {
        Self::start_with(|b| b).await
    }

    /// Like [`Testbed::start`], letting the test adjust containerd's config.
    pub async fn start_with(configure: impl FnOnce(Builder) -> Builder) -> Testbed {
        Self::start_inner(None, configure).await
    }

    /// Starts hyperbox-snapshotter too, plugged into containerd as
    /// `[proxy_plugins.hyperbox]` and used by CRI.
    pub async fn start_hyperbox(configure: impl FnOnce(Builder) -> Builder) -> Testbed {
        let sn = SnapshotterDaemon::start().await;
        Self::start_inner(Some(sn), configure).await
    }

    /// [`Testbed::start_hyperbox`] with extra `[snapshotter]` keys for
    /// the daemon (see [`SnapshotterDaemon::start_configured`]).
    pub async fn start_hyperbox_configured(
        snapshotter_keys: &str,
        configure: impl FnOnce(Builder) -> Builder,
    ) -> Testbed {
        let sn = SnapshotterDaemon::start_configured(snapshotter_keys, "").await;
        Self::start_inner(Some(sn), configure).await
    }

    async fn start_inner(
        snapshotter: Option<SnapshotterDaemon>,
        configure: impl FnOnce(Builder) -> Builder,
    ) -> Testbed {
        crate::init_logging();
        let registry = Registry::start().expect("start registry");
        let work = tempfile::Builder::new()
            .prefix("hb-images-")
            .tempdir()
            .expect("temp dir for image blobs");
        std::fs::write(
            work.path().join(crate::footprint::OWNER_FILE),
            std::process::id().to_string(),
        )
        .expect("record owner");
        let pause = crate::cri::pause_image_spec()
            .expect("busybox for the pause image")
            .build(&work.path().join("pause"))
            .expect("build pause image");
        let pause_image = pause
            .push(&registry.host(), "hyperbox/pause", "3.9")
            .await
            .expect("push pause image");
        let proxy = FaultProxy::start(registry.addr())
            .await
            .expect("start registry proxy");
        let mut builder = Containerd::builder()
            .plain_http_registry(&registry.host())
            .plain_http_registry(&proxy.host())
            .sandbox_image(&pause_image);
        if let Some(sn) = &snapshotter {
            builder = builder
                .proxy_plugin(sn.proxy_plugin())
                .cri_snapshotter(crate::snapshotter::NAME);
        }
        let builder = configure(builder);
        let containerd = builder.start().await.expect("start containerd");
        Testbed {
            containerd,
            snapshotter,
            proxy,
            registry,
            pause_image,
            work,
        }
    }

    /// Builds `spec` and pushes it as `repo:tag`; returns the reference.
    pub async fn push(&self, spec: &ImageSpec, repo: &str, tag: &str) -> String {
        let dir = self
            .work
            .path()
            .join(format!("{repo}-{tag}").replace('/', "_"));
        let built = spec.build(&dir).expect("build image");
        built
            .push(&self.registry.host(), repo, tag)
            .await
            .expect("push image")
    }

    /// Pushes a busybox image that sleeps for an hour (`test/sleeper:v1`),
    /// for tests that need a running container; returns its reference.
    pub async fn push_sleeper(&self) -> String {
        let spec = ImageSpec::busybox(&["sleep", "3600"]).expect("busybox image");
        self.push(&spec, "test/sleeper", "v1").await
    }

    /// The sleeper image ([`Testbed::push_sleeper`]) pushed and pulled into
    /// containerd's overlayfs through the API, with the client that pulled
    /// it.
    pub async fn sleeper_image(&self) -> (crate::client::Client, crate::client::Image) {
        self.image_in_overlayfs(&self.push_sleeper().await).await
    }

    /// `reference` pulled into containerd's overlayfs through the API, with
    /// the client that pulled it.
    pub async fn image_in_overlayfs(
        &self,
        reference: &str,
    ) -> (crate::client::Client, crate::client::Image) {
        let client = self.containerd.client().await.expect("containerd client");
        let image = client
            .pull(reference, &crate::client::PullOptions::local("overlayfs"))
            .await
            .expect("pull into overlayfs");
        (client, image)
    }

    /// The same image reference, pulled through the proxy.
    pub fn via_proxy(&self, reference: &str) -> String {
        reference.replacen(&self.registry.host(), &self.proxy.host(), 1)
    }

    /// Where built image blobs are kept.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Tears everything down; returns what was left behind (should be nothing).
    pub fn shutdown(self) -> Vec<String> {
        let fp = self.containerd.shutdown();
        let mut leaks = fp.leaks();
        if let Some(sn) = self.snapshotter {
            leaks.extend(sn.shutdown());
        }
        leaks
    }

    /// Tears everything down and panics if anything was left behind: the
    /// last line of every end-to-end test.
    pub fn finish(self) {
        let leaks = self.shutdown();
        assert!(leaks.is_empty(), "left behind: {leaks:#?}");
    }

    /// Forgets every trace of an earlier pull of `reference`, so the next
    /// one is cold: the image in the default and `k8s.io` namespaces and in
    /// CRI, its content and snapshots (garbage-collected), and, with
    /// hyperbox, its converted, lazy and partly downloaded layers. Those outlive their
    /// snapshots for a grace period (a Prepare may be about to use them), so
    /// the daemon is stopped, they are removed and it is started again.
    pub async fn forget_image(&mut self, reference: &str) {
        self.forget_images(&[reference]).await
    }

    /// [`Testbed::forget_image`] for several images at once: images of the
    /// same layers share their snapshots, which go only with the last.
    pub async fn forget_images(&mut self, references: &[&str]) {
        self.forget(references, &["layers", "lazy", "staging"], 0)
            .await
    }

    /// [`Testbed::forget_images`] on a node that keeps `left` snapshots of
    /// other images (the pause image CRI's pods use), whose cached layers
    /// go too (they stay in their snapshots).
    pub async fn forget_images_leaving(&mut self, references: &[&str], left: usize) {
        self.forget(references, &["layers", "lazy", "staging"], left)
            .await
    }

    /// [`Testbed::forget_images`], and the prefetch lists the snapshotter
    /// learned: the node is then as one that never ran the images.
    pub async fn forget_images_and_learned(&mut self, references: &[&str]) {
        self.forget(references, &["layers", "lazy", "staging", "prefetch"], 0)
            .await
    }

    async fn forget(&mut self, references: &[&str], dirs: &[&str], left: usize) {
        let client = self.containerd.client().await.expect("client");
        let cri = self.containerd.cri().await.expect("cri");
        let k8s = client.with_namespace("k8s.io");
        for reference in references {
            let _ = client.delete_image(reference).await;
            let _ = cri.remove_image(reference).await;
            let _ = k8s.delete_image(reference).await;
        }
        k8s.gc().await.expect("gc k8s.io");
        client.gc().await.expect("gc");
        let Some(sn) = self.snapshotter.as_mut() else {
            return;
        };
        let kept = sn
            .wait_for_count(&[], left, std::time::Duration::from_secs(60))
            .await;
        assert_eq!(kept.len(), left, "snapshots left after gc: {kept:#?}");
        sn.kill(nix::sys::signal::Signal::SIGTERM);
        // `staging` too: a download cut short by the kill stays there to
        // be resumed, and the next pull would fetch only the rest.
        for dir in dirs {
            let dir = sn.root().join(dir);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = e.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                }
                .expect("remove a cached layer");
            }
        }
        sn.start_again().await;
        // containerd reconnects to a restarted proxy plugin after about 1 s.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }

    /// The snapshotter; panics when the testbed was started without it.
    pub fn hyperbox(&mut self) -> &mut SnapshotterDaemon {
        self.snapshotter
            .as_mut()
            .expect("testbed started with start_hyperbox")
    }
}
