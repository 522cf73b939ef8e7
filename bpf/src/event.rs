//! Decoding the ring buffer's records into [`Event`]s.
//!
//! A record is copied out of its bytes through its mirror in
//! [`crate::records`] (so a record at any alignment decodes), after a
//! length check that refuses a short one; the open record's path, sent
//! only up to its NUL, is the bounded tail after its fixed part.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use zerocopy::FromBytes;

use crate::records::{
    AF_INET, ARGS_LEN, ExecEvent, FlowEvent, OomEvent, OpenHead, PATH_LEN, RefusedEvent, kind,
};

/// An event from the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A process in a traced container executed a new image.
    Exec {
        /// Its pid (host view).
        pid: u32,
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time, ns.
        time_ns: u64,
        /// The executed path.
        path: String,
        /// The first arguments (up to 128 bytes of argv).
        args: Vec<String>,
    },
    /// A process in a traced container called open/openat.
    Open {
        /// Its pid.
        pid: u32,
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time, ns.
        time_ns: u64,
        /// The path as passed (relative paths are relative to the caller).
        path: String,
        /// The open flags (`O_*`).
        flags: u32,
    },
    /// A TCP connection of a traced container closed.
    Flow {
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time of the close, ns.
        time_ns: u64,
        /// The container connected (false: it accepted).
        outbound: bool,
        /// Local address and port (v4-mapped IPv6 shown as IPv4).
        local: SocketAddr,
        /// Remote address and port.
        remote: SocketAddr,
        /// Bytes received.
        bytes_in: u64,
        /// Bytes sent and acknowledged.
        bytes_out: u64,
        /// How long the connection lived, ns.
        duration_ns: u64,
    },
    /// A syscall of a container under an installed seccomp profile
    /// returned EPERM or ENOSYS (the first time for its number): its
    /// profile's denial, or the kernel's own refusal.
    Refused {
        /// The caller's pid.
        pid: u32,
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time, ns.
        time_ns: u64,
        /// The syscall number ([`crate::COMPAT`] set for the 32-bit entry).
        nr: u32,
        /// The negative errno returned.
        ret: i32,
        /// The caller's command name.
        comm: String,
    },
    /// The OOM killer chose a process of a traced container.
    OomKill {
        /// The victim's pid.
        pid: u32,
        /// Its v2 cgroup id.
        cgroup: u64,
        /// Kernel monotonic time, ns.
        time_ns: u64,
    },
}

/// Decodes one ring buffer record; `None` for unknown or short records.
pub fn parse_event(b: &[u8]) -> Option<Event> {
    let (record_kind, _) = u32::read_from_prefix(b).ok()?;
    match record_kind {
        kind::EXEC => exec(b),
        kind::OPEN => open(b),
        kind::FLOW => flow(b),
        kind::OOM_KILL => oom_kill(b),
        kind::REFUSED => refused(b),
        _ => None,
    }
}

