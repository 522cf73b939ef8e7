//! Lazy reads through FUSE, for kernels without fanotify pre-content
//! events (before 6.14) or without file-backed EROFS (before 6.12).
//!
//! A lazily served layer is mounted as EROFS on a read-only loop device
//! whose backing file is not the sparse local file but its twin in a small
//! FUSE filesystem the snapshotter serves itself (`<root>/fuse/<instance>`,
//! one flat directory, files named `<dev>-<ino>-<n>` after the local file,
//! `n` new for each file published so a name never comes back for another
//! file that reuses the inode number).
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
//! **Switching.** One thread owns every switch. It compares each loop
//! device's backing file with what it should read (a published file's
//! FUSE twin, else the local file) and mends the difference; it runs after
//! every mark and unmark, whenever FUSE sees a read of a withdrawn file (a
//! device mounted while its layer completed), and every few seconds. The
//! ioctl itself runs in a child process ([`loopdev::change_backing`]): it
//! waits for reads in flight, which may be waiting for us.
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

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    MountOption, Notifier, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
    Request,
};

use crate::fanotify::{AccessEvent, FileId, Held, PreContent, Verdict};
use crate::loopdev;

/// How long the kernel may cache names and attributes: a published name
/// never changes size or content, and is never reused.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a refusal waits for its devices to be switched: a switch
/// waits for the device's reads in flight.
const REFUSAL_WAIT: Duration = Duration::from_secs(10);

/// How often the switcher looks at every loop device unasked: the net
/// under a device attached while its layer changed state.
const RECHECK: Duration = Duration::from_secs(5);

/// Background (read-ahead) requests the kernel may have in flight; the
/// default of 16 is shared by every layer and would queue one container's
/// reads behind another's read-ahead.
const MAX_BACKGROUND: u16 = 256;

/// A read held until it is answered.
#[derive(Debug)]
pub(crate) struct FuseRead {
    reply: ReplyData,
    file: Arc<File>,
    offset: u64,
    size: u32,
}

/// What tells one file from a later one with the same inode number.
type Identity = (FileId, u64, Option<SystemTime>);

fn identity(meta: &fs::Metadata) -> Identity {
    ((meta.dev(), meta.ino()), meta.len(), meta.created().ok())
}

/// One local file known to the filesystem.
#[derive(Debug)]
struct Entry {
    name: OsString,
    identity: Identity,
    path: PathBuf,
    /// Open while marked; afterwards reads (of a loop device not switched
    /// yet) open `path`, so a removed file frees its space.
    file: Option<Arc<File>>,
    /// Published: reads are held, new mounts go through FUSE.
    marked: bool,
}

impl Entry {
    fn id(&self) -> FileId {
        self.identity.0
    }
    fn size(&self) -> u64 {
        self.identity.1
    }
}

#[derive(Debug, Default)]
struct Files {
    by_ino: HashMap<u64, Entry>,
    by_id: HashMap<FileId, u64>,
    by_name: HashMap<OsString, u64>,
    next: u64,
    /// Complete local files an earlier instance may have published, by
    /// the file id its names began with ([`FuseReads::adopt`]).
    earlier: HashMap<FileId, (PathBuf, Identity)>,
    /// Published again after completion (refused): what the kernel kept
    /// of their FUSE twins must be read again, through the refusal.
    uncache: Vec<u64>,
}

impl Files {
    fn get_id(&self, id: FileId) -> Option<&Entry> {
        self.by_ino.get(self.by_id.get(&id)?)
    }
    fn get_name(&self, name: &OsStr) -> Option<&Entry> {
        self.by_ino.get(self.by_name.get(name)?)
    }
    fn remove(&mut self, ino: u64) -> Option<Entry> {
        let e = self.by_ino.remove(&ino)?;
        self.by_name.remove(&e.name);
        if self.by_id.get(&e.id()) == Some(&ino) {
            self.by_id.remove(&e.id());
        }
        Some(e)
    }
}

/// The file id a published name begins with (`<dev>-<ino>-<n>`, or
/// `<dev>-<ino>` from before names were numbered).
fn id_of(name: &OsStr) -> Option<FileId> {
    let name = name.to_str()?;
    let mut parts = name.split('-');
    let dev = parts.next()?.parse().ok()?;
    let ino = parts.next()?.parse().ok()?;
    Some((dev, ino))
}

