//! containerd's Task service over runc: one container per `Create` (many
//! in a pod's shim), exec processes, exits and OOM kills published as
//! events, and the agent told about each container at create, start and
//! delete.
//!
//! Locks are held only to read or change the bookkeeping, never across a
//! runc call or a wait, so `State` and `Wait` answer while `Create` runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::monitor::{Subject, Topic, monitor_subscribe};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Task, TtrpcContext, TtrpcResult};
use runc::options::{CreateOpts, DeleteOpts, KillOpts};
use tokio::sync::watch;

use crate::cgroup::Cgroups;
use crate::events::{self, Event};
use crate::options::Runtime;
use crate::policy::{Agent, Registration};
use crate::runc_cli::{self, Exec, RuncCli};
use crate::stdio::{Attached, Prepared, Stdio, attach};

/// How long Delete waits for a process's output to be delivered.
const DRAIN: Duration = Duration::from_secs(5);
/// Exits of processes not yet known (a short exec) are kept this long.
const UNCLAIMED_FOR: Duration = Duration::from_secs(30);
/// What the shim writes in a bundle to clean up after a dead shim.
const RUNC_STATE: &str = "hyperbox-runc.json";

/// A process's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exited {
    code: u32,
    at: SystemTime,
}

/// A container's init or an exec process.
#[derive(Debug)]
struct Proc {
    stdio: Stdio,
    pid: u32,
    started: bool,
    exit: watch::Sender<Option<Exited>>,
    io: Option<Attached>,
    /// The exec's OCI process (JSON as containerd sent it), until it
    /// starts.
    spec: Option<Vec<u8>>,
}

impl Proc {
    fn new(stdio: Stdio) -> Proc {
        Proc {
            stdio,
            pid: 0,
            started: false,
            exit: watch::channel(None).0,
            io: None,
            spec: None,
        }
    }

    fn exited(&self) -> Option<Exited> {
        *self.exit.borrow()
    }

    fn status(&self, paused: bool) -> Status {
        match (self.exited(), self.started, paused) {
            (Some(_), _, _) => Status::STOPPED,
            (None, true, true) => Status::PAUSED,
            (None, true, false) => Status::RUNNING,
            (None, false, _) => Status::CREATED,
        }
    }
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    runc: RuncCli,
    rootfs: Option<PathBuf>,
    io_owner: (u32, u32),
    init: Proc,
    execs: HashMap<String, Proc>,
    paused: bool,
    agent: Option<(Agent, Registration)>,
    oom: Option<tokio::task::JoinHandle<()>>,
}

impl Container {
    fn proc(&self, exec_id: &str) -> Option<&Proc> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    fn proc_mut(&mut self, exec_id: &str) -> Option<&mut Proc> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

#[derive(Debug, Default)]
struct Book {
    containers: HashMap<String, Container>,
    /// Exits of pids no process claims yet.
    unclaimed: HashMap<u32, Exited>,
}

impl Book {
    fn container(&self, id: &str) -> Result<&Container, ttrpc::Error> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }

    fn container_mut(&mut self, id: &str) -> Result<&mut Container, ttrpc::Error> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<&Proc, ttrpc::Error> {
        self.container(id)?
            .proc(exec_id)
            .ok_or_else(|| not_found(&format!("process {id}/{exec_id}")))
    }

    /// Gives `pid` to a process and returns the exit it had before anyone
    /// knew its pid, if any.
    fn claim(&mut self, id: &str, exec_id: &str, pid: u32) -> Option<Exited> {
        let early = self.unclaimed.remove(&pid);
        let p = self.containers.get_mut(id)?.proc_mut(exec_id)?;
        p.pid = pid;
        if early.is_some() {
            p.exit.send_replace(early);
        }
        early
    }
}

/// The Task service.
#[derive(Clone)]
pub struct TaskService {
    namespace: String,
    exit: Arc<ExitSignal>,
    publisher: Arc<RemotePublisher>,
    book: Arc<Mutex<Book>>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn not_found(what: &str) -> ttrpc::Error {
    status(Code::NOT_FOUND, format!("{what}: not found"))
}

/// Now, as containerd's events carry it.
pub fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Which runc, with which state directory: from containerd's options,
/// else the config. Recorded in the bundle so that a `shim delete` after
/// the shim died uses the same.
#[derive(serde::Serialize, serde::Deserialize)]
struct RuncState {
    binary: String,
    root: PathBuf,
    systemd: bool,
}

impl RuncState {
    fn resolve(cfg: &hyperbox_config::Config, opts: &Runtime, namespace: &str) -> RuncState {
        let pick = |given: &str, default: &str| {
            if given.is_empty() {
                default.to_string()
            } else {
                given.to_string()
            }
        };
        RuncState {
            binary: pick(&opts.binary_name, &cfg.shim.runc),
            root: PathBuf::from(pick(&opts.root, &cfg.shim.root.to_string_lossy())).join(namespace),
            systemd: opts.systemd_cgroup,
        }
    }

