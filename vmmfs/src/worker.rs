//! The engine that runs each VM in a jailed worker process of its own
//! (DESIGN.md "Per-VM worker", vmmfs(8) ISOLATION).
//!
//! The daemon starts one `vmm-worker --zygote` (root, its own namespaces)
//! and asks it for a worker per VM: the zygote forks it with clone3 in new
//! mount, network, IPC, UTS and PID namespaces, as the daemon's child
//! (CLONE_PARENT), with one end of a `SOCK_SEQPACKET` socketpair and
//! /dev/kvm; the worker jails itself (a uid of `--worker-uids`, no
//! capabilities, seccomp) before it reads a request.
//! The daemon never holds a VM descriptor and never maps guest memory: it
//! keeps the memfds the worker sends for `vmm.io` passthrough, the last
//! status the worker reported, and a pidfd to end the worker with.
//!
//! Everything a worker says is parsed strictly (`vmm_protocol::worker`); a
//! worker that breaks the protocol is killed. A worker's death, whatever its
//! cause, ends only its VM: the status shows `exit=error` with the cause and
//! the daemon then destroys the VM.
//!
//! Workers outlive the daemon (vmmfs(8) RESTART): with a socket directory
//! ([`WorkerConfig::sockets`], in the root-only state directory) each VM's
//! create carries a unix socket bound at `DIR/PID.sock`, on which the worker
//! listens. When the daemon's connection ends (the daemon died: not the
//! worker's end, which the daemon sees as its socket's end *and* its pidfd's)
//! the worker keeps its guest running and waits there; a restarted daemon
//! connects ([`Engine::adopt`]), checks with SO_PEERCRED that the listener
//! is the recorded process (pid, pinned by a pidfd and checked against its
//! start time, and uid), and takes the VM over. Adopted workers are not the
//! daemon's children: their end is seen on the pidfd, and their exit status
//! read through it (PIDFD_GET_INFO, Linux 6.15 and later).

use crate::cgroup::{Cgroups, Leaf};
use crate::engine::{Creator, Engine, EngineError, EngineVm, WorkerId};
use crate::jails::ProcessId;
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vmm_engine::{Command, FdSource, Segment};
use vmm_protocol::status::{Exit, State, Status};
use vmm_protocol::worker::{self, ErrorKind, Event, Reply, Request, Spawn, Spawned};

/// Where a worker finds the daemon's socket and /dev/kvm (vmm-worker's main.rs).
const SOCKET_FD: RawFd = 3;
const KVM_FD: RawFd = 4;
/// How long a new worker may take to enter its jail and say `ready`.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// RLIMIT_NOFILE of a worker: a VM's PCI devices hold up to about ten
/// descriptors each (client files, eventfds of queues and interrupts), plus
/// the vCPUs and memory segments.
pub const WORKER_MAX_FDS: u64 = 1024;
/// Threads of a worker besides one per vCPU: one per PCI device, the
/// watchdog, two serial readers and the main thread, with room to spare.
pub const WORKER_EXTRA_THREADS: u64 = vmm_engine::vm::MAX_DEVICES as u64 + 16;
/// The reader thread of each worker only parses messages.
const READER_STACK: usize = 64 << 10;

/// The uids (and gids of the same numbers) workers run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub count: u32,
}

impl UidRange {
    /// Parse `FIRST-LAST` or `FIRST:COUNT`. Never includes 0.
    pub fn parse(s: &str) -> Result<UidRange, String> {
        let num = |v: &str| v.parse::<u32>().map_err(|_| format!("'{v}' is not a uid"));
        let r = if let Some((a, b)) = s.split_once('-') {
            let (first, last) = (num(a)?, num(b)?);
            if last < first {
                return Err(format!("{s}: empty range"));
            }
            UidRange {
                first,
                count: (last - first).saturating_add(1),
            }
        } else if let Some((a, n)) = s.split_once(':') {
            let first = num(a)?;
            let count = num(n)?;
            if count == 0 || first.checked_add(count - 1).is_none() {
                return Err(format!("{s}: empty or overflowing range"));
            }
            UidRange { first, count }
        } else {
            return Err(format!("{s}: expected FIRST-LAST or FIRST:COUNT"));
        };
        if r.first == 0 {
            return Err("the worker uid range must not include 0 (root)".into());
        }
        // uid_t -1 means "unchanged" to setresuid.
        if r.first.checked_add(r.count - 1) == Some(u32::MAX) {
            return Err("the worker uid range must not include 4294967295".into());
        }
        Ok(r)
    }

    fn contains(&self, uid: u32) -> bool {
        uid >= self.first && uid - self.first < self.count
    }

    /// The accounts of the host (passwd entries) inside the range: workers
    /// must never share a uid with anyone.
    pub fn collisions(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        // SAFETY: getpwent iteration on the daemon's main thread at start-up,
        // before any other thread uses the passwd database.
        unsafe {
            libc::setpwent();
            loop {
                let p = libc::getpwent();
                if p.is_null() {
                    break;
                }
                if self.contains((*p).pw_uid) {
                    let name = std::ffi::CStr::from_ptr((*p).pw_name).to_string_lossy();
                    out.push((name.into_owned(), (*p).pw_uid));
                }
            }
            libc::endpwent();
        }
        out
    }
}

/// uids of the range in use by live (or not yet reaped) workers.
struct Uids {
    range: UidRange,
    used: BTreeSet<u32>,
    /// uids of workers an earlier daemon left, until they are adopted.
    reserved: BTreeSet<u32>,
    next: u32,
    /// VMs whose worker has not ended and been cleaned up after yet (its
    /// cgroup leaf and adoption socket removed): [`Engine::settle`].
    vms: usize,
}