#[derive(Debug)]
struct Inner {
    /// `<root>`, canonical: the local files live below.
    root: PathBuf,
    /// `<root>/fuse`: every instance's mount lives below.
    base: PathBuf,
    /// This instance's mount.
    dir: PathBuf,
    files: Mutex<Files>,
    events: Mutex<mpsc::Sender<AccessEvent>>,
    passes: Mutex<Passes>,
    /// Wakes the switcher.
    wake: Condvar,
    /// Tells those waiting that a pass ended.
    ended: Condvar,
    /// One pass of switching at a time; switches that failed, with when,
    /// so each is reported once and tried again only after [`RETRY`].
    switching: Mutex<HashMap<(PathBuf, PathBuf), Instant>>,
    /// Tells the kernel to drop cached pages of our files.
    notifier: OnceLock<Notifier>,
}

/// The switcher's passes.
#[derive(Debug, Default)]
struct Passes {
    /// Set when a loop device may read the wrong file.
    stale: bool,
    started: u64,
    ended: u64,
    /// Earlier instances' devices are left alone until
    /// [`FuseReads::adopt`] says what stands for their files.
    adopted: bool,
}

/// How long a switch that failed waits before it is tried again.
const RETRY: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a loop device should read.
enum Want {
    /// This file, which must still be the file known (when known).
    File(PathBuf, Option<Identity>),
    /// A file of an earlier instance nothing here stands for.
    Gone,
}

/// Switch counts of one pass.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    switched: usize,
    failing: usize,
}

impl Inner {
    /// Asks for a pass; returns the number of the first pass that will
    /// see what changed before the call.
    fn nudge(&self) -> u64 {
        let mut p = lock(&self.passes);
        p.stale = true;
        let next = p.started + 1;
        drop(p);
        self.wake.notify_one();
        next
    }

    /// Asks for a pass and waits for it, `limit` at most.
    fn nudge_and_wait(&self, limit: Duration) {
        let want = self.nudge();
        let p = lock(&self.passes);
        let _ = self
            .ended
            .wait_timeout_while(p, limit, |p| p.ended < want)
            .unwrap_or_else(|p| p.into_inner());
    }

