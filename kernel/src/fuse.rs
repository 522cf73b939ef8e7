//! Lazy reads through FUSE, for kernels without fanotify pre-content
//! events (before 6.14) or without file-backed EROFS (before 6.12).
//!
//! A lazily served layer is mounted as EROFS on a read-only loop device
//! whose backing file is not the sparse local file but its twin in a small
//! FUSE filesystem the snapshotter serves itself (`<root>/fuse/<instance>`,
//! one flat directory, files named `<dev>-<ino>` after the local file).
//! Each read the loop device makes of it becomes an [`AccessEvent`] for
//! the same policy as a fanotify event; the answer reads the local file
//! once its chunks are in, or fails with EIO. When the layer is complete
//! ([`PreContent::unmark`]) every loop device reading it is switched with
//! `LOOP_CHANGE_FD` to the local file itself, so reads go back to kernel
//! speed and FUSE leaves the path; a file refused afterwards is switched
//! back to FUSE, where its reads fail.
//!
//! [`FuseReads`] implements [`PreContent`]: `mark` publishes a file,
//! `unmark` withdraws it, and [`PreContent::serve_path`] tells the mounter
//! which path to attach instead of the local one.
//!
//! **Restarts.** The FUSE connection dies with the daemon (the session
//! cannot be resumed from a kept `/dev/fuse` descriptor: the protocol's
//! handshake happens once per mount), so reads made while it is down fail
//! with EIO, never zeros. The next instance mounts a new directory and
//! [`FuseReads::adopt`] points every loop device still reading an earlier
//! instance's files at its own, or at the local file when complete; then
//! the dead mounts are detached.
//!
//! The protocol is spoken by the `fuser` crate; the mounting, naming and
//! loop switching here are ours.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

use crate::fanotify::{AccessEvent, FileId, Held, PreContent, Verdict};
use crate::loopdev;

/// How long the kernel may cache names and attributes: a published file
/// never changes size or content.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// A read held until it is answered.
#[derive(Debug)]
pub(crate) struct FuseRead {
    reply: ReplyData,
    file: Arc<File>,
    offset: u64,
    size: u32,
}

/// One local file known to the filesystem.
#[derive(Debug)]
struct Entry {
    name: OsString,
    id: FileId,
    path: PathBuf,
    /// Open while marked; afterwards reads (of a loop device that could
    /// not be switched) open `path`, so a removed file frees its space.
    file: Option<Arc<File>>,
    size: u64,
    /// Published: reads are held, new mounts go through FUSE.
    marked: bool,
}

#[derive(Debug, Default)]
struct Files {
    by_ino: HashMap<u64, Entry>,
    by_id: HashMap<FileId, u64>,
    next: u64,
}

impl Files {
    fn by_name(&self, name: &OsStr) -> Option<(u64, &Entry)> {
        self.by_ino
            .iter()
            .find(|(_, e)| e.name == name)
            .map(|(i, e)| (*i, e))
    }
}

#[derive(Debug)]
struct Shared {
    files: Mutex<Files>,
    events: Mutex<mpsc::Sender<AccessEvent>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The FUSE side of the lazy path; see the module comment.
#[derive(Debug)]
pub struct FuseReads {
    /// `<root>/fuse`: every instance's mount lives below.
    base: PathBuf,
    /// This instance's mount.
    dir: PathBuf,
    shared: Arc<Shared>,
    events: Mutex<mpsc::Receiver<AccessEvent>>,
}

/// The name a local file is published under.
fn name_of(id: FileId) -> OsString {
    format!("{}-{}", id.0, id.1).into()
}

impl FuseReads {
    /// Mounts a new, empty filesystem below `base` (created if missing);
    /// earlier instances' mounts stay until [`FuseReads::adopt`].
    pub fn mount(base: &Path) -> io::Result<FuseReads> {
        fs::create_dir_all(base)?;
        let dir = base.join(format!("{:08x}", rand::random::<u32>()));
        fs::create_dir(&dir)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            files: Mutex::new(Files {
                next: 2,
                ..Files::default()
            }),
            events: Mutex::new(tx),
        });
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("hyperbox".into()),
            MountOption::Subtype("hyperbox-lazy".into()),
            MountOption::RO,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        let session = match fuser::Session::new(Fs(shared.clone()), &dir, &config) {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let background = session.spawn()?;
        // Never unmounted by us while the process lives: loop devices read
        // through it. When the process ends the connection dies and the
        // next instance adopts what is left (module comment).
        std::mem::forget(background);
        Ok(FuseReads {
            base: base.into(),
            dir,
            shared,
            events: Mutex::new(rx),
        })
    }

