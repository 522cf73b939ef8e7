//! Seccomp profiles the agent reads (`nri-plugin/src/seccomp`): arbitrary
//! bytes as the OCI `linux.seccomp` a client wrote into a spec (the shim
//! sends it with every container) or a profile given to
//! `PUT /v1/profiles`. Telling its kind and listing its names must not
//! panic; a profile libseccomp compiles lists only names the profile
//! allows; and once compiled it must survive the trip through NRI's
//! adjustment (containerd 2.2+) with the same default action and allowed
//! set, so what NRI installs is what was checked.

#![no_main]

use hyperbox_nri::seccomp::{nri, profile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = profile::SpecKind::of_spec(Some(&v));
    let names = profile::allowed_names(&v);
    let Ok(compiled) = profile::compile(&v) else {
        return;
    };
    assert!(
        compiled.allowed.is_subset(&names),
        "compiled allows {:?} beyond the profile's {:?}",
        compiled.allowed,
        names
    );
    let through_nri = nri::to_json(&nri::from_json(&v));
    let again = profile::compile(&through_nri)
        .unwrap_or_else(|e| panic!("refused after the NRI round trip: {e}\n{through_nri}"));
    assert_eq!(again.default_action, compiled.default_action);
    assert_eq!(again.allowed, compiled.allowed);
});