    fn switcher(self: Arc<Self>) {
        loop {
            let mut p = lock(&self.passes);
            if !p.stale {
                p = self
                    .wake
                    .wait_timeout(p, RECHECK)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            p.stale = false;
            p.started += 1;
            let me = p.started;
            drop(p);
            self.reconcile();
            let mut p = lock(&self.passes);
            p.ended = me;
            drop(p);
            self.ended.notify_all();
        }
    }

    fn wanted(&self, backing: &Path) -> Option<Want> {
        if backing.starts_with(&self.dir) {
            let files = lock(&self.files);
            let e = files.get_name(backing.file_name()?)?;
            return (!e.marked).then(|| Want::File(e.path.clone(), Some(e.identity)));
        }
        if backing.starts_with(&self.base) {
            if !lock(&self.passes).adopted {
                return None;
            }
            let id = id_of(backing.file_name()?)?;
            let files = lock(&self.files);
            return Some(match files.get_id(id) {
                Some(e) if e.marked => Want::File(self.dir.join(&e.name), None),
                Some(e) => Want::File(e.path.clone(), Some(e.identity)),
                None => match files.earlier.get(&id) {
                    Some((path, identity)) => Want::File(path.clone(), Some(*identity)),
                    None => Want::Gone,
                },
            });
        }
        if backing.starts_with(&self.root) {
            // A local file: published again (refused after completion)?
            let meta = fs::metadata(backing).ok()?;
            let files = lock(&self.files);
            let e = files.get_id((meta.dev(), meta.ino()))?;
            return (e.marked && e.identity == identity(&meta))
                .then(|| Want::File(self.dir.join(&e.name), None));
        }
        None
    }

    /// Points every loop device at what it should read, then detaches
    /// earlier instances' mounts nothing reads any more.
    fn reconcile(&self) -> Tally {
        let mut failed = lock(&self.switching);
        // Off the callers' threads: dropping pages waits for reads of
        // them in flight, which may wait for a caller.
        let uncache = std::mem::take(&mut lock(&self.files).uncache);
        if let Some(n) = self.notifier.get() {
            for ino in uncache {
                if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                    tracing::debug!(ino, error = %e, "cannot drop the cached pages of a FUSE file");
                }
            }
        }
        let mut tally = Tally::default();
        let mut refused_moved = false;
        for (device, backing) in loopdev::backing_files() {
            let earlier = backing.starts_with(&self.base) && !backing.starts_with(&self.dir);
            let (target, known) = match self.wanted(&backing) {
                None => continue,
                Some(Want::File(t, _)) if t == backing => continue,
                Some(Want::File(t, known)) => (t, known),
                Some(Want::Gone) => {
                    tally.failing += 1;
                    if let std::collections::hash_map::Entry::Vacant(v) =
                        failed.entry((device.clone(), backing.clone()))
                    {
                        v.insert(Instant::now());
                        tracing::error!(device = %device.display(), backing = %backing.display(), "loop device reads a file of an earlier instance that is gone; its reads fail with EIO");
                    }
                    continue;
                }
            };
            // A refused layer's device going back through FUSE.
            let refusal = target.starts_with(&self.dir) && !backing.starts_with(&self.base);
            let pair = (device.clone(), target.clone());
            if !refusal && failed.get(&pair).is_some_and(|t| t.elapsed() < RETRY) {
                tally.failing += 1;
                continue;
            }
            match switch_to(&device, &target, known) {
                Ok(()) => {
                    tally.switched += 1;
                    refused_moved |= refusal;
                    failed.remove(&pair);
                    if earlier {
                        tracing::info!(device = %device.display(), from = %backing.display(), to = %target.display(), "loop device of an earlier instance switched");
                    } else {
                        tracing::info!(device = %device.display(), from = %backing.display(), to = %target.display(), "loop device switched");
                    }
                }
                Err(e) => {
                    tally.failing += 1;
                    let first = failed.insert(pair, Instant::now()).is_none();
                    if refusal {
                        tracing::error!(device = %device.display(), from = %backing.display(), to = %target.display(), error = %e, "cannot send a refused layer's loop device back through FUSE; tried again every pass");
                    } else if first {
                        tracing::warn!(device = %device.display(), from = %backing.display(), to = %target.display(), error = %e, "cannot switch a loop device; it keeps reading through the old path (tried again every minute)");
                    }
                }
            }
        }
        if refused_moved {
            // What the layers above read from a refused file before its
            // device moved must not outlive the move (the refusal drops
            // caches too, but a device may move after it: mounted just
            // before, or switched late).
            let _ = fs::write("/proc/sys/vm/drop_caches", "1");
        }
        if lock(&self.passes).adopted {
            detach_unread(&self.base, &self.dir);
        }
        tally
    }
}

/// Makes `device` read `target`, which must still be the file `known`
/// (when given): a path can come back as another file.
fn switch_to(device: &Path, target: &Path, known: Option<Identity>) -> io::Result<()> {
    let f = File::open(target)?;
    if let Some(known) = known
        && identity(&f.metadata()?) != known
    {
        return Err(io::Error::other(
            "the file at that path is no longer the one published",
        ));
    }
    loopdev::change_backing(device, &f)
}

/// Detaches the mounts below `base` (but `keep`) no loop device reads
/// now: a mount a device still reads stays, so the kernel goes on naming
/// the device's file by a path under `base` and a later pass finds it.
fn detach_unread(base: &Path, keep: &Path) {
    let read: HashSet<PathBuf> = loopdev::backing_files()
        .into_iter()
        .filter_map(|(_, b)| b.parent().map(Path::to_path_buf))
        .collect();
    for e in fs::read_dir(base).into_iter().flatten().flatten() {
        let p = e.path();
        if p == keep || read.contains(&p) {
            continue;
        }
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&p);
    }
}

