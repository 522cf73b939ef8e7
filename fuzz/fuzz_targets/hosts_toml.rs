//! containerd's `hosts.toml` as hyperbox reads it (`registry/src/hosts.rs`):
//! arbitrary bytes as the file of one registry host. Every endpoint it
//! yields must be an http(s) URL of the API, with a host.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use hyperbox_registry::hosts::endpoints;
use libfuzzer_sys::fuzz_target;

/// `<dir>/registry.test/hosts.toml`, made once per process (the parser is
/// only reachable through the file, as containerd lays it out).
fn config_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // scripts/fuzz.sh points TMPDIR at a scratch directory it removes.
        let dir = std::env::temp_dir().join(format!("hyperbox-fuzz-hosts-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("registry.test")).expect("create config dir");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = config_dir();
    std::fs::write(dir.join("registry.test/hosts.toml"), data).expect("write hosts.toml");
    // A loopback API host also exercises the plain-http fallback.
    let Ok(eps) = endpoints(dir, "registry.test", "localhost:5000") else {
        return;
    };
    assert!(!eps.is_empty(), "no endpoint at all");
    for e in eps {
        assert!(
            e.base.starts_with("https://") || e.base.starts_with("http://"),
            "{}",
            e.base
        );
        assert!(!e.host.is_empty(), "endpoint {} without host", e.base);
    }
});