impl Uids {
    /// A free uid that is none of `avoid`.
    fn take(&mut self, avoid: &[u32]) -> Option<u32> {
        for i in 0..self.range.count {
            let uid = self.range.first + (self.next.wrapping_add(i) % self.range.count);
            if !self.used.contains(&uid)
                && !self.reserved.contains(&uid)
                && !avoid.contains(&uid)
                && uid != 0
            {
                self.used.insert(uid);
                self.next = uid - self.range.first + 1;
                return Some(uid);
            }
        }
        None
    }
}

/// How workers are started.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The vmm-worker executable.
    pub exe: PathBuf,
    pub uids: UidRange,
    /// vCPUs per VM (hw.vmm.maxcpu): sizes a worker's thread limit.
    pub max_cpus: u16,
    /// Let `set x-test-forbidden-syscall=1` make a forbidden system call
    /// (the conformance suite's proof that the filter kills).
    pub test_hooks: bool,
    /// Jailed workers kept ready for the next creates.
    pub prefork: usize,
    /// Where each VM's adoption socket is bound (a root-only directory);
    /// without one, VMs end with the daemon.
    pub sockets: Option<PathBuf>,
    /// uids of the workers to be adopted: no new worker gets one.
    pub reserved: Vec<u32>,
}

/// The worker engine.
pub struct Workers {
    spawner: Arc<Spawner>,
    cgroups: Option<Arc<Cgroups>>,
}

/// Starts workers (through the zygote) and keeps a few ready.
struct Spawner {
    config: WorkerConfig,
    kvm: OwnedFd,
    zygote: Mutex<Option<Zygote>>,
    uids: Arc<Mutex<Uids>>,
    /// Jailed workers waiting for a VM, with their uids.
    ready: Mutex<Vec<Spare>>,
    /// Signalled when a ready worker was taken.
    taken: Condvar,
    /// When creates took a spare: the one before the last, and the last.
    takes: Mutex<(Instant, Instant)>,
}

/// How long the pool waits after a lone create before it makes a spare
/// (not when the pool is empty, nor in a burst of creates). The client
/// that created a VM usually configures and starts it at once (a bhyve
/// launch: nine commands in about 10 ms), and making a spare is mostly
/// kernel work that is not preempted (a network namespace alone is about
/// 1 ms): on two cores it delayed a launch's commands by half a
/// millisecond at a time. Creates closer together than this are a burst,
/// where spares are what keeps creates fast.
const REFILL_QUIET: Duration = Duration::from_millis(20);

impl Workers {
    pub fn new(config: WorkerConfig, cgroups: Option<Cgroups>) -> std::io::Result<Workers> {
        // SAFETY: open with a constant path.
        let fd = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        let kvm = unsafe { OwnedFd::from_raw_fd(fd) };
        let spawner = Arc::new(Spawner {
            uids: Arc::new(Mutex::new(Uids {
                range: config.uids,
                used: BTreeSet::new(),
                reserved: config.reserved.iter().copied().collect(),
                next: 0,
                vms: 0,
            })),
            zygote: Mutex::new(Some(start_zygote(&config, &kvm)?)),
            config,
            kvm,
            ready: Mutex::new(Vec::new()),
            taken: Condvar::new(),
            // No create yet: the pool fills at once.
            takes: Mutex::new({
                let long_ago = Instant::now()
                    .checked_sub(REFILL_QUIET)
                    .unwrap_or_else(Instant::now);
                (long_ago, long_ago)
            }),
        });
        if spawner.config.prefork > 0 {
            let s = Arc::downgrade(&spawner);
            std::thread::Builder::new()
                .name("worker-pool".into())
                .stack_size(READER_STACK)
                .spawn(move || Spawner::keep_ready(s))?;
        }
        Ok(Workers {
            spawner,
            cgroups: cgroups.map(Arc::new),
        })
    }
}

