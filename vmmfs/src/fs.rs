//! The fuser adapter: converts FUSE requests into [`Service`] calls and
//! results into replies. No policy lives here.

use crate::creds::Caller;
use crate::engine::Engine;
use crate::error::FsError;
use crate::nodes::Node;
use crate::service::{Attr, Service};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents, PollFlags, PollNotifier,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyOpen, ReplyPoll, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Static nodes may be cached: every change to them goes through us and the
/// reply refreshes the kernel's copy.
const STATIC_TTL: Duration = Duration::from_secs(60);
/// VM nodes are never cached: what a lookup finds depends on the caller's
/// jail, and the kernel's dentry cache is shared by all namespaces.
const VM_TTL: Duration = Duration::ZERO;

/// A passthrough backing file shared by the opens of one segment inode.
struct Backing {
    id: Arc<BackingId>,
    /// The memfd it was made from: a replaced segment needs a new one.
    memfd: i32,
    opens: usize,
}

/// Passthrough backing files, one per segment inode (the kernel requires every
/// open of an inode to use the same one).
#[derive(Default)]
struct Backings(Mutex<HashMap<u64, Backing>>);

impl Backings {
    /// The backing file for an open of `ino`, made with `make` on first use.
    fn acquire(
        &self,
        ino: u64,
        memfd: i32,
        make: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> Result<Arc<BackingId>, Errno> {
        let mut map = self.0.lock();
        if let Some(b) = map.get_mut(&ino) {
            if b.memfd != memfd {
                // Still open on the segment's previous memory.
                return Err(Errno::from_i32(libc::EBUSY));
            }
            b.opens += 1;
            return Ok(b.id.clone());
        }
        let id = Arc::new(make().map_err(|e| {
            log::error!("passthrough open failed: {e}");
            Errno::from(e)
        })?);
        map.insert(
            ino,
            Backing {
                id: id.clone(),
                memfd,
                opens: 1,
            },
        );
        Ok(id)
    }

    fn release(&self, ino: u64) {
        let mut map = self.0.lock();
        if let Some(b) = map.get_mut(&ino) {
            b.opens -= 1;
            if b.opens == 0 {
                map.remove(&ino);
            }
        }
    }
}

/// The mounted filesystem.
pub struct VmmFs<E: Engine> {
    service: Arc<Service<E>>,
    /// `vmm.sock` is bound (by the daemon itself, through the mount).
    socket: Arc<AtomicBool>,
    started: SystemTime,
    passthrough: bool,
    backings: Backings,
    /// Segment handle -> its inode, to drop the backing file on release.
    segment_handles: Mutex<HashMap<u64, u64>>,
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

impl<E: Engine> VmmFs<E> {
    pub fn new(service: Arc<Service<E>>, socket: Arc<AtomicBool>) -> VmmFs<E> {
        VmmFs {
            service,
            socket,
            started: SystemTime::now(),
            passthrough: false,
            backings: Backings::default(),
            segment_handles: Mutex::new(HashMap::new()),
        }
    }