    /// runc for the container in `bundle`, logging there.
    fn runc(&self, bundle: &Path) -> Result<RuncCli, ttrpc::Error> {
        RuncCli::new(
            &self.binary,
            &self.root,
            self.systemd,
            runc_cli::log_of(bundle),
        )
        .map_err(|e| status(Code::FAILED_PRECONDITION, e))
    }
}

fn load_config(opts: &Runtime) -> Result<hyperbox_config::Config, ttrpc::Error> {
    let env = std::env::var_os("HYPERBOX_CONFIG").map(PathBuf::from);
    let path = opts.config_path.clone().or(env);
    hyperbox_config::Config::load(path.as_deref())
        .map_err(|e| status(Code::INVALID_ARGUMENT, hyperbox_api::error_chain(&e)))
}

fn unmount(rootfs: &Path) {
    if let Err(e) = nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH)
        && e != nix::errno::Errno::EINVAL
        && e != nix::errno::Errno::ENOENT
    {
        tracing::warn!(rootfs = %rootfs.display(), error = %e, "cannot unmount the rootfs");
    }
}

/// Cleans up after a shim killed with -9: the container's runc state and
/// its rootfs mount (containerd's `shim delete`).
pub async fn cleanup_after_dead_shim(namespace: &str, id: &str, bundle: &Path) {
    let state = std::fs::read(bundle.join(RUNC_STATE))
        .ok()
        .and_then(|b| serde_json::from_slice::<RuncState>(&b).ok());
    let runc = match state {
        Some(s) => s.runc(bundle),
        None => load_config(&Runtime::default())
            .and_then(|cfg| RuncState::resolve(&cfg, &Runtime::default(), namespace).runc(bundle)),
    };
    match runc {
        Ok(r) => {
            if let Err(e) = r.delete(id, Some(&DeleteOpts { force: true })).await {
                tracing::warn!(container = id, error = %e, "runc delete after the shim died");
            }
        }
        Err(e) => tracing::warn!(container = id, error = %e, "no runc to clean up with"),
    }
    unmount(&bundle.join("rootfs"));
}