    /// This instance's mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Points every loop device still reading a file of an earlier
    /// instance at this one's (a file still marked) or at its local file
    /// among `local` (a complete one), then detaches the earlier mounts.
    /// Returns (switched, left failing): a device whose file is gone keeps
    /// failing its reads with EIO.
    pub fn adopt(&self, local: impl IntoIterator<Item = PathBuf>) -> (usize, usize) {
        let mut locals: HashMap<OsString, PathBuf> = HashMap::new();
        for p in local {
            if let Ok(m) = fs::metadata(&p) {
                locals.insert(name_of((m.dev(), m.ino())), p);
            }
        }
        let (mut switched, mut failing) = (0, 0);
        for (device, backing) in loopdev::backing_files() {
            if !backing.starts_with(&self.base) || backing.starts_with(&self.dir) {
                continue;
            }
            let Some(name) = backing.file_name().map(OsStr::to_os_string) else {
                continue;
            };
            let target = {
                let files = lock(&self.shared.files);
                match files.by_name(&name) {
                    Some((_, e)) if e.marked => Some(self.dir.join(&name)),
                    Some(_) | None => locals.get(&name).cloned(),
                }
            };
            let result = match &target {
                Some(t) => File::open(t).and_then(|f| loopdev::change_backing(&device, &f)),
                None => Err(io::Error::from(io::ErrorKind::NotFound)),
            };
            match result {
                Ok(()) => {
                    switched += 1;
                    tracing::info!(device = %device.display(), from = %backing.display(), to = %target.unwrap_or_default().display(), "loop device of an earlier instance switched");
                }
                Err(e) => {
                    failing += 1;
                    tracing::error!(device = %device.display(), backing = %backing.display(), error = %e, "loop device reads a file of an earlier instance that is gone; its reads fail with EIO");
                }
            }
        }
        for e in fs::read_dir(&self.base).into_iter().flatten().flatten() {
            let p = e.path();
            if p == self.dir {
                continue;
            }
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(&p);
        }
        (switched, failing)
    }

    /// Switches, off the caller's thread, every loop device whose backing
    /// file `from` accepts to `to`. The switch waits for the device's reads
    /// in flight, which may wait for this process: never on the thread
    /// that answers them.
    fn switch(&self, from: impl Fn(&Path) -> bool + Send + 'static, to: PathBuf) {
        let run = move || {
            let Ok(file) = File::open(&to) else {
                return;
            };
            for (device, backing) in loopdev::backing_files() {
                if !from(&backing) {
                    continue;
                }
                match loopdev::change_backing(&device, &file) {
                    Ok(()) => {
                        tracing::debug!(device = %device.display(), from = %backing.display(), to = %to.display(), "loop device switched")
                    }
                    Err(e) => {
                        tracing::warn!(device = %device.display(), from = %backing.display(), to = %to.display(), error = %e, "cannot switch a loop device; it keeps reading through the old path")
                    }
                }
            }
        };
        let _ = std::thread::Builder::new()
            .name("fuse-switch".into())
            .spawn(run);
    }
}