fn exec(b: &[u8]) -> Option<Event> {
    let (e, _) = ExecEvent::read_from_prefix(b).ok()?;
    let args_len = (e.args_len as usize).min(ARGS_LEN);
    let args = e.args[..args_len]
        .split(|c| *c == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(Event::Exec {
        pid: e.head.pid,
        cgroup: e.head.cgroup,
        time_ns: e.head.time_ns,
        path: cstr(&e.path),
        args,
    })
}

fn open(b: &[u8]) -> Option<Event> {
    let (o, path) = OpenHead::read_from_prefix(b).ok()?;
    // The kernel sends at least the path's NUL: a record without a byte of
    // path is cut short.
    if path.is_empty() {
        return None;
    }
    Some(Event::Open {
        pid: o.head.pid,
        cgroup: o.head.cgroup,
        time_ns: o.head.time_ns,
        flags: o.flags,
        path: cstr(&path[..path.len().min(PATH_LEN)]),
    })
}

fn flow(b: &[u8]) -> Option<Event> {
    let (f, _) = FlowEvent::read_from_prefix(b).ok()?;
    let v4 = f.family == AF_INET;
    // Addresses are in network order as the kernel keeps them.
    let addr = |raw: [u8; 16]| -> IpAddr {
        if v4 {
            let [a, b, c, d, ..] = raw;
            return Ipv4Addr::new(a, b, c, d).into();
        }
        let v6 = Ipv6Addr::from(raw);
        v6.to_ipv4_mapped().map_or(v6.into(), IpAddr::V4)
    };
    Some(Event::Flow {
        cgroup: f.head.cgroup,
        time_ns: f.head.time_ns,
        outbound: f.outbound != 0,
        local: SocketAddr::new(addr(f.saddr), f.sport),
        remote: SocketAddr::new(addr(f.daddr), f.dport),
        bytes_in: f.bytes_in,
        bytes_out: f.bytes_out,
        duration_ns: f.duration_ns,
    })
}

fn oom_kill(b: &[u8]) -> Option<Event> {
    let (k, _) = OomEvent::read_from_prefix(b).ok()?;
    Some(Event::OomKill {
        pid: k.head.pid,
        cgroup: k.head.cgroup,
        time_ns: k.head.time_ns,
    })
}

fn refused(b: &[u8]) -> Option<Event> {
    let (r, _) = RefusedEvent::read_from_prefix(b).ok()?;
    Some(Event::Refused {
        pid: r.head.pid,
        cgroup: r.head.cgroup,
        time_ns: r.head.time_ns,
        nr: r.nr,
        ret: r.ret,
        comm: cstr(&r.comm),
    })
}

/// The string up to the first NUL, or all of `b` if it has none.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use zerocopy::{FromZeros, IntoBytes};

    use super::*;
    use crate::records::{EventHead, OpenEvent};

    fn head(kind: u32, pid: u32) -> EventHead {
        EventHead {
            kind,
            pid,
            cgroup: 7,
            time_ns: 11,
        }
    }

    /// Fills the start of `dst` with `src`.
    fn put(dst: &mut [u8], src: &[u8]) {
        dst[..src.len()].copy_from_slice(src);
    }

    /// `rec`'s bytes starting one byte into the buffer, as no ring hands
    /// them out but a caller of `parse_event` may.
    fn misaligned(rec: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; rec.len() + 1];
        b[1..].copy_from_slice(rec);
        b
    }

    #[test]
    fn refused_record_round_trips() {
        let mut r = RefusedEvent::new_zeroed();
        r.head = head(kind::REFUSED, 5);
        r.nr = 272;
        r.ret = -1;
        put(&mut r.comm, b"unshare");
        let want = Event::Refused {
            pid: 5,
            cgroup: 7,
            time_ns: 11,
            nr: 272,
            ret: -1,
            comm: "unshare".into(),
        };
        assert_eq!(
            parse_event(misaligned(r.as_bytes()).get(1..).unwrap()),
            Some(want)
        );
        assert_eq!(parse_event(&r.as_bytes()[..40]), None);
    }

    #[test]
    fn exec_record_round_trips_and_short_ones_are_refused() {
        let mut e = ExecEvent::new_zeroed();
        e.head = head(kind::EXEC, 42);
        put(&mut e.path, b"/bin/echo");
        put(&mut e.args, b"echo\0hello\0\0");
        e.args_len = 12;
        let want = Event::Exec {
            pid: 42,
            cgroup: 7,
            time_ns: 11,
            path: "/bin/echo".into(),
            args: vec!["echo".into(), "hello".into()],
        };
        assert_eq!(parse_event(e.as_bytes()), Some(want.clone()));
        assert_eq!(parse_event(&misaligned(e.as_bytes())[1..]), Some(want));
        // An args_len past the array is bounded by it, not trusted.
        e.args_len = u32::MAX;
        put(&mut e.args, &[b'x'; ARGS_LEN]);
        assert!(matches!(
            parse_event(e.as_bytes()),
            Some(Event::Exec { ref args, .. }) if args[0].len() == ARGS_LEN
        ));
        let b = e.as_bytes();
        assert_eq!(parse_event(&b[..b.len() - 1]), None);
        assert_eq!(parse_event(&b[..40]), None);
    }

    #[test]
    fn open_record_carries_only_the_path_it_has() {
        let mut o = OpenEvent::new_zeroed();
        o.open.head = head(kind::OPEN, 5);
        o.open.flags = 0o101;
        put(&mut o.path, b"/etc/hostname");
        let want = Event::Open {
            pid: 5,
            cgroup: 7,
            time_ns: 11,
            path: "/etc/hostname".into(),
            flags: 0o101,
        };
        assert_eq!(parse_event(o.as_bytes()), Some(want.clone()));
        // As the kernel sends it: the path's bytes and NUL, padded to 8.
        let sent = &o.as_bytes()[..48];
        assert_eq!(parse_event(sent), Some(want.clone()));
        assert_eq!(parse_event(&misaligned(sent)[1..]), Some(want));
        // An unreadable path is sent as its NUL alone.
        let head_only = size_of::<OpenHead>();
        let mut empty = o.as_bytes()[..head_only + 1].to_vec();
        empty[head_only] = 0;
        assert!(matches!(
            parse_event(&empty),
            Some(Event::Open { ref path, .. }) if path.is_empty()
        ));
        // Without one byte of path the record is cut short.
        assert_eq!(parse_event(&o.as_bytes()[..head_only]), None);
        assert_eq!(parse_event(&o.as_bytes()[..head_only - 1]), None);
    }

    #[test]
    fn open_path_without_nul_ends_with_the_record_or_the_path_array() {
        let mut o = OpenEvent::new_zeroed();
        o.open.head = head(kind::OPEN, 5);
        o.path.fill(b'a');
        assert!(matches!(
            parse_event(&o.as_bytes()[..40]),
            Some(Event::Open { ref path, .. }) if path == "aaaaaaaa"
        ));
        // Bytes past the largest open record are not part of the path.
        let mut long = o.as_bytes().to_vec();
        long.extend_from_slice(b"bbbb");
        assert!(matches!(
            parse_event(&long),
            Some(Event::Open { ref path, .. }) if *path == "a".repeat(PATH_LEN)
        ));
    }

    fn flow_record(family: u16, saddr: [u8; 16], daddr: [u8; 16]) -> FlowEvent {
        FlowEvent {
            head: head(kind::FLOW, 0),
            outbound: 1,
            family,
            sport: 40000,
            dport: 7777,
            bytes_in: 5,
            bytes_out: 6,
            duration_ns: 9,
            saddr,
            daddr,
            ..FlowEvent::default()
        }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&a);
        raw
    }

    #[test]
    fn flow_record_round_trips_for_each_address_family() {
        let f = flow_record(AF_INET, v4([127, 0, 0, 1]), v4([127, 0, 0, 2]));
        assert_eq!(
            parse_event(f.as_bytes()),
            Some(Event::Flow {
                cgroup: 7,
                time_ns: 11,
                outbound: true,
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "127.0.0.2:7777".parse().unwrap(),
                bytes_in: 5,
                bytes_out: 6,
                duration_ns: 9,
            })
        );
        let ends = |f: &FlowEvent| match parse_event(&misaligned(f.as_bytes())[1..]) {
            Some(Event::Flow { local, remote, .. }) => (local.to_string(), remote.to_string()),
            other => panic!("{other:?}"),
        };
        // IPv6, and v4-mapped IPv6 (a dual-stack listener's peer) as IPv4.
        let f = flow_record(
            10,
            Ipv6Addr::LOCALHOST.octets(),
            Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets(),
        );
        assert_eq!(ends(&f), ("[::1]:40000".into(), "10.1.2.3:7777".into()));
        let b = f.as_bytes();
        assert_eq!(parse_event(&b[..b.len() - 1]), None);
        assert_eq!(parse_event(&b[..size_of::<EventHead>()]), None);
    }

    #[test]
    fn oom_record_round_trips_and_short_ones_are_refused() {
        let k = OomEvent {
            head: head(kind::OOM_KILL, 9),
        };
        assert_eq!(
            parse_event(k.as_bytes()),
            Some(Event::OomKill {
                pid: 9,
                cgroup: 7,
                time_ns: 11
            })
        );
        assert_eq!(parse_event(&k.as_bytes()[..23]), None);
    }

    #[test]
    fn unknown_kinds_and_scraps_are_refused() {
        let mut k = OomEvent {
            head: head(kind::OOM_KILL, 9),
        };
        k.head.kind = 9;
        assert_eq!(parse_event(k.as_bytes()), None);
        assert_eq!(parse_event(&kind::OOM_KILL.to_ne_bytes()[..3]), None);
        assert_eq!(parse_event(&[]), None);
    }
}