impl TaskService {
    /// A service for `namespace`; starts following exits.
    pub async fn new(
        namespace: &str,
        exit: Arc<ExitSignal>,
        publisher: RemotePublisher,
    ) -> TaskService {
        let s = TaskService {
            namespace: namespace.to_string(),
            exit,
            publisher: Arc::new(publisher),
            book: Arc::new(Mutex::new(Book::default())),
        };
        match monitor_subscribe(Topic::Pid).await {
            Ok(sub) => {
                let me = s.clone();
                let mut rx = sub.rx;
                tokio::spawn(async move {
                    while let Some(e) = rx.recv().await {
                        if let Subject::Pid(pid) = e.subject {
                            me.on_exit(pid as u32, e.exit_code).await;
                        }
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot follow process exits"),
        }
        s
    }

    async fn publish<E: Event>(&self, topic: &str, event: E) {
        let sent = match events::envelope(topic, &self.namespace, now(), &event) {
            Ok(envelope) => events::send(&self.publisher, envelope).await,
            Err(e) => Err(ttrpc::Error::Others(e.to_string())),
        };
        if let Err(e) = sent {
            tracing::warn!(topic, error = %e, "cannot publish the event");
        }
    }

    /// Records an exit and publishes it, or keeps it until a process
    /// claims its pid.
    async fn on_exit(&self, pid: u32, code: i32) {
        let e = Exited {
            code: code as u32,
            at: SystemTime::now(),
        };
        let found = {
            let mut book = self.book.lock().expect("book lock");
            let found = book.containers.iter().find_map(|(id, c)| {
                if c.init.pid == pid && c.init.exited().is_none() {
                    return Some((id.clone(), String::new()));
                }
                c.execs
                    .iter()
                    .find(|(_, p)| p.pid == pid && p.exited().is_none())
                    .map(|(x, _)| (id.clone(), x.clone()))
            });
            match &found {
                Some((id, exec)) => {
                    if let Some(p) = book.containers.get_mut(id).and_then(|c| c.proc_mut(exec)) {
                        p.exit.send_replace(Some(e));
                    }
                }
                None => {
                    // runc's own CLI processes end here too: keep only
                    // recent ones.
                    book.unclaimed
                        .retain(|_, u| u.at.elapsed().is_ok_and(|d| d < UNCLAIMED_FOR));
                    book.unclaimed.insert(pid, e);
                }
            }
            found
        };
        if let Some((id, exec_id)) = found {
            self.publish_exit(&id, &exec_id, pid, e).await;
        }
    }

    /// Publishes a process's exit.
    async fn publish_exit(&self, id: &str, exec_id: &str, pid: u32, e: Exited) {
        tracing::debug!(container = %id, exec = %exec_id, pid, code = e.code, "exited");
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                pid,
                exit_status: e.code,
                exited_at: MessageField::some(timestamp(e.at)),
                ..Default::default()
            },
        )
        .await;
    }

    fn runc_of(&self, id: &str) -> Result<RuncCli, ttrpc::Error> {
        Ok(self
            .book
            .lock()
            .expect("book lock")
            .container(id)?
            .runc
            .clone())
    }

    fn init_pid(&self, id: &str) -> Result<u32, ttrpc::Error> {
        Ok(self.book.lock().expect("book lock").container(id)?.init.pid)
    }

    async fn create_inner(
        &self,
        req: &CreateTaskRequest,
    ) -> Result<CreateTaskResponse, ttrpc::Error> {
        let id = req.id.as_str();
        if self
            .book
            .lock()
            .expect("book lock")
            .containers
            .contains_key(id)
        {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        let opts = Runtime::from_any(req.options.as_ref())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let cfg = load_config(&opts)?;
        let state = RuncState::resolve(&cfg, &opts, &self.namespace);
        let bundle = PathBuf::from(&req.bundle);
        let runc = state.runc(&bundle)?;
        let _ = std::fs::write(
            bundle.join(RUNC_STATE),
            serde_json::to_vec(&state).unwrap_or_default(),
        );

        // The rootfs containerd's snapshotter prepared.
        let rootfs = (!req.rootfs.is_empty()).then(|| bundle.join("rootfs"));
        if let Some(target) = &rootfs {
            std::fs::create_dir_all(target)
                .map_err(|e| status(Code::INTERNAL, format!("rootfs dir: {e}")))?;
            for m in &req.rootfs {
                if let Err(e) = containerd_shim::util::mount_rootfs(m, target).await {
                    unmount(target);
                    return Err(status(
                        Code::INTERNAL,
                        format!("mount the rootfs ({}): {e}", m.type_),
                    ));
                }
            }
        }
        let fail = |e: ttrpc::Error| {
            if let Some(t) = &rootfs {
                unmount(t);
            }
            e
        };

        // The agent's policy goes into config.json before runc reads it.
        let agent = Agent::new(&cfg);
        let mut registration = match agent.before_create(&bundle, &self.namespace, id).await {
            Ok(r) => r,
            Err(e) => return Err(fail(status(Code::FAILED_PRECONDITION, e.to_string()))),
        };

        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let prepared = Prepared::new(&stdio, &std::env::temp_dir(), opts.io_uid, opts.io_gid)
            .map_err(|e| fail(status(Code::INTERNAL, format!("stdio: {e}"))))?;
        let pid_file = bundle.join("init.pid");
        let mut copts = CreateOpts::new()
            .pid_file(&pid_file)
            .no_pivot(opts.no_pivot_root)
            .no_new_keyring(opts.no_new_keyring);
        match &prepared {
            Prepared::Pipes(io) => copts = copts.io(io.clone()),
            Prepared::Console(sock) => copts = copts.console_socket(sock.path()),
        }
        // Known before runc runs, so an early exit finds its container.
        {
            let mut book = self.book.lock().expect("book lock");
            book.containers.insert(
                id.to_string(),
                Container {
                    bundle: bundle.clone(),
                    runc: runc.clone(),
                    rootfs: rootfs.clone(),
                    io_owner: (opts.io_uid, opts.io_gid),
                    init: Proc::new(stdio.clone()),
                    execs: HashMap::new(),
                    paused: false,
                    agent: None,
                    oom: None,
                },
            );
        }
        let forget = |this: &TaskService| {
            this.book.lock().expect("book lock").containers.remove(id);
        };
        if let Err(e) = runc.create(id, &bundle, Some(&copts)).await {
            forget(self);
            return Err(fail(runc.failed("create", e)));
        }
        let pid = match std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            Some(p) => p,
            None => {
                let _ = runc.delete(id, Some(&DeleteOpts { force: true })).await;
                forget(self);
                return Err(fail(status(Code::INTERNAL, "runc create wrote no pid")));
            }
        };
        let attached = match attach(prepared, &stdio, id, &self.namespace).await {
            Ok(a) => a,
            Err(e) => {
                let _ = runc.delete(id, Some(&DeleteOpts { force: true })).await;
                forget(self);
                return Err(fail(status(Code::INTERNAL, format!("stdio: {e}"))));
            }
        };
        // Registered before start: tracing is in place before the
        // workload's first instruction.
        if let Some(reg) = registration.as_mut() {
            agent.register(reg, &self.namespace, false).await;
        }
        let oom = match Cgroups::of_pid(pid).and_then(crate::oom::watch) {
            Ok(mut rx) => {
                let me = self.clone();
                let cid = id.to_string();
                Some(tokio::spawn(async move {
                    while rx.recv().await.is_some() {
                        tracing::info!(container = %cid, "OOM kill");
                        me.publish(
                            topics::TASK_OOM_EVENT_TOPIC,
                            TaskOOM {
                                container_id: cid.clone(),
                                ..Default::default()
                            },
                        )
                        .await;
                    }
                }))
            }
            Err(e) => {
                tracing::warn!(container = id, error = %e, "OOM kills will not be reported");
                None
            }
        };
        let early = {
            let mut book = self.book.lock().expect("book lock");
            if let Some(c) = book.containers.get_mut(id) {
                c.init.io = Some(attached);
                c.agent = registration.map(|r| (agent, r));
                c.oom = oom;
            }
            book.claim(id, "", pid)
        };
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: id.to_string(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            },
        )
        .await;
        // Killed before its pid was known: containerd still hears of it.
        if let Some(e) = early {
            self.publish_exit(id, "", pid, e).await;
        }
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_exec(&self, id: &str, exec_id: &str) -> Result<u32, ttrpc::Error> {
        let (runc, spec, stdio, owner, bundle) = {
            let mut book = self.book.lock().expect("book lock");
            let c = book.container_mut(id)?;
            let (owner, bundle, runc) = (c.io_owner, c.bundle.clone(), c.runc.clone());
            let p = c
                .execs
                .get_mut(exec_id)
                .ok_or_else(|| not_found(&format!("exec {exec_id}")))?;
            let spec = p.spec.take().ok_or_else(|| {
                status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {exec_id} already started"),
                )
            })?;
            (runc, spec, p.stdio.clone(), owner, bundle)
        };
        let prepared = Prepared::new(&stdio, &std::env::temp_dir(), owner.0, owner.1)
            .map_err(|e| status(Code::INTERNAL, format!("stdio: {e}")))?;
        let pid_file = bundle.join(format!("{exec_id}.pid"));
        let (io, console_socket) = match &prepared {
            Prepared::Pipes(io) => (Some(&**io as &dyn runc::Io), None),
            Prepared::Console(sock) => (None, Some(sock.path())),
        };
        runc.exec(Exec {
            id,
            process: &spec,
            bundle: &bundle,
            pid_file: &pid_file,
            io,
            console_socket: console_socket.as_deref(),
        })
        .await
        .map_err(|e| runc.failed("exec", e))?;
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| status(Code::INTERNAL, "runc exec wrote no pid"))?;
        let _ = std::fs::remove_file(&pid_file);
        let early = {
            let mut book = self.book.lock().expect("book lock");
            let early = book.claim(id, exec_id, pid);
            if let Some(p) = book
                .containers
                .get_mut(id)
                .and_then(|c| c.execs.get_mut(exec_id))
            {
                p.started = true;
            }
            early
        };
        let attached = attach(prepared, &stdio, id, &self.namespace)
            .await
            .map_err(|e| status(Code::INTERNAL, format!("stdio: {e}")))?;
        {
            let mut book = self.book.lock().expect("book lock");
            if let Some(p) = book
                .containers
                .get_mut(id)
                .and_then(|c| c.execs.get_mut(exec_id))
            {
                p.io = Some(attached);
            }
        }
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid,
                ..Default::default()
            },
        )
        .await;
        // An exit that came before its pid was known is published now.
        if let Some(e) = early {
            self.publish_exit(id, exec_id, pid, e).await;
        }
        Ok(pid)
    }

    /// Pause (`frozen`) or resume a container and say so.
    async fn freeze(&self, id: &str, frozen: bool) -> Result<Empty, ttrpc::Error> {
        let runc = self.runc_of(id)?;
        let done = if frozen {
            runc.pause(id).await
        } else {
            runc.resume(id).await
        };
        done.map_err(|e| runc.failed(if frozen { "pause" } else { "resume" }, e))?;
        if let Some(c) = self.book.lock().expect("book lock").containers.get_mut(id) {
            c.paused = frozen;
        }
        let container_id = id.to_string();
        if frozen {
            let event = TaskPaused {
                container_id,
                ..Default::default()
            };
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, event).await;
        } else {
            let event = TaskResumed {
                container_id,
                ..Default::default()
            };
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, event).await;
        }
        Ok(Empty::new())
    }

    async fn delete_inner(&self, id: &str, exec_id: &str) -> Result<DeleteResponse, ttrpc::Error> {
        if !exec_id.is_empty() {
            let mut p = {
                let mut book = self.book.lock().expect("book lock");
                let c = book.container_mut(id)?;
                let p = c
                    .execs
                    .get(exec_id)
                    .ok_or_else(|| not_found(&format!("exec {exec_id}")))?;
                if p.started && p.exited().is_none() {
                    return Err(status(
                        Code::FAILED_PRECONDITION,
                        format!("exec {exec_id} is running"),
                    ));
                }
                c.execs.remove(exec_id).expect("just found")
            };
            if let Some(io) = p.io.as_mut() {
                io.drain(DRAIN).await;
            }
            let e = p.exited();
            return Ok(DeleteResponse {
                pid: p.pid,
                exit_status: e.map_or(0, |e| e.code),
                exited_at: MessageField::some(timestamp(e.map_or_else(SystemTime::now, |e| e.at))),
                ..Default::default()
            });
        }
        let (runc, running, started, mut exit_rx) = {
            let book = self.book.lock().expect("book lock");
            let c = book.container(id)?;
            (
                c.runc.clone(),
                c.init.exited().is_none(),
                c.init.started,
                c.init.exit.subscribe(),
            )
        };
        if running && started {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id} is running; kill it first"),
            ));
        }
        if let Err(e) = runc.delete(id, Some(&DeleteOpts { force: !started })).await {
            let e = runc.failed("delete", e);
            if !e.to_string().contains("does not exist") {
                tracing::warn!(container = id, error = %e, "runc delete");
            }
        }
        if running {
            // A created container killed by the forced delete: report its
            // real exit.
            let _ = tokio::time::timeout(Duration::from_secs(2), exit_rx.wait_for(Option::is_some))
                .await;
        }
        let mut c = {
            let mut book = self.book.lock().expect("book lock");
            book.container(id)?;
            book.containers.remove(id).expect("just found")
        };
        if let Some(io) = c.init.io.as_mut() {
            io.drain(DRAIN).await;
        }
        if let Some(h) = c.oom.take() {
            h.abort();
        }
        if let Some(root) = &c.rootfs {
            unmount(root);
        }
        let _ = std::fs::remove_file(c.bundle.join(RUNC_STATE));
        if let Some((agent, _)) = &c.agent {
            agent.unregister(id).await;
        }
        let e = c.init.exited().unwrap_or(Exited {
            code: 128 + libc::SIGKILL as u32,
            at: SystemTime::now(),
        });
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            TaskDelete {
                container_id: id.to_string(),
                pid: c.init.pid,
                exit_status: e.code,
                exited_at: MessageField::some(timestamp(e.at)),
                id: id.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(DeleteResponse {
            pid: c.init.pid,
            exit_status: e.code,
            exited_at: MessageField::some(timestamp(e.at)),
            ..Default::default()
        })
    }
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let book = self.book.lock().expect("book lock");
        let c = book.container(&req.id)?;
        let p = book.process(&req.id, &req.exec_id)?;
        let e = p.exited();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: p.pid,
            status: p.status(c.paused).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: e.map_or(0, |e| e.code),
            exited_at: match e {
                Some(e) => MessageField::some(timestamp(e.at)),
                None => MessageField::none(),
            },
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(container = %req.id, bundle = %req.bundle, terminal = req.terminal, "create");
        self.create_inner(&req).await.inspect_err(|e| {
            tracing::warn!(container = %req.id, error = %e, "create failed");
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        if !req.exec_id.is_empty() {
            let pid = self.start_exec(&req.id, &req.exec_id).await?;
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        let runc = self.runc_of(&req.id)?;
        runc.start(&req.id)
            .await
            .map_err(|e| runc.failed("start", e))?;
        let (pid, agent) = {
            let mut book = self.book.lock().expect("book lock");
            let c = book.container_mut(&req.id)?;
            c.init.started = true;
            (c.init.pid, c.agent.clone())
        };
        // Tracing is in place since create; this only marks the run as
        // started, so the container does not wait for it.
        if let Some((agent, mut reg)) = agent {
            let ns = self.namespace.clone();
            tokio::spawn(async move { agent.register(&mut reg, &ns, true).await });
        }
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            },
        )
        .await;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        self.delete_inner(&req.id, &req.exec_id).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let runc = self.runc_of(&req.id)?;
        let pids = runc.ps(&req.id).await.map_err(|e| runc.failed("ps", e))?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.freeze(&req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.freeze(&req.id, false).await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        if req.exec_id.is_empty() {
            let (runc, exited) = {
                let book = self.book.lock().expect("book lock");
                let c = book.container(&req.id)?;
                (c.runc.clone(), c.init.exited().is_some())
            };
            if exited && !req.all {
                return Err(status(Code::NOT_FOUND, "process already finished"));
            }
            runc.kill(&req.id, req.signal, Some(&KillOpts { all: req.all }))
                .await
                .map_err(|e| runc.failed("kill", e))?;
            return Ok(Empty::new());
        }
        let pid = {
            let book = self.book.lock().expect("book lock");
            let c = book.container(&req.id)?;
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            if p.exited().is_some() {
                return Err(status(Code::NOT_FOUND, "process already finished"));
            }
            if !p.started {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is not started", req.exec_id),
                ));
            }
            p.pid
        };
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|_| status(Code::INVALID_ARGUMENT, format!("signal {}", req.signal)))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .map_err(|e| status(Code::NOT_FOUND, format!("kill exec {}: {e}", req.exec_id)))?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        // Checked to be a JSON object here, where a bad one is the
        // caller's error; runc judges the rest at start, as with runc-v2.
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&req.spec.value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        let spec = req.spec.value.clone();
        {
            let mut book = self.book.lock().expect("book lock");
            let c = book.container_mut(&req.id)?;
            if c.init.exited().is_some() {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is not running", req.id),
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            let mut p = Proc::new(Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            });
            p.spec = Some(spec);
            c.execs.insert(req.exec_id.clone(), p);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        )
        .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let book = self.book.lock().expect("book lock");
        let p = book.process(&req.id, &req.exec_id)?;
        if let Some(io) = &p.io {
            io.resize(req.width, req.height)
                .map_err(|e| status(Code::FAILED_PRECONDITION, format!("resize: {e}")))?;
        }
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let book = self.book.lock().expect("book lock");
        let p = book.process(&req.id, &req.exec_id)?;
        if req.stdin
            && let Some(io) = &p.io
        {
            io.close_stdin();
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&req.resources.value)
                .map_err(|e| status(Code::INVALID_ARGUMENT, format!("resources: {e}")))?;
        let runc = self.runc_of(&req.id)?;
        runc.update(&req.id, &resources)
            .await
            .map_err(|e| runc.failed("update", e))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut rx = {
            let book = self.book.lock().expect("book lock");
            book.process(&req.id, &req.exec_id)?.exit.subscribe()
        };
        let e = rx
            .wait_for(Option::is_some)
            .await
            .map(|e| e.expect("waited for some"))
            .map_err(|_| not_found(&format!("process {}/{}", req.id, req.exec_id)))?;
        Ok(WaitResponse {
            exit_status: e.code,
            exited_at: MessageField::some(timestamp(e.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let pid = self.init_pid(&req.id)?;
        let stats = Cgroups::of_pid(pid)
            .and_then(|c| c.metrics())
            .map_err(|e| {
                status(
                    Code::FAILED_PRECONDITION,
                    format!("stats of {}: {e}", req.id),
                )
            })?;
        Ok(StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.init_pid(&req.id).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // A pod's shim serves its other containers until the last is gone.
        if self.book.lock().expect("book lock").containers.is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}
