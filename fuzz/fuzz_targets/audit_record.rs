//! The audit reader (`nri-plugin/src/seccomp/audit.rs`): arbitrary bytes
//! as a netlink datagram from the audit multicast group, and as one
//! record's text. A record names the process that made the call, and its
//! `comm` is the tenant's to choose: parsing must not panic or loop, a
//! datagram yields at most one record per netlink header it can hold, and
//! a quoted name never swallows the fields after it.

#![no_main]

use hyperbox_nri::seccomp::audit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let records = audit::parse_datagram(data);
    assert!(records.len() <= data.len() / 16, "{} records", records.len());
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(r) = audit::parse_record(text)
    {
        assert!(!r.comm.contains('"'), "{r:?}");
    }
});