/// For a daemon that no longer serves through FUSE (its configuration
/// changed): points loop devices still reading an earlier instance's FUSE
/// files at the `complete` local files they stand for, then detaches the
/// earlier mounts nothing reads any more. Devices of incomplete layers
/// keep failing with EIO: reads through a loop device raise no fanotify
/// events, so the local file would read as zeros. Returns (switched, left
/// failing).
pub fn release_earlier(root: &Path, complete: impl IntoIterator<Item = PathBuf>) -> (usize, usize) {
    let Ok(base) = root.join("fuse").canonicalize() else {
        return (0, 0);
    };
    let locals = local_ids(complete);
    let (mut switched, mut failing) = (0, 0);
    for (device, backing) in loopdev::backing_files() {
        if !backing.starts_with(&base) {
            continue;
        }
        let target = backing
            .file_name()
            .and_then(id_of)
            .and_then(|id| locals.get(&id));
        match target.map(|(t, known)| switch_to(&device, t, Some(*known))) {
            Some(Ok(())) => {
                switched += 1;
                tracing::info!(device = %device.display(), from = %backing.display(), "loop device of an earlier instance switched to its local file");
            }
            _ => {
                failing += 1;
                tracing::error!(device = %device.display(), backing = %backing.display(), "loop device reads a FUSE file of an earlier instance this one cannot serve; its reads fail with EIO");
            }
        }
    }
    detach_unread(&base, &base);
    (switched, failing)
}

fn local_ids(files: impl IntoIterator<Item = PathBuf>) -> HashMap<FileId, (PathBuf, Identity)> {
    let mut out = HashMap::new();
    for p in files {
        if let Ok(m) = fs::metadata(&p) {
            let identity = identity(&m);
            out.insert(identity.0, (p, identity));
        }
    }
    out
}

/// The FUSE side of the lazy path; see the module comment.
#[derive(Debug)]
pub struct FuseReads {
    inner: Arc<Inner>,
    events: Mutex<mpsc::Receiver<AccessEvent>>,
}

impl FuseReads {
    /// Mounts a new, empty filesystem below `base` (created if missing),
    /// whose parent holds the local files; earlier instances' mounts stay
    /// until [`FuseReads::adopt`].
    pub fn mount(base: &Path) -> io::Result<FuseReads> {
        fs::create_dir_all(base)?;
        // The kernel names loop devices' backing files by canonical path.
        let base = base.canonicalize()?;
        let root = base.parent().unwrap_or(&base).to_path_buf();
        let dir = base.join(format!("{:08x}", rand::random::<u32>()));
        fs::create_dir(&dir)?;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            root,
            base,
            dir: dir.clone(),
            files: Mutex::new(Files {
                next: 2,
                ..Files::default()
            }),
            events: Mutex::new(tx),
            passes: Mutex::new(Passes::default()),
            wake: Condvar::new(),
            ended: Condvar::new(),
            switching: Mutex::new(HashMap::new()),
            notifier: OnceLock::new(),
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
        let session = match fuser::Session::new(Fs(inner.clone()), &dir, &config) {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let background = session.spawn()?;
        let _ = inner.notifier.set(background.notifier());
        // Never unmounted by us while the process lives: loop devices read
        // through it. When the process ends the connection dies and the
        // next instance adopts what is left (module comment).
        std::mem::forget(background);
        let switcher = inner.clone();
        std::thread::Builder::new()
            .name("fuse-switch".into())
            .spawn(move || switcher.switcher())?;
        Ok(FuseReads {
            inner,
            events: Mutex::new(rx),
        })
    }

    /// This instance's mount point.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Points every loop device still reading a file of an earlier
    /// instance at this one's (a file still marked) or at its local file
    /// among `local` (a complete one), then detaches the earlier mounts.
    /// Returns (switched, left failing): a device whose file is gone keeps
    /// failing its reads with EIO.
    pub fn adopt(&self, local: impl IntoIterator<Item = PathBuf>) -> (usize, usize) {
        lock(&self.inner.files).earlier = local_ids(local);
        lock(&self.inner.passes).adopted = true;
        let tally = self.inner.reconcile();
        (tally.switched, tally.failing)
    }
}

impl PreContent for FuseReads {
    fn mark(&self, path: &Path) -> io::Result<()> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        let identity = identity(&meta);
        let mut files = lock(&self.inner.files);
        if let Some(ino) = files.by_id.get(&identity.0).copied() {
            let e = files.by_ino.get_mut(&ino).expect("indexed entry");
            if e.identity == identity {
                if e.marked {
                    return Ok(());
                }
                // Complete once, refused now: its loop devices go back
                // through FUSE, where reads fail. Waited for (within
                // reason), so that what the caller does next (dropping
                // caches) comes after.
                e.marked = true;
                e.file = Some(Arc::new(file));
                files.uncache.push(ino);
                drop(files);
                self.inner.nudge_and_wait(REFUSAL_WAIT);
                return Ok(());
            }
            // Another file under a reused inode number: what was known of
            // the old one (its size, its name) must not carry over.
            files.remove(ino);
        }
        let ino = files.next;
        files.next += 1;
        let name: OsString = format!("{}-{}-{ino}", identity.0.0, identity.0.1).into();
        files.by_name.insert(name.clone(), ino);
        files.by_id.insert(identity.0, ino);
        files.by_ino.insert(
            ino,
            Entry {
                name,
                identity,
                path: path.into(),
                file: Some(Arc::new(file)),
                marked: true,
            },
        );
        drop(files);
        self.inner.nudge();
        Ok(())
    }

