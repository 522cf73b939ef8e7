//! Who may use the local API: the peer's credentials, read from the unix
//! socket (`SO_PEERCRED`) when it connects, must be root's or those of a
//! member of `agent.api_group`. The socket's mode is a first fence; this
//! is the one that holds when the mode is loosened. What a peer let in
//! may register is bounded too: only cgroups below the runtimes' cgroup
//! parents (`agent.cgroup_parents`), which requests carry from here.

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use nix::unistd::{Gid, Group, User};
use tokio::net::UnixListener;

use crate::cgroup::Parents;

/// Errors of setting up access control.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `agent.api_group` names no group of this node.
    #[error("agent.api_group {0:?} is not a group on this node")]
    UnknownGroup(String),
    /// The group database could not be read.
    #[error("look up agent.api_group {name:?}")]
    Lookup {
        /// The group name.
        name: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// A connected peer's credentials (`None`: the kernel gave none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its uid, gid and pid, as `SO_PEERCRED` reported them.
    pub cred: Option<(u32, u32, Option<i32>)>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Peer {
        Peer {
            cred: stream
                .io()
                .peer_cred()
                .ok()
                .map(|c| (c.uid(), c.gid(), c.pid())),
        }
    }
}

/// Who is let in, and below which cgroup parents they may register
/// containers.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The group whose members are let in besides root: name and gid.
    group: Option<(String, Gid)>,
    /// `agent.cgroup_parents`.
    parents: Parents,
}

impl Access {
    /// Root only.
    pub fn root_only() -> Access {
        Access::default()
    }

    /// Root and the members of `name` (root only when `name` is empty).
    pub fn for_group(name: &str) -> Result<Access, Error> {
        if name.is_empty() {
            return Ok(Access::root_only());
        }
        let group = Group::from_name(name)
            .map_err(|source| Error::Lookup {
                name: name.into(),
                source,
            })?
            .ok_or_else(|| Error::UnknownGroup(name.into()))?;
        Ok(Access::with_gid(name, group.gid))
    }

    /// Root and the members of the group `gid` (named `name` in messages).
    pub fn with_gid(name: &str, gid: Gid) -> Access {
        Access {
            group: Some((name.into(), gid)),
            parents: Parents::default(),
        }
    }

    /// The same, with registrations bounded to below `parents`.
    pub fn with_cgroup_parents(self, parents: Parents) -> Access {
        Access { parents, ..self }
    }

    /// The cgroup parents registrations must lie below.
    pub fn cgroup_parents(&self) -> &Parents {
        &self.parents
    }

    /// The group's gid, if one is configured.
    pub fn gid(&self) -> Option<Gid> {
        self.group.as_ref().map(|g| g.1)
    }

    /// Whether `peer` is let in: uid 0, or the group as its gid, as its
    /// account's primary group, or among its account's supplementary
    /// groups.
    pub fn allows(&self, peer: &Peer) -> bool {
        let Some((uid, gid, _)) = peer.cred else {
            return false;
        };
        if uid == 0 {
            return true;
        }
        let Some((_, group)) = &self.group else {
            return false;
        };
        if gid == group.as_raw() {
            return true;
        }
        let Ok(Some(user)) = User::from_uid(uid.into()) else {
            return false;
        };
        if user.gid == *group {
            return true;
        }
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid).is_ok_and(|gs| gs.contains(group))
    }

    /// Who may connect, for refusals.
    fn who(&self) -> String {
        match &self.group {
            Some((name, _)) => format!("root or members of group {name:?} (agent.api_group)"),
            None => "root (set agent.api_group to let a group in)".into(),
        }
    }
}

/// Middleware of the local API: refuses (403) a peer [`Access`] does not
/// let in, and any request without peer credentials; hands the rest on
/// with the [`Access`] in their extensions, for the handlers' own bounds.
pub async fn check(
    State(access): State<std::sync::Arc<Access>>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map_or(Peer { cred: None }, |ConnectInfo(p)| *p);
    if access.allows(&peer) {
        req.extensions_mut().insert(access.clone());
        return next.run(req).await;
    }
    tracing::warn!(peer = ?peer.cred, path = %req.uri().path(), "local API peer refused");
    (
        StatusCode::FORBIDDEN,
        format!(
            "the agent's local API serves only {}; this peer is {}",
            access.who(),
            match peer.cred {
                Some((uid, gid, _)) => format!("uid {uid} gid {gid}"),
                None => "unknown".into(),
            }
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            cred: Some((uid, gid, None)),
        }
    }

    #[test]
    fn root_or_the_group_only() {
        let root_only = Access::root_only();
        assert!(root_only.allows(&peer(0, 0)));
        assert!(!root_only.allows(&peer(65534, 65534)));
        // Group 0 alone is not root.
        assert!(!root_only.allows(&peer(1000, 0)));
        assert!(!root_only.allows(&Peer { cred: None }));
        let ops = Access::with_gid("ops", Gid::from_raw(4242));
        assert!(ops.allows(&peer(0, 0)));
        assert!(ops.allows(&peer(54321, 4242)));
        assert!(!ops.allows(&peer(54321, 4243)));
        assert!(!ops.allows(&Peer { cred: None }));
        assert!(matches!(
            Access::for_group("no-such-group-hb"),
            Err(Error::UnknownGroup(_))
        ));
        assert!(Access::for_group("").unwrap().gid().is_none());
    }
}
