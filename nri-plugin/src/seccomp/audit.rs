//! Syscalls outside an installed profile, as the kernel's audit reports
//! them: enforcing profiles carry `SECCOMP_FILTER_FLAG_LOG` and complaining
//! ones default to `SCMP_ACT_LOG`, so each such call emits an
//! `AUDIT_SECCOMP` record (type 1326).
//!
//! Why audit and not the tracer: the kernel runs seccomp before the
//! `sys_enter` tracepoint, so a denied syscall never reaches the tracer.
//! The records are read from the audit netlink socket's read-only
//! multicast group (`AUDIT_NLGRP_READLOG`), which any number of readers
//! may join beside auditd, without becoming (or displacing) the audit
//! daemon. No crate reads it; the framing is the plain netlink header.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::io::unix::AsyncFd;

use super::names::Arch;

/// `AUDIT_SECCOMP`.
const AUDIT_SECCOMP: u16 = 1326;
/// `AUDIT_NLGRP_READLOG`, as a bind mask.
const READLOG_GROUP: u32 = 1;
const NLMSG_HDRLEN: usize = 16;

/// One seccomp audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The caller's host pid (thread group).
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Entry the syscall came through.
    pub arch: Arch,
    /// Syscall number (in `arch`'s numbering).
    pub nr: u32,
    /// The filter's action (`SECCOMP_RET_*`, without data).
    pub code: u32,
}

/// The audit multicast socket.
#[derive(Debug)]
pub struct Reader {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl Reader {
    /// Joins the read-only audit log group (needs CAP_AUDIT_READ in the
    /// initial user namespace).
    pub fn open() -> std::io::Result<Reader> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkAudit,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, READLOG_GROUP))?;
        // SAFETY: `fd` is the socket just opened; the AsyncFd owns it and
        // nothing else closes or replaces it while the AsyncFd lives.
        let fd =
            unsafe { AsyncFd::register(fd) }.map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Reader {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// The next seccomp records (waits for a datagram; others are skipped).
    pub async fn next(&mut self) -> std::io::Result<Vec<Record>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let n = match guard.try_io(|fd| {
                recv(
                    fd.get_ref().as_raw_fd(),
                    &mut self.buf,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // The kernel dropped records for us under a flood:
                    // those reports are lost, later ones still come.
                    tracing::warn!("audit records lost (receive buffer full)");
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            };
            let records = parse_datagram(&self.buf[..n]);
            if !records.is_empty() {
                return Ok(records);
            }
        }
    }
}

/// The seccomp records in one netlink datagram.
pub fn parse_datagram(mut d: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    while d.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([d[0], d[1], d[2], d[3]]) as usize;
        let kind = u16::from_ne_bytes([d[4], d[5]]);
        if len < NLMSG_HDRLEN || len > d.len() {
            break;
        }
        if kind == AUDIT_SECCOMP
            && let Some(r) = parse_record(&String::from_utf8_lossy(&d[NLMSG_HDRLEN..len]))
        {
            out.push(r);
        }
        let next = (len + 3) & !3;
        d = d.get(next..).unwrap_or_default();
    }
    out
}

/// Parses an `AUDIT_SECCOMP` record's text (`audit(…): auid=… pid=… comm="…"
/// … arch=c000003e syscall=272 compat=0 … code=0x50000`).
pub fn parse_record(text: &str) -> Option<Record> {
    let text = text.trim_end_matches('\0');
    let field = |key: &str| -> Option<&str> {
        let at = text.find(&format!(" {key}="))? + key.len() + 2;
        let rest = &text[at..];
        if let Some(quoted) = rest.strip_prefix('"') {
            quoted.split('"').next()
        } else {
            rest.split(' ').next()
        }
    };
    let pid = field("pid")?.parse().ok()?;
    let arch = Arch::from_audit(field("arch")?)?;
    let nr = field("syscall")?.parse().ok()?;
    let code = u32::from_str_radix(field("code")?.trim_start_matches("0x"), 16).ok()?;
    let comm = match text.find(" comm=\"") {
        Some(_) => field("comm").unwrap_or_default().to_string(),
        // Audit hex-encodes a name with spaces or quotes.
        None => field("comm").map(unhex).unwrap_or_default(),
    };
    Some(Record {
        pid,
        comm,
        arch,
        nr,
        code,
    })
}

fn unhex(s: &str) -> String {
    let bytes: Vec<u8> = (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_records_are_read_as_the_kernel_writes_them() {
        let r = parse_record(
            "audit(1796236332.270:2): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=15685 \
             comm=\"unshare\" exe=\"/bin/busybox\" sig=0 arch=c000003e syscall=272 compat=0 \
             ip=0x7f6b5cd710f7 code=0x50000",
        )
        .unwrap();
        assert_eq!(
            r,
            Record {
                pid: 15685,
                comm: "unshare".into(),
                arch: Arch::X8664,
                nr: 272,
                code: 0x50000
            }
        );
        let hex = parse_record(
            "audit(1.2:3): pid=9 comm=6D7920617070 exe=\"/a\" sig=0 arch=40000003 syscall=20 compat=1 ip=0x1 code=0x7ffc0000",
        )
        .unwrap();
        assert_eq!(
            (hex.comm.as_str(), hex.arch, hex.nr),
            ("my app", Arch::X86, 20)
        );
        assert!(parse_record("audit(1.2:3): pid=x arch=c000003e").is_none());
    }

    #[test]
    fn a_datagram_is_split_into_its_records() {
        let text = b"audit(1.2:3): pid=7 comm=\"a\" arch=c000003e syscall=101 code=0x50000";
        let mut d = Vec::new();
        for kind in [1300u16, AUDIT_SECCOMP] {
            let len = NLMSG_HDRLEN + text.len();
            d.extend_from_slice(&(len as u32).to_ne_bytes());
            d.extend_from_slice(&kind.to_ne_bytes());
            d.extend_from_slice(&[0; 10]);
            d.extend_from_slice(text);
            d.resize((d.len() + 3) & !3, 0);
        }
        let r = parse_datagram(&d);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].nr, 101);
        // Truncated garbage stops the walk, it does not panic.
        assert!(parse_datagram(&d[..20]).is_empty());
    }
}