    fn file_attr(&self, a: &Attr) -> FileAttr {
        let dir = a.node.is_dir();
        FileAttr {
            ino: INodeNo(a.node.ino()),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: Self::kind(a.node),
            perm: a.attrs.mode,
            nlink: if dir { 2 } else { 1 },
            uid: a.attrs.uid,
            gid: a.attrs.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn kind(node: Node) -> FileType {
        match node {
            n if n.is_dir() => FileType::Directory,
            Node::Socket => FileType::Socket,
            _ => FileType::RegularFile,
        }
    }

    fn caller(&self, req: &Request) -> Result<Caller, Errno> {
        Caller::of_thread(req.pid(), self.service.jails()).map_err(|_| Errno::ESRCH)
    }

    fn jail(&self, req: &Request) -> Result<crate::jails::Jail, Errno> {
        self.service
            .jails()
            .of_pid(req.pid())
            .map_err(|_| Errno::ESRCH)
    }

    fn ttl(node: Node) -> Duration {
        match node {
            Node::Vm(_) | Node::Segment(..) => VM_TTL,
            _ => STATIC_TTL,
        }
    }

    fn node(ino: INodeNo) -> Result<Node, Errno> {
        Node::from_ino(ino.0).ok_or(Errno::ENOENT)
    }
}

impl<E: Engine> Filesystem for VmmFs<E> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // No FUSE_ATOMIC_O_TRUNC: with it the kernel sets a truncating
        // opener's file size to 0 itself, and vmmctl must keep its size (see
        // service::VMMCTL_SIZE); without it `echo ... > vmmctl` sends a
        // SETATTR, answered with the size unchanged.
        self.passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        if !self.passthrough {
            log::warn!("kernel lacks FUSE passthrough: vmm.io segments cannot be opened");
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (Ok(parent), Some(name)) = (Self::node(parent), name.to_str()) else {
            return reply.error(Errno::ENOENT);
        };
        let jail = match self.jail(req) {
            Ok(j) => j,
            Err(e) => return reply.error(e),
        };
        let socket = self.socket.load(Ordering::Acquire);
        match self.service.lookup(&jail, parent, name, socket) {
            Ok(a) => reply.entry(&Self::ttl(a.node), &self.file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match Self::node(ino).and_then(|n| self.service.getattr(n).map_err(errno)) {
            Ok(a) => reply.attr(&Self::ttl(a.node), &self.file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Sizes and times are not the user's to set: truncation is ignored, as on a device.
        match Self::node(ino).and_then(|n| self.service.setattr(n, mode, uid, gid).map_err(errno)) {
            Ok(a) => reply.attr(&Self::ttl(a.node), &self.file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let node = match Self::node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let caller = match self.caller(req) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        if matches!(node, Node::Segment(..)) && !self.passthrough {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let opened = match self.service.open(&caller, node, write) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(e)),
        };
        let Some(memfd) = opened.backing else {
            // Writes to one inode run in parallel (else the kernel holds
            // the inode lock across each round trip, and every vmmctl user
            // waits behind every other user's requests). vmmctl is a
            // stream: its writes all start at offset 0, within its size.
            let mut flags = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
            if node == Node::Vmmctl {
                flags |= FopenFlags::FOPEN_STREAM;
            }
            return reply.opened(FileHandle(opened.fh), flags);
        };
        match self.backings.acquire(ino.0, memfd.as_raw_fd(), || {
            reply.open_backing(memfd.as_ref())
        }) {
            Ok(id) => {
                self.segment_handles.lock().insert(opened.fh, ino.0);
                reply.opened_passthrough(FileHandle(opened.fh), FopenFlags::empty(), &id);
            }
            Err(e) => {
                self.service.release(opened.fh);
                reply.error(e);
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.service.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let caller = match self.caller(req) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        self.service.write(
            fh.0,
            caller,
            data,
            Box::new(move |r| match r {
                // At most the request's size, a u32.
                Ok(n) => match u32::try_from(n) {
                    Ok(n) => reply.written(n),
                    Err(_) => reply.error(Errno::from_i32(libc::EOVERFLOW)),
                },
                Err(e) => reply.error(errno(e)),
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // ENOSYS tells the kernel to stop sending flushes: close(2) costs no round trip.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.service.release(fh.0);
        if let Some(ino) = self.segment_handles.lock().remove(&fh.0) {
            self.backings.release(ino);
        }
        reply.ok();
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let node = match Self::node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let jail = match self.jail(req) {
            Ok(j) => j,
            Err(e) => return reply.error(e),
        };
        let socket = self.socket.load(Ordering::Acquire);
        let entries = match self.service.readdir(&jail, node, socket) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let all = [
            (node, ".".to_string(), true),
            (Node::Root, "..".to_string(), true),
        ]
        .into_iter()
        .chain(
            entries
                .into_iter()
                .map(|e| (e.node, e.name, e.node.is_dir())),
        );
        // An offset past every entry (any that does not fit) lists nothing.
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (n, name, _)) in all.enumerate().skip(skip) {
            if reply.add(INodeNo(n.ino()), (i + 1) as u64, Self::kind(n), name) {
                break;
            }
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        let caller = match self.caller(req) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        self.service.ioctl(
            fh.0,
            caller,
            cmd,
            in_data,
            Box::new(move |r| match r {
                Ok(out) => reply.ioctl(0, &out[..out.len().min(out_size as usize)]),
                Err(e) => reply.error(errno(e)),
            }),
        );
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        let wake = Box::new(move || {
            let _ = ph.notify();
        });
        match self.service.poll(fh.0, wake) {
            Ok(true) => reply.poll(PollEvents::POLLIN | PollEvents::POLLRDNORM),
            Ok(false) => reply.poll(PollEvents::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes; ENOSYS makes the kernel stop asking (e.g. for security labels).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    // The tree is made by the daemon alone, as devfs: users create and remove
    // VMs through vmmctl, never with file operations. The one exception is
    // the daemon binding `vmm.sock` (bind(2) makes the socket node through
    // mknod).
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let ours = Caller::of_thread(req.pid(), self.service.jails())
            .is_ok_and(|c| c.tgid == std::process::id());
        let socket = parent.0 == crate::nodes::ROOT
            && name.to_str() == Some(vmm_protocol::handover::SOCKET_NAME)
            && mode & libc::S_IFMT == libc::S_IFSOCK;
        if !(ours && socket) {
            return reply.error(Errno::EPERM);
        }
        if self.socket.swap(true, Ordering::AcqRel) {
            return reply.error(Errno::EEXIST);
        }
        match self.service.getattr(Node::Socket) {
            Ok(a) => reply.entry(&STATIC_TTL, &self.file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }
}
