//! A process's standard streams: what containerd asks for (fifo paths,
//! `file://` and `binary://` URIs, a terminal), the pipes or pty runc
//! gets, and the copies between them.
//!
//! The shim copies rather than handing containerd's fifos to the
//! container, as runc-v2 does: the shim keeps its own end of each output
//! fifo open, so a container never gets EPIPE while containerd restarts,
//! and closing stdin (`CloseIO`) reaches the container as EOF.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio as ProcStdio;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use runc::Pipe;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What containerd asked for, as it sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    /// Stdin fifo ("" for none).
    pub stdin: String,
    /// Stdout: a fifo path, `file://` or `binary://` URI ("" for none).
    pub stdout: String,
    /// Stderr, as stdout.
    pub stderr: String,
    /// Allocate a pty.
    pub terminal: bool,
}

/// Where an output stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sink {
    None,
    Fifo(PathBuf),
    File(PathBuf),
    /// A logging binary and its arguments (containerd's runtime v2
    /// logging protocol: fds 3 and 4 carry stdout and stderr, fd 5 is
    /// closed by the logger once it is ready).
    Binary(PathBuf, Vec<String>),
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_sink(s: &str) -> io::Result<Sink> {
    if s.is_empty() {
        return Ok(Sink::None);
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return Ok(Sink::Fifo(PathBuf::from(s)));
    };
    match scheme {
        "fifo" => Ok(Sink::Fifo(PathBuf::from(percent_decode(rest)))),
        "file" => Ok(Sink::File(PathBuf::from(percent_decode(rest)))),
        "binary" => {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            // containerd passes each query pair as two arguments.
            let mut args = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(percent_decode(k));
                if !v.is_empty() {
                    args.push(percent_decode(v));
                }
            }
            Ok(Sink::Binary(PathBuf::from(percent_decode(path)), args))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported stdio scheme {other:?} in {s:?}"),
        )),
    }
}

/// The container side of the streams, handed to `runc create`/`exec`.
#[derive(Debug)]
pub struct RuncIo {
    stdin: Option<Pipe>,
    stdout: Option<Pipe>,
    stderr: Option<Pipe>,
}

#[async_trait]
impl runc::Io for RuncIo {
    async fn set(&self, cmd: &mut tokio::process::Command) -> io::Result<()> {
        // Every stream is set: one left to runc's own pipes would be
        // inherited by the container and keep the shim reading them.
        match &self.stdin {
            Some(p) => cmd.stdin(ProcStdio::from(p.rd.try_clone()?)),
            None => cmd.stdin(ProcStdio::null()),
        };
        match self.stdout.as_ref().and_then(Pipe::try_clone_wr) {
            Some(w) => cmd.stdout(ProcStdio::from(w)),
            None => cmd.stdout(ProcStdio::null()),
        };
        match self.stderr.as_ref().and_then(Pipe::try_clone_wr) {
            Some(w) => cmd.stderr(ProcStdio::from(w)),
            None => cmd.stderr(ProcStdio::null()),
        };
        Ok(())
    }

    async fn close_after_start(&self) {
        for p in [&self.stdout, &self.stderr].into_iter().flatten() {
            p.close_wr();
        }
    }
}

/// The streams prepared before runc runs.
#[derive(Debug)]
pub enum Prepared {
    /// Pipes (no terminal).
    Pipes(Arc<RuncIo>),
    /// A console socket runc sends the pty master over.
    Console(ConsoleSocket),
}