impl PreContent for FuseReads {
    fn mark(&self, path: &Path) -> io::Result<()> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let id = (meta.dev(), meta.ino());
        let name = name_of(id);
        let mut files = lock(&self.shared.files);
        if let Some(ino) = files.by_id.get(&id).copied() {
            let e = files.by_ino.get_mut(&ino).expect("indexed entry");
            if !e.marked {
                e.marked = true;
                e.file = Some(Arc::new(file));
                drop(files);
                // Complete once, refused now: loop devices switched to the
                // local file go back through FUSE, where reads fail.
                let root = self.base.parent().map(Path::to_path_buf);
                let fuse = self.base.clone();
                self.switch(
                    move |backing| {
                        root.as_ref().is_some_and(|r| backing.starts_with(r))
                            && !backing.starts_with(&fuse)
                            && fs::metadata(backing).is_ok_and(|m| (m.dev(), m.ino()) == id)
                    },
                    self.dir.join(&name),
                );
            }
            return Ok(());
        }
        let ino = files.next;
        files.next += 1;
        files.by_ino.insert(
            ino,
            Entry {
                name,
                id,
                path: path.into(),
                file: Some(Arc::new(file)),
                size: meta.len(),
                marked: true,
            },
        );
        files.by_id.insert(id, ino);
        Ok(())
    }

    fn unmark(&self, path: &Path) -> io::Result<()> {
        let meta = fs::metadata(path)?;
        let id = (meta.dev(), meta.ino());
        let mut files = lock(&self.shared.files);
        let Some(ino) = files.by_id.get(&id).copied() else {
            return Ok(());
        };
        let e = files.by_ino.get_mut(&ino).expect("indexed entry");
        e.marked = false;
        e.file = None;
        let fuse_path = self.dir.join(&e.name);
        drop(files);
        self.switch(move |backing| backing == fuse_path, path.to_path_buf());
        Ok(())
    }

    fn read_events(&self, out: &mut Vec<AccessEvent>) -> io::Result<()> {
        let rx = lock(&self.events);
        let first = rx
            .recv()
            .map_err(|_| io::Error::other("the FUSE session ended"))?;
        out.push(first);
        out.extend(rx.try_iter());
        Ok(())
    }

    fn respond(&self, event: AccessEvent, verdict: Verdict) -> io::Result<()> {
        let Held::Fuse(read) = event.held else {
            return Err(io::Error::other("a fanotify event reached the FUSE reads"));
        };
        match verdict {
            Verdict::DenyEio => read.reply.error(Errno::EIO),
            Verdict::Allow => {
                let mut buf = vec![0u8; read.size as usize];
                let mut n = 0;
                while n < buf.len() {
                    match read.file.read_at(&mut buf[n..], read.offset + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            read.reply.error(Errno::EIO);
                            return Err(e);
                        }
                    }
                }
                read.reply.data(&buf[..n]);
            }
        }
        Ok(())
    }

    fn serve_path(&self, path: &Path) -> Option<PathBuf> {
        let meta = fs::metadata(path).ok()?;
        let files = lock(&self.shared.files);
        let ino = files.by_id.get(&(meta.dev(), meta.ino()))?;
        let e = files.by_ino.get(ino)?;
        e.marked.then(|| self.dir.join(&e.name))
    }
}

/// The filesystem the kernel talks to.
#[derive(Debug)]
struct Fs(Arc<Shared>);

fn dir_attr() -> FileAttr {
    attr(INodeNo::ROOT, 0, FileType::Directory, 0o500)
}

fn attr(ino: INodeNo, size: u64, kind: FileType, perm: u16) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl fuser::Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let files = lock(&self.0.files);
        match files.by_name(name) {
            Some((ino, e)) => reply.entry(
                &TTL,
                &attr(INodeNo(ino), e.size, FileType::RegularFile, 0o400),
                Generation(0),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &dir_attr());
        }
        let files = lock(&self.0.files);
        match files.by_ino.get(&ino.0) {
            Some(e) => reply.attr(&TTL, &attr(ino, e.size, FileType::RegularFile, 0o400)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if lock(&self.0.files).by_ino.contains_key(&ino.0) {
            // The bytes behind a name never change: the kernel may keep
            // what it read across opens.
            reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_KEEP_CACHE)
        } else {
            reply.error(Errno::ENOENT)
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let (id, file, path, len) = {
            let files = lock(&self.0.files);
            match files.by_ino.get(&ino.0) {
                Some(e) => (e.id, e.file.clone(), e.path.clone(), e.size),
                None => return reply.error(Errno::ENOENT),
            }
        };
        let file = match file.map_or_else(|| File::open(&path).map(Arc::new), Ok) {
            Ok(f) => f,
            Err(_) => return reply.error(Errno::EIO),
        };
        if offset >= len {
            return reply.data(&[]);
        }
        let size = size.min(u32::try_from(len - offset).unwrap_or(u32::MAX));
        let event = AccessEvent {
            file: Some(id),
            offset,
            count: u64::from(size),
            pid: Some(req.pid()).filter(|p| *p > 0),
            held: Held::Fuse(FuseRead {
                reply,
                file,
                offset,
                size,
            }),
        };
        if let Err(mpsc::SendError(event)) = lock(&self.0.events).send(event)
            && let Held::Fuse(r) = event.held
        {
            r.reply.error(Errno::EIO);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let files = lock(&self.0.files);
        let mut names: Vec<(u64, &OsStr)> = files
            .by_ino
            .iter()
            .filter(|(_, e)| e.marked)
            .map(|(i, e)| (*i, e.name.as_os_str()))
            .collect();
        names.sort();
        let all = [(1, OsStr::new(".")), (1, OsStr::new(".."))]
            .into_iter()
            .chain(names);
        for (i, (ino, name)) in all.enumerate().skip(offset as usize) {
            let kind = if ino == 1 {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