    fn unmark(&self, path: &Path) -> io::Result<()> {
        let meta = fs::metadata(path)?;
        let mut files = lock(&self.inner.files);
        let Some(ino) = files.by_id.get(&(meta.dev(), meta.ino())).copied() else {
            return Ok(());
        };
        let e = files.by_ino.get_mut(&ino).expect("indexed entry");
        e.marked = false;
        e.file = None;
        drop(files);
        self.inner.nudge();
        Ok(())
    }

    fn forget(&self, path: &Path) -> io::Result<()> {
        let meta = fs::metadata(path)?;
        let mut files = lock(&self.inner.files);
        if let Some(ino) = files.by_id.get(&(meta.dev(), meta.ino())).copied() {
            files.remove(ino);
        }
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
            Verdict::Allow => return answer(read.reply, &read.file, read.offset, read.size),
        }
        Ok(())
    }

    /// A marked file is mounted through its FUSE twin; any other file
    /// this filesystem knows on a loop device over itself, so it can be
    /// sent through FUSE again if it is refused later (a file-backed
    /// mount could not be).
    fn serve_path(&self, path: &Path) -> Option<PathBuf> {
        let meta = fs::metadata(path).ok()?;
        let files = lock(&self.inner.files);
        Some(match files.get_id((meta.dev(), meta.ino())) {
            Some(e) if e.marked => self.inner.dir.join(&e.name),
            _ => path.to_path_buf(),
        })
    }
}

/// Replies with `size` bytes of `file` at `offset` (fewer at its end).
fn answer(reply: ReplyData, file: &File, offset: u64, size: u32) -> io::Result<()> {
    let mut buf = vec![0u8; size as usize];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                reply.error(Errno::EIO);
                return Err(e);
            }
        }
    }
    reply.data(&buf[..n]);
    Ok(())
}

/// The filesystem the kernel talks to.
#[derive(Debug)]
struct Fs(Arc<Inner>);

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
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let files = lock(&self.0.files);
        match files
            .by_name
            .get(name)
            .and_then(|i| Some((*i, files.by_ino.get(i)?)))
        {
            Some((ino, e)) => reply.entry(
                &TTL,
                &attr(INodeNo(ino), e.size(), FileType::RegularFile, 0o400),
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
            Some(e) => reply.attr(&TTL, &attr(ino, e.size(), FileType::RegularFile, 0o400)),
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
        let (id, file, path, known) = {
            let files = lock(&self.0.files);
            match files.by_ino.get(&ino.0) {
                Some(e) => (e.id(), e.file.clone(), e.path.clone(), e.identity),
                None => return reply.error(Errno::ENOENT),
            }
        };
        let len = known.1;
        if offset >= len {
            return reply.data(&[]);
        }
        let size = size.min(u32::try_from(len - offset).unwrap_or(u32::MAX));
        let Some(file) = file else {
            // Withdrawn: complete, but a loop device still reads it here
            // (mounted while it completed). Answer from the local file on
            // this thread, and have the device switched.
            self.0.nudge();
            return match File::open(&path) {
                Ok(f) if f.metadata().is_ok_and(|m| identity(&m) == known) => {
                    let _ = answer(reply, &f, offset, size);
                }
                // Removed, or replaced by another file: never its bytes.
                _ => reply.error(Errno::EIO),
            };
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_every_release_lead_back_to_their_file() {
        assert_eq!(id_of(OsStr::new("2049-131-7")), Some((2049, 131)));
        assert_eq!(id_of(OsStr::new("2049-131")), Some((2049, 131)));
        assert_eq!(id_of(OsStr::new("lost+found")), None);
        assert_eq!(id_of(OsStr::new("2049")), None);
    }
}