impl Prepared {
    /// Pipes or a console socket (in `dir`) for `stdio`, owned by
    /// `uid:gid` (containerd's `io_uid`/`io_gid`).
    pub fn new(stdio: &Stdio, dir: &Path, uid: u32, gid: u32) -> io::Result<Prepared> {
        if stdio.terminal {
            return Ok(Prepared::Console(ConsoleSocket::new(dir)?));
        }
        let pipe = |wanted: bool| -> io::Result<Option<Pipe>> {
            if !wanted {
                return Ok(None);
            }
            let p = Pipe::new()?;
            nix::unistd::fchown(
                p.rd.as_fd(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )?;
            Ok(Some(p))
        };
        Ok(Prepared::Pipes(Arc::new(RuncIo {
            stdin: pipe(!stdio.stdin.is_empty())?,
            stdout: pipe(!stdio.stdout.is_empty())?,
            stderr: pipe(!stdio.stderr.is_empty())?,
        })))
    }
}

/// The shim's ends of a running process's streams.
#[derive(Debug, Default)]
pub struct Attached {
    close_stdin: Option<Arc<Notify>>,
    console: Option<Arc<OwnedFd>>,
    copies: Vec<JoinHandle<()>>,
}

impl Attached {
    /// Closes the process's stdin once what containerd already wrote is
    /// delivered (`CloseIO`).
    pub fn close_stdin(&self) {
        if let Some(n) = &self.close_stdin {
            n.notify_one();
        }
    }

    /// Resizes the terminal (`ResizePty`).
    pub fn resize(&self, width: u32, height: u32) -> io::Result<()> {
        let Some(master) = &self.console else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the process has no terminal",
            ));
        };
        let ws = libc::winsize {
            ws_row: height.min(u16::MAX.into()) as u16,
            ws_col: width.min(u16::MAX.into()) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
        // lives across the call; the fd is a pty master we own.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until every output copy has delivered what the process
    /// wrote (its streams closed), at most `limit`.
    pub async fn drain(&mut self, limit: Duration) {
        let copies = std::mem::take(&mut self.copies);
        let all = futures_join_all(copies);
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("output still open {limit:?} after the process ended; dropped");
        }
    }
}