impl Spawner {
    /// Keep `prefork` jailed workers ready, so that a create costs no
    /// process start. Ends with the engine.
    fn keep_ready(me: std::sync::Weak<Spawner>) {
        loop {
            let Some(s) = me.upgrade() else { return };
            {
                let mut r = s.ready.lock();
                if r.len() >= s.config.prefork {
                    // Wake up now and then to notice the engine's end.
                    s.taken.wait_for(&mut r, Duration::from_secs(1));
                    continue;
                }
                let takes = *s.takes.lock();
                if let Some(wait) = refill_wait(r.len(), takes, Instant::now()) {
                    s.taken.wait_for(&mut r, wait);
                    continue;
                }
            }
            let Some(uid) = s.uids.lock().take(&[]) else {
                drop(s);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            match s.spare(uid) {
                Ok(spare) => s.ready.lock().push(spare),
                Err(e) => {
                    s.uids.lock().used.remove(&uid);
                    log::warn!("cannot start a spare worker: {e}");
                    drop(s);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// A ready worker whose uid is none of `avoid`, or a new one.
    fn get(&self, avoid: &[u32]) -> Result<Spare, EngineError> {
        {
            let mut r = self.ready.lock();
            if let Some(i) = r.iter().position(|s| !avoid.contains(&s.id.uid)) {
                // The pool is refilled once the create is answered
                // ([`Workers::create`]): a spare started now would compete
                // with it for the CPU.
                return Ok(r.swap_remove(i));
            }
        }
        let uid = self.uids.lock().take(avoid).ok_or_else(|| {
            EngineError::NoMemory(format!(
                "all {} worker uids are in use",
                self.config.uids.count
            ))
        })?;
        self.spare(uid).map_err(|e| {
            self.uids.lock().used.remove(&uid);
            EngineError::io("starting the VM's worker", e)
        })
    }

    /// A jailed worker for `uid`, with what its create needs made ahead.
    fn spare(&self, uid: u32) -> std::io::Result<Spare> {
        let child = self.spawn(uid)?;
        // A pid that does not fit is no process of ours (never: the
        // zygote's answer was checked): the worker is ended.
        let made = u32::try_from(child.pid)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))
            .and_then(|pid| {
                let start = ProcessId::of(pid)?.start;
                Ok((pid, start, Parked::reader(pid)?))
            });
        match made {
            Ok((pid, start, reader)) => Ok(Spare {
                id: WorkerId { pid, start, uid },
                child,
                reader,
            }),
            Err(e) => {
                kill(&child.pidfd);
                reap(&child.pidfd);
                Err(e)
            }
        }
    }
}

/// How long the pool should wait before it makes a spare, holding `ready`
/// spares, after creates took spares at `takes` (the one before the last,
/// the last): while a spare is still there and the last create came alone,
/// until [`REFILL_QUIET`] after it, so that its client goes first.
fn refill_wait(ready: usize, takes: (Instant, Instant), now: Instant) -> Option<Duration> {
    let (before, last) = takes;
    let lone = last.saturating_duration_since(before) >= REFILL_QUIET;
    let since = now.saturating_duration_since(last);
    (ready > 0 && lone && since < REFILL_QUIET).then(|| REFILL_QUIET - since)
}

/// A worker waiting for its VM, with its identity (for the VM record) and
/// the thread that will read its messages already started.
struct Spare {
    child: Child,
    id: WorkerId,
    reader: Parked,
}

/// Where a VM's worker came from.
enum Origin {
    /// A spare of ours, with its reader thread parked.
    Spare(Parked),
    /// Taken over from an earlier daemon: not our child, and no reader was
    /// started ahead for it.
    Adopted,
}

/// A thread started ahead of need and parked until it is given its work.
/// A new thread waits for its first time slice behind everything runnable
/// (measured 3.5 ms in a create on a busy 2-core machine, longer than the
/// create itself); a parked one is woken like any sleeper.
struct Parked(mpsc::SyncSender<Box<dyn FnOnce() + Send>>);

impl Parked {
    /// The thread that will read the messages of worker `pid`.
    fn reader(pid: u32) -> std::io::Result<Parked> {
        Parked::new(format!("worker-{pid}"))
    }

    fn new(name: String) -> std::io::Result<Parked> {
        let (tx, rx) = mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(1);
        std::thread::Builder::new()
            .name(name)
            .stack_size(READER_STACK)
            .spawn(move || {
                // Dropped unused (the engine ended): the thread just ends.
                if let Ok(work) = rx.recv() {
                    work();
                }
            })?;
        Ok(Parked(tx))
    }

    /// Run `work` on the parked thread.
    fn run(self, work: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
        self.0
            .send(work)
            .map_err(|_| std::io::Error::other("the parked thread is gone"))
    }
}

impl Engine for Workers {
    type Vm = WorkerVm;

    fn create(&self, name: &str, creator: &Creator) -> Result<WorkerVm, EngineError> {
        let r = self.create_on_spare(name, creator);
        {
            let mut t = self.spawner.takes.lock();
            *t = (t.1, Instant::now());
        }
        self.spawner.taken.notify_one();
        r
    }

    fn adopt(&self, name: &str, id: &WorkerId) -> Result<WorkerVm, EngineError> {
        let sp = &self.spawner;
        let dir = sp
            .config
            .sockets
            .as_ref()
            .ok_or_else(|| EngineError::Unsupported("no socket directory".into()))?;
        let refuse = |why: String| EngineError::Unsupported(why);
        if !sp.config.uids.contains(id.uid) {
            return Err(refuse(format!(
                "uid {} is not a worker uid (--worker-uids)",
                id.uid
            )));
        }
        sp.uids.lock().reserved.remove(&id.uid);
        // The pidfd pins the process: checked after it is taken, the start
        // time proves that the pid names the recorded worker, not a reuse.
        let pidfd = pidfd_open(id.pid).map_err(|e| EngineError::io("pidfd_open", e))?;
        match ProcessId::of(id.pid) {
            Ok(p) if p.start == id.start => {}
            _ => return Err(refuse(format!("process {} is gone", id.pid))),
        }
        // From here on the process is the recorded worker: one that cannot
        // be taken over is ended, never left running unmanaged.
        let r = self.take_over(name, id, dir, pidfd);
        if let Err(e) = &r {
            log::warn!("VM {name}: worker pid {} is ended: {e}", id.pid);
        }
        r
    }

    fn settle(&self, within: Duration) -> bool {
        let t0 = Instant::now();
        while self.spawner.uids.lock().vms > 0 {
            if t0.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

impl Workers {
    /// A create on a spare worker (or a new one when none is ready).
    fn create_on_spare(&self, name: &str, creator: &Creator) -> Result<WorkerVm, EngineError> {
        let sp = &self.spawner;
        let Spare { child, id, reader } = sp.get(&[creator.ruid, creator.euid])?;
        let leaf = self
            .cgroups
            .as_ref()
            .and_then(|c| c.place(child.pid, id.uid, creator.pid));
        let path = sp.config.sockets.as_ref().map(|d| socket_path(d, id.pid));
        let bound = path.as_ref().map(|p| bind_adoption_socket(p));
        let vm = WorkerVm::start(
            name,
            child,
            id,
            sp.uids.clone(),
            leaf,
            path.clone(),
            Origin::Spare(reader),
        )?;
        // A failure leaves with `vm`: its drop ends the worker.
        let fd = match bound {
            Some(Ok(l)) => Some(l),
            Some(Err(e)) => {
                let p = path.unwrap_or_default();
                return Err(EngineError::io(format!("binding {}", p.display()), e));
            }
            None => None,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
        vm.request(
            &Request::Create {
                name: name.into(),
                adoptable: fd.is_some(),
            },
            &fds,
        )?;
        Ok(vm)
    }

    fn take_over(
        &self,
        name: &str,
        id: &WorkerId,
        dir: &std::path::Path,
        pidfd: OwnedFd,
    ) -> Result<WorkerVm, EngineError> {
        let sp = &self.spawner;
        let refuse = |why: String| {
            kill(&pidfd);
            EngineError::Unsupported(why)
        };
        let path = socket_path(dir, id.pid);
        let sock = match connect_adoption_socket(&path) {
            Ok(s) => s,
            Err(e) => return Err(refuse(format!("connecting to {}: {e}", path.display()))),
        };
        match peer_cred(&sock) {
            Some((pid, uid)) if pid == id.pid && uid == id.uid => {}
            other => {
                return Err(refuse(format!(
                    "{} is held by {other:?}, not worker pid {} uid {}",
                    path.display(),
                    id.pid,
                    id.uid
                )))
            }
        }
        if !sp.uids.lock().used.insert(id.uid) {
            return Err(refuse(format!("worker uid {} is taken twice", id.uid)));
        }
        let Ok(pid) = libc::pid_t::try_from(id.pid) else {
            return Err(refuse(format!("worker pid {} is no pid", id.pid)));
        };
        let child = Child { pid, pidfd, sock };
        if let Err(e) = wait_ready(&child) {
            sp.uids.lock().used.remove(&id.uid);
            kill(&child.pidfd);
            return Err(EngineError::io("the worker did not answer", e));
        }
        let leaf = self.cgroups.as_ref().and_then(|c| c.adopt(id.pid, id.uid));
        let held = leaf.as_ref().and_then(Leaf::memory);
        let vm = WorkerVm::start(
            name,
            child,
            *id,
            sp.uids.clone(),
            leaf,
            Some(path),
            Origin::Adopted,
        )?;
        // What the leaf allows is what the worker holds: kept as boot
        // images (a later `memory` command only raises the limit).
        vm.0.ram.store(0, Ordering::Relaxed);
        if let Some(held) = held {
            vm.0.images.store(held, Ordering::Relaxed);
        }
        Ok(vm)
    }
}

/// Where the adoption socket of worker `pid` is bound.
fn socket_path(dir: &std::path::Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

fn unix_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A unix socket bound at `path` (a stale file there is replaced), for the
/// worker to listen on.
fn bind_adoption_socket(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let sock = unix_socket()?;
    let addr = nix::sys::socket::UnixAddr::new(path).map_err(std::io::Error::from)?;
    nix::sys::socket::bind(sock.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
    Ok(sock)
}

/// Connect to a worker's adoption socket, without waiting for a full queue.
fn connect_adoption_socket(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let sock = unix_socket()?;
    let addr = nix::sys::socket::UnixAddr::new(path).map_err(std::io::Error::from)?;
    // SAFETY: fcntl flag changes on our socket.
    unsafe {
        let fl = libc::fcntl(sock.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    nix::sys::socket::connect(sock.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
    // SAFETY: as above.
    unsafe {
        let fl = libc::fcntl(sock.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    Ok(sock)
}

/// (pid, uid) of the process that listened on the socket `sock` is
/// connected to.
fn peer_cred(sock: &OwnedFd) -> Option<(u32, u32)> {
    let c = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some((u32::try_from(c.pid()).ok()?, c.uid()))
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open with a pid and no flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A started worker.
struct Child {
    pid: i32,
    pidfd: OwnedFd,
    sock: OwnedFd,
}

/// The zygote process and the daemon's end of its socket.
struct Zygote {
    process: std::process::Child,
    sock: OwnedFd,
}

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0; 2];
    // SAFETY: socketpair writes two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// A descriptor numbered above the ones the child sets up, so that its
/// dup2 onto 3 and 4 never finds the source already there.
fn high(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // SAFETY: fcntl duplicates a descriptor we hold.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Start the zygote: `vmm-worker --zygote`, root, in the daemon's
/// namespaces, with its socket as descriptor 3 and /dev/kvm as 4.
fn start_zygote(cfg: &WorkerConfig, kvm: &OwnedFd) -> std::io::Result<Zygote> {
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = seqpacket_pair()?;
    let (theirs, kvm) = (high(theirs.as_fd())?, high(kvm.as_fd())?);
    let (t, k) = (theirs.as_raw_fd(), kvm.as_raw_fd());
    let mut cmd = std::process::Command::new(&cfg.exe);
    cmd.arg("--zygote")
        .env_clear()
        .stdin(std::process::Stdio::null());
    // Only the log filter and the time zone pass: a worker needs no other
    // environment.
    for key in ["RUST_LOG", "TZ"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    // SAFETY: dup2 is async-signal-safe; it runs in the forked child only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(t, SOCKET_FD) < 0 || libc::dup2(k, KVM_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let process = cmd.spawn()?;
    Ok(Zygote {
        process,
        sock: ours,
    })
}

impl Spawner {
    /// Start a worker for `uid` and wait until it is jailed and ready.
    fn spawn(&self, uid: u32) -> std::io::Result<Child> {
        let threads = u64::from(self.config.max_cpus) + WORKER_EXTRA_THREADS;
        let req = Spawn {
            uid,
            gid: uid,
            max_fds: WORKER_MAX_FDS,
            max_threads: threads,
            test_hooks: self.config.test_hooks,
        };
        let (ours, theirs) = seqpacket_pair()?;
        let (pid, pidfd) = {
            let mut z = self.zygote.lock();
            // A zygote that died (or was killed) is replaced once.
            let mut answer = Err(std::io::Error::other("no zygote"));
            for _ in 0..2 {
                if z.is_none() {
                    *z = Some(start_zygote(&self.config, &self.kvm)?);
                }
                let zy = z.as_ref().expect("set above");
                answer = ask_zygote(zy, &req, &theirs);
                if answer.is_ok() {
                    break;
                }
                log::warn!("the worker zygote failed; starting a new one");
                *z = None;
            }
            answer?
        };
        drop(theirs);
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            kill(&pidfd);
            reap(&pidfd);
            return Err(std::io::Error::other(format!(
                "the zygote answered pid {pid}"
            )));
        };
        let child = Child {
            pid,
            pidfd,
            sock: ours,
        };
        match wait_ready(&child) {
            Ok(()) => Ok(child),
            Err(e) => {
                kill(&child.pidfd);
                reap(&child.pidfd);
                Err(e)
            }
        }
    }
}

/// One spawn request to the zygote: the new worker's pid and pidfd.
fn ask_zygote(z: &Zygote, req: &Spawn, theirs: &OwnedFd) -> std::io::Result<(u32, OwnedFd)> {
    worker::send(z.sock.as_fd(), &req.to_string(), &[theirs.as_fd()])?;
    let bad = || std::io::Error::other("malformed zygote answer");
    let (text, mut fds) = worker::recv(z.sock.as_fd())?.ok_or_else(bad)?;
    match (Spawned::parse(&text).map_err(|_| bad())?, fds.pop()) {
        (Spawned::Pid(pid), Some(pidfd)) if fds.is_empty() => Ok((pid, pidfd)),
        (Spawned::Failed(errno), None) => Err(std::io::Error::from_raw_os_error(errno)),
        _ => Err(bad()),
    }
}

fn wait_ready(child: &Child) -> std::io::Result<()> {
    let mut p = libc::pollfd {
        fd: child.sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ready_ms = i32::try_from(READY_WITHIN.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ready_ms) };
    if n <= 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the worker did not become ready",
        ));
    }
    match worker::recv(child.sock.as_fd())? {
        Some((t, fds)) if fds.is_empty() && Event::parse(&t) == Ok(Event::Ready) => Ok(()),
        _ => Err(std::io::Error::other(
            "the worker could not enter its jail (see the log)",
        )),
    }
}

/// How long a destroy waits for a command in flight to be answered before
/// it kills the worker ([`WorkerVm::kill`]).
const KILL_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

fn kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal on a pidfd we own; a pidfd cannot name a
    // recycled pid.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Wait for the end of a worker that is not our child (adopted): its
/// pidfd turns readable when it exits. Its exit status is not ours to
/// collect (waitid is for parents), but it can be read: from /proc while
/// it is a zombie, and once its new parent (init, or a subreaper) has reaped
/// it, through the pidfd (PIDFD_GET_INFO, Linux 6.15 and later). (code,
/// signal) as [`reap`] gives, or None where neither tells.
fn await_end(pidfd: &OwnedFd, id: &WorkerId) -> Option<(i32, i32)> {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd; EINTR retries.
    while unsafe { libc::poll(&mut p, 1, -1) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    let zombie = ProcessId {
        pid: id.pid,
        start: id.start,
    };
    // Reaped between the two looks: the pidfd has it by then.
    let status = exit_status(pidfd)
        .or_else(|| zombie.zombie_status())
        .or_else(|| exit_status(pidfd))?;
    Some(if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), 0)
    } else {
        (0, libc::WTERMSIG(status))
    })
}

/// `struct pidfd_info` of <linux/pidfd.h>, as first published (64 bytes;
/// `exit_code` since Linux 6.15).
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}

const PIDFD_INFO_EXIT: u64 = 1 << 3;
/// _IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info).
const PIDFD_GET_INFO: libc::c_ulong =
    0xC000_0000 | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;

/// The wait status of the ended, reaped process of `pidfd`, where the
/// kernel keeps it (Linux 6.15 and later).
fn exit_status(pidfd: &OwnedFd) -> Option<i32> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: PIDFD_GET_INFO writes at most size_of::<PidfdInfo>() bytes
    // (the size encoded in the request) into `info`, which lives across
    // the call. Older kernels fail with ENOTTY or EINVAL.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
    (rc == 0 && info.mask & PIDFD_INFO_EXIT != 0).then_some(info.exit_code)
}

/// Wait for the worker to end and collect it: (code, signal).
fn reap(pidfd: &OwnedFd) -> Option<(i32, i32)> {
    // SAFETY: waitid writes the siginfo.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // An owned descriptor is not negative.
    let pidfd_id = libc::id_t::try_from(pidfd.as_raw_fd()).ok()?;
    loop {
        // SAFETY: P_PIDFD with a pidfd we own.
        let rc = unsafe { libc::waitid(libc::P_PIDFD, pidfd_id, &mut info, libc::WEXITED) };
        if rc == 0 {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
    // SAFETY: waitid filled a SIGCHLD siginfo.
    let (code, status) = unsafe { (info.si_code, info.si_status()) };
    Some(if code == libc::CLD_EXITED {
        (status, 0)
    } else {
        (0, status)
    })
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGSYS => "SIGSYS".into(),
        n => format!("signal {n}"),
    }
}

/// What status readers see, kept up to date from the worker's events.
struct View {
    status: Status,
    segments: Vec<Segment>,
    /// Why the worker is gone, once it is.
    failed: Option<String>,
    reaped: bool,
}

struct Inner {
    name: String,
    pid: i32,
    id: WorkerId,
    /// The adoption socket's path (removed with the worker).
    socket: Option<PathBuf>,
    /// Taken over from an earlier daemon: not our child.
    adopted: bool,
    pidfd: OwnedFd,
    sock: OwnedFd,
    uid: u32,
    uids: Arc<Mutex<Uids>>,
    leaf: Option<Leaf>,
    view: Mutex<View>,
    generation: AtomicU64,
    notifier: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Where the reply to the request in flight goes.
    pending: Mutex<Option<mpsc::SyncSender<Reply>>>,
    /// The daemon killed the worker (destroy): its end is no failure.
    killed: AtomicBool,
    /// Guest RAM and boot images the worker holds, for its memory limit.
    ram: AtomicU64,
    images: AtomicU64,
}

/// One VM, run by a worker process.
pub struct WorkerVm(Arc<Inner>);

impl WorkerVm {
    fn start(
        name: &str,
        child: Child,
        id: WorkerId,
        uids: Arc<Mutex<Uids>>,
        leaf: Option<Leaf>,
        socket: Option<PathBuf>,
        origin: Origin,
    ) -> Result<WorkerVm, EngineError> {
        let uid = id.uid;
        let adopted = matches!(origin, Origin::Adopted);
        // Counted down by `finish`, which every path below ends in.
        uids.lock().vms += 1;
        let inner = Arc::new(Inner {
            name: name.into(),
            pid: child.pid,
            id,
            socket,
            adopted,
            pidfd: child.pidfd,
            sock: child.sock,
            uid,
            uids,
            leaf,
            view: Mutex::new(View {
                status: Status {
                    state: State::Configuring,
                    cpus: 1,
                    memory: crate::engine::DEFAULT_MEMORY,
                    exits: 0,
                    io_exits: 0,
                    boot_time_us: None,
                    boot_io_exits: None,
                    resident: None,
                },
                segments: Vec::new(),
                failed: None,
                reaped: false,
            }),
            generation: AtomicU64::new(0),
            notifier: Mutex::new(None),
            pending: Mutex::new(None),
            killed: AtomicBool::new(false),
            ram: AtomicU64::new(crate::engine::DEFAULT_MEMORY),
            images: AtomicU64::new(0),
        });
        let reader = inner.clone();
        let parked = match origin {
            Origin::Spare(parked) => Ok(parked),
            Origin::Adopted => Parked::reader(id.pid),
        };
        let spawned = parked.and_then(|p| p.run(Box::new(move || reader.read_events())));
        if let Err(e) = spawned {
            kill(&inner.pidfd);
            inner.finish(None);
            return Err(EngineError::io("starting a reader thread", e));
        }
        log::info!(
            "VM {name}: worker pid {} {} as uid {uid}{}",
            child.pid,
            if adopted { "adopted, runs" } else { "runs" },
            if inner.leaf.is_some() {
                " in its own cgroup"
            } else {
                ""
            }
        );
        Ok(WorkerVm(inner))
    }

    /// Send `req` and wait for its reply. Blocks while the worker works (on
    /// the VM's executor only).
    fn request(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(), EngineError> {
        let (tx, rx) = mpsc::sync_channel(1);
        {
            // Set under the view lock: the reader's death path clears
            // `pending` after setting `failed`, so no request is left waiting.
            let v = self.0.view.lock();
            if v.failed.is_some() || v.reaped {
                return Err(EngineError::Destroyed);
            }
            *self.0.pending.lock() = Some(tx);
        }
        if worker::send(self.0.sock.as_fd(), &req.to_string(), fds).is_err() {
            self.0.pending.lock().take();
            return Err(EngineError::Destroyed);
        }
        match rx.recv() {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Error {
                errno,
                kind,
                message,
            }) => Err(engine_error(errno, kind, message)),
            Err(_) => Err(EngineError::Destroyed),
        }
    }

    fn set_memory_limit(&self) {
        if let Some(leaf) = &self.0.leaf {
            leaf.set_memory(
                self.0.ram.load(Ordering::Relaxed) + self.0.images.load(Ordering::Relaxed),
            );
        }
    }
}

/// The engine's error from what the worker reported.
fn engine_error(errno: i32, kind: ErrorKind, message: String) -> EngineError {
    match kind {
        ErrorKind::Invalid => EngineError::InvalidCommand(message),
        ErrorKind::State => EngineError::WrongState(match message.as_str() {
            "configuring" => "configuring",
            "running" => "running",
            "exited" => "exited",
            "destroyed" => "destroyed",
            _ => "in another state",
        }),
        ErrorKind::Destroyed => EngineError::Destroyed,
        ErrorKind::Unsupported => EngineError::Unsupported(message),
        ErrorKind::NoMemory => EngineError::NoMemory(message),
        ErrorKind::Os => EngineError::io(message, std::io::Error::from_raw_os_error(errno)),
    }
}

/// A memfd as the worker's engine makes them, of exactly `size` bytes:
/// nothing else may be served as `vmm.io/NAME.SEG` (not a client's disk
/// that a compromised worker passes off as guest memory).
fn check_memfd(fd: &OwnedFd, size: u64) -> Result<(), String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("readlink: {e}"))?;
    if !link.as_os_str().as_encoded_bytes().starts_with(b"/memfd:") {
        return Err(format!("{} is not a memfd", link.display()));
    }
    // SAFETY: fcntl on a descriptor we own; only memfds answer F_GET_SEALS
    // with a seal set that lacks F_SEAL_SEAL.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err("not a sealable memfd".into());
    }
    // SAFETY: `libc::stat` is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor we own writes only into `st`, which
    // lives across the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err("fstat failed".into());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || u64::try_from(st.st_size).ok() != Some(size) {
        return Err(format!("size {} instead of {size}", st.st_size));
    }
    Ok(())
}

impl Inner {
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let f = self.notifier.lock().clone();
        if let Some(f) = f {
            f();
        }
    }

    /// The reader thread: apply the worker's events until it is gone.
    fn read_events(self: Arc<Self>) {
        let why = loop {
            let (text, fds) = match worker::recv(self.sock.as_fd()) {
                Ok(Some(m)) => m,
                // A worker that ends with messages unread resets the socket.
                Ok(None) => break None,
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => break None,
                Err(e) => break Some(format!("receiving: {e}")),
            };
            let ev = match Event::parse(&text) {
                Ok(ev) if ev.fds() == fds.len() => ev,
                Ok(_) => break Some("descriptors do not match the message".into()),
                Err(e) => break Some(e.to_string()),
            };
            match ev {
                Event::Ready => break Some("a second 'ready'".into()),
                Event::Reply(r) => match self.pending.lock().take() {
                    Some(tx) => {
                        let _ = tx.send(r);
                    }
                    None => break Some("a reply nobody asked for".into()),
                },
                Event::Status(s) => {
                    if matches!(s.state, State::Destroyed) {
                        break Some("it reported its VM destroyed".into());
                    }
                    let moved = {
                        let mut v = self.view.lock();
                        if v.failed.is_some() {
                            continue;
                        }
                        let old = std::mem::replace(&mut v.status, s);
                        // Counters alone (the worker's periodic report of a
                        // running guest) are no state change for pollers.
                        (&old.state, old.cpus, old.memory)
                            != (&v.status.state, v.status.cpus, v.status.memory)
                    };
                    if moved {
                        self.changed();
                    }
                }
                Event::Segments(infos) => {
                    let mut segs = Vec::with_capacity(infos.len());
                    let mut bad = None;
                    for (info, fd) in infos.into_iter().zip(fds) {
                        if let Err(e) = check_memfd(&fd, info.size) {
                            bad = Some(format!("segment {}: {e}", info.name));
                            break;
                        }
                        segs.push(Segment {
                            name: info.name,
                            size: info.size,
                            fd: Arc::new(fd),
                        });
                    }
                    if bad.is_some() {
                        break bad;
                    }
                    self.view.lock().segments = segs;
                }
            }
        };
        if let Some(why) = why {
            log::error!(
                "VM {}: worker pid {} broke the protocol ({why}): killing it",
                self.name,
                self.pid
            );
            kill(&self.pidfd);
        }
        let end = if self.adopted {
            await_end(&self.pidfd, &self.id)
        } else {
            reap(&self.pidfd)
        };
        self.finish(end);
    }

    /// The worker is gone (reaped: `end` = exit code, signal).
    fn finish(&self, end: Option<(i32, i32)>) {
        let killed = self.killed.load(Ordering::Acquire);
        let cause = match end {
            _ if killed => None,
            Some((code, 0)) => Some(format!("the VM's worker process exited with status {code}")),
            Some((_, libc::SIGSYS)) => Some(
                "the VM's worker process made a forbidden system call and was killed (seccomp)"
                    .to_string(),
            ),
            Some((_, libc::SIGKILL)) if self.leaf.as_ref().is_some_and(Leaf::oom_killed) => {
                Some("the VM's worker process ran out of memory (its cgroup's memory.max)".into())
            }
            Some((_, sig)) => Some(format!(
                "the VM's worker process was killed by {}",
                signal_name(sig)
            )),
            None => Some("the VM's worker process is gone".into()),
        };
        if let Some(c) = &cause {
            log::warn!(
                "VM {} (worker pid {}, uid {}): {c}",
                self.name,
                self.pid,
                self.uid
            );
        }
        {
            let mut v = self.view.lock();
            v.failed = Some(cause.clone().unwrap_or_else(|| "destroyed".into()));
            if let Some(c) = &cause {
                if v.status.state != State::Destroyed {
                    v.status.state = State::Exited(Exit::error(c));
                }
            }
            v.reaped = true;
            // A request in flight gets no reply: its sender goes.
            self.pending.lock().take();
        }
        // Pollers learn of the end before the clean-up below (a cgroup
        // rmdir can take milliseconds).
        self.changed();
        if let Some(leaf) = &self.leaf {
            leaf.remove();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        let mut u = self.uids.lock();
        u.used.remove(&self.uid);
        u.vms = u.vms.saturating_sub(1);
    }
}

impl EngineVm for WorkerVm {
    fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<(), EngineError> {
        let labels = cmd.descriptors();
        let mut owned = Vec::with_capacity(labels.len());
        for n in &labels {
            owned.push(
                fds.take(*n)
                    .map_err(|e| EngineError::io(format!("descriptor {n}"), e))?,
            );
        }
        let image = match (&cmd, owned.first()) {
            (Command::Bootrom(_) | Command::Kernel(_) | Command::Initrd(_), Some(fd)) => {
                // SAFETY: `libc::stat` is plain old data; all-zero is valid.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: fstat on a descriptor we own writes only into `st`,
                // which lives across the call (on failure `st` stays zeroed).
                unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
                u64::try_from(st.st_size).unwrap_or(0)
            }
            _ => 0,
        };
        // Raise the memory limit before the worker allocates; settle it after.
        let (ram0, img0) = (
            self.0.ram.load(Ordering::Relaxed),
            self.0.images.load(Ordering::Relaxed),
        );
        if let Command::Memory(bytes) = &cmd {
            self.0.ram.store(ram0.max(*bytes), Ordering::Relaxed);
        }
        self.0.images.store(img0 + image, Ordering::Relaxed);
        self.set_memory_limit();
        let memory = if let Command::Memory(b) = &cmd {
            Some(*b)
        } else {
            None
        };
        let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
        let r = self.request(
            &Request::Exec {
                labels,
                command: cmd,
            },
            &borrowed,
        );
        match (&r, memory) {
            (Ok(()), Some(b)) => self.0.ram.store(b, Ordering::Relaxed),
            (Err(_), _) => {
                self.0.ram.store(ram0, Ordering::Relaxed);
                self.0.images.store(img0, Ordering::Relaxed);
            }
            _ => {}
        }
        self.set_memory_limit();
        r
    }

    fn detach(&self) {
        if let Err(e) = self.request(&Request::Detach, &[]) {
            log::debug!("VM {}: detach: {e}", self.0.name);
        }
    }

    fn destroy(&self) {
        self.0.killed.store(true, Ordering::Release);
        kill(&self.0.pidfd);
        // Not waiting for the reaper: the worker's memory goes with its
        // end, its uid is free again once it is reaped, and a worker inside
        // a client's hung file must not hold up the destroy.
        {
            let mut v = self.0.view.lock();
            v.status.state = State::Destroyed;
            v.segments.clear();
        }
        self.0.changed();
    }

    fn kill(&self) {
        // A command in flight on another handle (bhyvectl --force-poweroff
        // whose effect is what makes the owner close and destroy) is given
        // a moment to be answered: its effect happened, and killing the
        // worker first would turn its reply into ENXIO. Bounded, so that a
        // command stuck on its client's own hung file cannot hold up the
        // destroy.
        let t = Instant::now();
        while self.0.pending.lock().is_some() && t.elapsed() < KILL_GRACE {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.0.killed.store(true, Ordering::Release);
        kill(&self.0.pidfd);
    }

    fn failed(&self) -> bool {
        let v = self.0.view.lock();
        v.failed.is_some() && !self.0.killed.load(Ordering::Acquire)
    }

    fn status(&self) -> String {
        format!("name={}\n{}", self.0.name, self.0.view.lock().status)
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    fn segments(&self) -> Vec<Segment> {
        self.0.view.lock().segments.clone()
    }

    fn set_notifier(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.0.notifier.lock() = Some(Arc::from(f));
    }

    fn worker(&self) -> Option<WorkerId> {
        self.0.socket.is_some().then_some(self.0.id)
    }
}

impl Drop for WorkerVm {
    fn drop(&mut self) {
        // A VM dropped without destroy (a failed create): never leave its
        // worker running.
        if !self.0.view.lock().reaped {
            self.0.killed.store(true, Ordering::Release);
            kill(&self.0.pidfd);
        }
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod live_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_lets_a_lone_creates_client_go_first() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let lone = (t0, t0 + ms(100));
        // Just after a lone create, with a spare left: wait out the quiet.
        assert_eq!(
            refill_wait(1, lone, t0 + ms(105)),
            Some(REFILL_QUIET - ms(5))
        );
        // Quiet over: make it now.
        assert_eq!(refill_wait(1, lone, t0 + ms(100) + REFILL_QUIET), None);
        // The pool is empty: at once, whatever the client does.
        assert_eq!(refill_wait(0, lone, t0 + ms(101)), None);
        // A burst (creates 2 ms apart): spares first.
        assert_eq!(
            refill_wait(1, (t0 + ms(98), t0 + ms(100)), t0 + ms(101)),
            None
        );
    }

    #[test]
    fn uid_ranges() {
        assert_eq!(
            UidRange::parse("2147483648-2147549183"),
            Ok(UidRange {
                first: 2147483648,
                count: 65536
            })
        );
        assert_eq!(
            UidRange::parse("100000:10"),
            Ok(UidRange {
                first: 100000,
                count: 10
            })
        );
        for bad in [
            "0-10",
            "0:5",
            "10-5",
            "5:0",
            "x-1",
            "7",
            "4294967290-4294967295",
        ] {
            assert!(UidRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uids_are_unique_and_avoid_the_creator() {
        let mut u = Uids {
            range: UidRange {
                first: 1000,
                count: 3,
            },
            used: BTreeSet::new(),
            reserved: BTreeSet::new(),
            next: 0,
            vms: 0,
        };
        assert_eq!(u.take(&[1000]), Some(1001));
        assert_eq!(u.take(&[]), Some(1002));
        assert_eq!(u.take(&[]), Some(1000));
        assert_eq!(u.take(&[]), None, "all in use");
        u.used.remove(&1001);
        assert_eq!(u.take(&[1001]), None, "the only free one is the creator's");
        assert_eq!(u.take(&[]), Some(1001));
    }

    #[test]
    fn worker_errors_keep_their_errno_and_text() {
        let e = engine_error(libc::EBUSY, ErrorKind::State, "running".into());
        assert_eq!(e.errno(), libc::EBUSY);
        assert_eq!(e.to_string(), "not allowed while the VM is running");
        let e = engine_error(libc::EBADF, ErrorKind::Os, "descriptor 7".into());
        assert_eq!(e.errno(), libc::EBADF);
        assert!(e.to_string().starts_with("descriptor 7: "));
    }

    #[test]
    fn only_memfds_of_the_declared_size_pass() {
        // SAFETY: memfd_create with a constant name.
        let m = unsafe { libc::memfd_create(c"sysmem".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(m >= 0);
        // SAFETY: fresh descriptor.
        let m = unsafe { OwnedFd::from_raw_fd(m) };
        // SAFETY: resize our memfd.
        assert_eq!(unsafe { libc::ftruncate(m.as_raw_fd(), 8192) }, 0);
        assert_eq!(check_memfd(&m, 8192), Ok(()));
        assert!(check_memfd(&m, 4096).is_err());
        let f: OwnedFd = std::fs::File::open("/etc/hostname")
            .or_else(|_| std::fs::File::open("/etc/passwd"))
            .unwrap()
            .into();
        assert!(check_memfd(&f, 0).unwrap_err().contains("not a memfd"));
    }
}