async fn futures_join_all(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Connects the shim's ends once runc has run.
pub async fn attach(
    prepared: Prepared,
    stdio: &Stdio,
    id: &str,
    namespace: &str,
) -> io::Result<Attached> {
    let out = parse_sink(&stdio.stdout)?;
    let err = parse_sink(&stdio.stderr)?;
    let mut a = Attached::default();
    match prepared {
        Prepared::Pipes(io) => {
            if let Some(p) = &io.stdin {
                let w = p
                    .take_wr()
                    .ok_or_else(|| io::Error::other("stdin pipe closed"))?;
                let dst = pipe::Sender::from_owned_fd(w)?;
                a.close_stdin = Some(pump_stdin(&stdio.stdin, Box::new(dst))?);
            }
            let rd = |p: &Option<Pipe>| -> io::Result<Option<OwnedFd>> {
                p.as_ref().map(|p| p.rd.try_clone()).transpose()
            };
            let (out_rd, err_rd) = (rd(&io.stdout)?, rd(&io.stderr)?);
            if let Sink::Binary(bin, args) = &out {
                a.copies
                    .push(start_logger(bin, args, out_rd, err_rd, id, namespace).await?);
            } else {
                if let Some(fd) = out_rd {
                    a.copies.push(pump_out(fd_reader(fd)?, &out).await?);
                }
                if let Some(fd) = err_rd {
                    a.copies.push(pump_out(fd_reader(fd)?, &err).await?);
                }
            }
        }
        Prepared::Console(sock) => {
            let master = Arc::new(sock.receive().await?);
            if !stdio.stdin.is_empty() {
                let dst = PtyMaster::new(master.try_clone()?)?;
                a.close_stdin = Some(pump_stdin(&stdio.stdin, Box::new(dst))?);
            }
            let reader = PtyMaster::new(master.try_clone()?)?;
            match &out {
                Sink::Binary(bin, args) => {
                    let (r, w) = std::io::pipe()?;
                    let w = pipe::Sender::from_owned_fd(OwnedFd::from(w))?;
                    a.copies
                        .push(tokio::spawn(copy_then_close(Box::new(reader), Box::new(w))));
                    a.copies.push(
                        start_logger(bin, args, Some(OwnedFd::from(r)), None, id, namespace)
                            .await?,
                    );
                }
                sink => a.copies.push(pump_out(Box::new(reader), sink).await?),
            }
            a.console = Some(master);
        }
    }
    Ok(a)
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

fn fd_reader(fd: OwnedFd) -> io::Result<Reader> {
    Ok(Box::new(pipe::Receiver::from_owned_fd(fd)?))
}

async fn copy_then_close(mut src: Reader, mut dst: Writer) {
    let _ = tokio::io::copy(&mut src, &mut dst).await;
    let _ = dst.shutdown().await;
}

/// How long output waits for containerd to open its end of a fifo.
const READER_WAIT: Duration = Duration::from_secs(30);

/// Copies `src` into the fifo at `path` once containerd's end is open.
///
/// The fifo is then held read-write, so containerd going away (a restart)
/// is never EPIPE. But it is not opened so before containerd's reader is
/// there (as runc-v2 waits in its blocking open): a read-write end is a
/// reader itself, and output written and closed before containerd's open
/// would go with it (seen as an exec's output lost under load).
async fn copy_to_fifo(src: Reader, path: PathBuf) {
    let deadline = tokio::time::Instant::now() + READER_WAIT;
    // Kept open until the read-write end is: the reader sees EOF whenever
    // the last writer closes.
    let _writer = loop {
        // Without O_NONBLOCK's wait: an open for writing only succeeds
        // while some reader has the fifo open (ENXIO otherwise).
        match pipe::OpenOptions::new().open_sender(&path) {
            Ok(w) => break Some(w),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(fifo = %path.display(), "no reader opened the output fifo; writing anyway");
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                tracing::warn!(fifo = %path.display(), error = %e, "cannot open the output fifo; output dropped");
                return drain_to_nowhere(src).await;
            }
        }
    };
    match pipe::OpenOptions::new().read_write(true).open_sender(&path) {
        Ok(dst) => copy_then_close(src, Box::new(dst)).await,
        Err(e) => {
            tracing::warn!(fifo = %path.display(), error = %e, "cannot open the output fifo; output dropped");
            drain_to_nowhere(src).await
        }
    }
}

/// Reads `src` to its end, so the process never blocks on a full pipe.
async fn drain_to_nowhere(src: Reader) {
    copy_then_close(src, Box::new(tokio::io::sink())).await
}

async fn pump_out(src: Reader, sink: &Sink) -> io::Result<JoinHandle<()>> {
    let dst: Writer = match sink {
        Sink::None => Box::new(tokio::io::sink()),
        Sink::Fifo(p) => {
            let meta = std::fs::metadata(p)
                .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?;
            if !std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()) {
                return Err(io::Error::other(format!("{} is not a fifo", p.display())));
            }
            return Ok(tokio::spawn(copy_to_fifo(src, p.clone())));
        }
        Sink::File(p) => {
            if let Some(d) = p.parent() {
                tokio::fs::create_dir_all(d).await?;
            }
            Box::new(
                tokio::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?,
            )
        }
        Sink::Binary(..) => unreachable!("binary sinks start a logger"),
    };
    Ok(tokio::spawn(copy_then_close(src, dst)))
}

fn pump_stdin(path: &str, mut dst: Writer) -> io::Result<Arc<Notify>> {
    // Read-write so that the open does not wait for containerd's writer
    // and its going away is not EOF: stdin ends with CloseIO.
    let mut src = pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
    let close = Arc::new(Notify::new());
    let closed = close.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                r = src.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => if dst.write_all(&buf[..n]).await.is_err() { break },
                },
                _ = closed.notified() => {
                    // containerd wrote everything before CloseIO: deliver
                    // what is in the fifo, then EOF.
                    loop {
                        match src.try_read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => if dst.write_all(&buf[..n]).await.is_err() { break },
                            Err(_) => break,
                        }
                    }
                    break;
                }
            }
        }
        let _ = dst.shutdown().await;
    });
    Ok(close)
}

/// Starts a `binary://` logger and returns a task that ends with it.
async fn start_logger(
    bin: &Path,
    args: &[String],
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    id: &str,
    namespace: &str,
) -> io::Result<JoinHandle<()>> {
    let (ready_r, ready_w) = std::io::pipe()?;
    let empty = || -> io::Result<OwnedFd> {
        let (r, _w) = std::io::pipe()?;
        Ok(OwnedFd::from(r))
    };
    let fds: [OwnedFd; 3] = [
        out.map_or_else(empty, Ok)?,
        err.map_or_else(empty, Ok)?,
        OwnedFd::from(ready_w),
    ];
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(ProcStdio::null())
        .stdout(ProcStdio::null())
        .stderr(ProcStdio::null());
    // SAFETY: only dup2/fcntl (async-signal-safe) run in the child, on
    // descriptors that stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                let target = 3 + i as RawFd;
                if *fd == target {
                    let flags = libc::fcntl(target, libc::F_GETFD);
                    libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(*fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let watch = crate::reaper::ExitWatch::new().await?;
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("start logger {}: {e}", bin.display())))?;
    let logger_pid = child.id().unwrap_or_default();
    drop(fds);
    // Ready when it closes (or writes to) fd 5.
    let mut ready = pipe::Receiver::from_owned_fd(OwnedFd::from(ready_r))?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(10), ready.read(&mut b)).await {
        Ok(_) => {}
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("logger {} not ready after 10 s", bin.display()),
            ));
        }
    }
    // The logger owns the streams: the output is delivered when it exits.
    Ok(tokio::spawn(async move {
        watch.wait(logger_pid).await;
        // Kept until the shim's reaper reported it (see reaper.rs).
        drop(child);
    }))
}

/// A unix socket runc sends a pty master over (`--console-socket`).
#[derive(Debug)]
pub struct ConsoleSocket {
    dir: tempfile::TempDir,
    listener: StdUnixListener,
}

impl ConsoleSocket {
    fn new(parent: &Path) -> io::Result<ConsoleSocket> {
        let dir = tempfile::Builder::new().prefix("pty").tempdir_in(parent)?;
        let listener = StdUnixListener::bind(dir.path().join("console.sock"))?;
        listener.set_nonblocking(true)?;
        Ok(ConsoleSocket { dir, listener })
    }

    /// The socket's path, for runc.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("console.sock")
    }

    async fn receive(self) -> io::Result<OwnedFd> {
        let listener = tokio::net::UnixListener::from_std(self.listener)?;
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "runc sent no console"))??;
        loop {
            stream.readable().await?;
            match stream.try_io(tokio::io::Interest::READABLE, || {
                recv_fd(stream.as_raw_fd())
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut name = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(fd) = fds.first()
        {
            // SAFETY: the kernel just installed this descriptor for us.
            return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    Err(io::Error::other(
        "console socket message carried no descriptor",
    ))
}

/// A pty master, non-blocking, as an async reader and writer. EIO (the
/// slave side closed) reads as EOF.
struct PtyMaster(AsyncFd<OwnedFd>);

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<PtyMaster> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open
        // and unchanged until it is dropped.
        let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PtyMaster(afd))
    }
}

impl AsyncRead for PtyMaster {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let r = guard.try_io(|fd| {
                // SAFETY: reads into the initialized, unfilled part of buf.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let r = guard.try_io(|fd| {
                // SAFETY: writes from a valid slice.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(res) => return Poll::Ready(res),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Environment-free helper for tests: the parsed sinks of a URI.
#[cfg(test)]
fn sink_of(s: &str) -> Sink {
    parse_sink(s).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_stdio_forms_are_understood() {
        assert_eq!(sink_of(""), Sink::None);
        assert_eq!(
            sink_of("/run/containerd/fifo/1/c-stdout"),
            Sink::Fifo("/run/containerd/fifo/1/c-stdout".into())
        );
        assert_eq!(
            sink_of("file:///var/log/c%201.log"),
            Sink::File("/var/log/c 1.log".into())
        );
        assert_eq!(
            sink_of(
                "binary:///usr/local/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib%2Fnerdctl"
            ),
            Sink::Binary(
                "/usr/local/bin/nerdctl".into(),
                vec![
                    "_NERDCTL_INTERNAL_LOGGING".into(),
                    "/var/lib/nerdctl".into()
                ]
            )
        );
        assert!(parse_sink("tcp://x").is_err());
    }
}
