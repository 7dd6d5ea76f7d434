//! The filesystem's behaviour, independent of FUSE: nodes, handles and the
//! vmmctl and vmm/NAME protocols, generic over the engine. The fuser adapter
//! (fs.rs) reads the caller's credentials and converts replies.
//!
//! Handlers never wait on a user or a guest: operations that may take time
//! are queued (vmmctl work on the fair pool, VM work on the VM's executor)
//! and answered through a [`Done`] callback from wherever they finish.

use crate::creds::{Caller, Creds};
use crate::engine::{Creator, Engine, EngineVm, DEFAULT_MEMORY};
use crate::error::{FsError, FsResult};
use crate::handover::{Deliver, Handover};
use crate::jails::{self, Jail, Jails, ProcessId};
use crate::nodes::{Node, MAX_SEGMENTS};
use crate::policy::{self, Limits, Principal, Transient, VmId};
use crate::received::{Kind, Labelled, Received};
use crate::registry::{ChargeKind, Created, Registry, Runtime};
use crate::sched::{Closer, Executor, FairPool, Refused, Timer};
use crate::state::{Grants, JailGrant, NodeAttrs, State, StateStore};
use crate::vmstate::{JailRef, VmFile, VmStore};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_engine::command::Command;
use vmm_protocol::handover;
use vmm_protocol::vmmctl::{self, CtlRequest};

/// How long a create waits for a same-named VM (or, at the per-user limit,
/// the user's own VM) that is being destroyed (SPEC: free within 1 s).
pub const DESTROY_WAIT: Duration = Duration::from_secs(1);
/// A destroy answers when the VM is torn down or after this long, whichever
/// is first: the VM is already gone for every client (invisible, handles get
/// ENXIO); a teardown stuck on the owner's own hung file does not make the
/// destroyer wait.
pub const DESTROY_REPLY_WITHIN: Duration = Duration::from_millis(50);
/// How long a VM whose engine broke down (its worker died) stays after it
/// reported the cause: its client reads `exit=error` and the cause, then the
/// VM is destroyed (vmmfs(8) ISOLATION).
pub const FAILED_VM_GRACE: Duration = Duration::from_millis(500);
/// Open handles of one unprivileged user (each costs the daemon memory).
pub const MAX_HANDLES_PER_USER: usize = 4096;
/// Descriptors handed over to one handle and not yet used by a command.
pub const MAX_FDS_PER_HANDLE: usize = 16;
/// Descriptors handed over and not yet used, per unprivileged user.
pub const MAX_FDS_PER_USER: usize = 64;
/// Commands waiting on one VM's executor.
pub const MAX_QUEUED_PER_VM: usize = 32;
/// vmmctl requests of one user waiting on the fair pool.
pub const MAX_QUEUED_PER_USER: usize = 256;
/// Largest boot images (also the engine's limits): bootrom, kernel.
const MAX_BOOTROM: u64 = 16 << 20;
const MAX_KERNEL: u64 = 512 << 20;

/// The size vmmctl reports. The kernel runs writes to a FUSE file in
/// parallel only while they end within its size; vmmctl is opened as a
/// stream (every write at offset 0) and a valid command is at most 254
/// bytes, so every write fits and no user's request waits for another's.
pub const VMMCTL_SIZE: u64 = 4096;

/// Where a result goes.
pub type Done<T> = Box<dyn FnOnce(FsResult<T>) + Send>;

/// A [`Done`] that several paths may race to call; the first wins.
struct Once<T>(Arc<Mutex<Option<Done<T>>>>);

impl<T> Clone for Once<T> {
    fn clone(&self) -> Self {
        Once(self.0.clone())
    }
}

impl<T> Once<T> {
    fn new(done: Done<T>) -> Once<T> {
        Once(Arc::new(Mutex::new(Some(done))))
    }

    fn call(&self, r: FsResult<T>) {
        let f = self.0.lock().take();
        if let Some(f) = f {
            f(r);
        }
    }
}

/// Attributes of a node as the adapter reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub node: Node,
    pub attrs: NodeAttrs,
    pub size: u64,
}

/// A directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub node: Node,
    pub name: String,
}

/// Result of an open.
pub struct Opened {
    pub fh: u64,
    /// For segment nodes: the memfd to pass reads, writes and mmap through to.
    pub backing: Option<Arc<OwnedFd>>,
}

/// Daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Group of vmmctl on first start and of every VM node.
    pub group: u32,
    pub limits: Limits,
    /// Threads of the fair pool.
    pub workers: usize,
}

struct CtlHandle {
    opener: Creds,
    /// The opening process: a transient VM's creator, for [`policy::create`].
    process: ProcessId,
}

struct VmHandle<V> {
    id: VmId,
    rt: Arc<Runtime<V>>,
    opener: Creds,
    /// Engine generation this handle last read: poll is ready when it moved.
    seen: u64,
    /// Status text being read, and how much of it was served. Reads at offset 0
    /// start a fresh one; other reads continue it (the kernel's file offset
    /// also moves with writes, so it is not used); once it is exhausted (read
    /// returned 0) or after a write, the next read starts afresh.
    snapshot: Option<(Vec<u8>, usize)>,
    /// Message of the last failed command, reported by the next read.
    error: Option<String>,
    /// Descriptors handed over and not yet used, by label.
    fds: HashMap<i32, Received>,
}

enum Kinded<V> {
    Ctl(CtlHandle),
    Vm(Box<VmHandle<V>>),
    Segment,
}

struct Handle<V> {
    /// Real uid of the opener: whose budget the handle uses.
    user: u32,
    kind: Kinded<V>,
}

struct Handles<V> {
    map: HashMap<u64, Handle<V>>,
    per_user: HashMap<u32, usize>,
    fds_per_user: HashMap<u32, usize>,
}

fn dec(m: &mut HashMap<u32, usize>, user: u32, by: usize) {
    if let Some(n) = m.get_mut(&user) {
        *n = n.saturating_sub(by);
        if *n == 0 {
            m.remove(&user);
        }
    }
}

type Waker = Box<dyn FnOnce() + Send>;

/// Pending poll wake-ups: at most one per handle (the kernel's latest).
#[derive(Default)]
struct Pollers(Mutex<HashMap<VmId, HashMap<u64, Waker>>>);

impl Pollers {
    fn wake(&self, id: VmId) {
        let wakers = self.0.lock().remove(&id).unwrap_or_default();
        for w in wakers.into_values() {
            w();
        }
    }

    fn forget(&self, id: VmId, fh: u64) {
        let mut p = self.0.lock();
        if let Some(m) = p.get_mut(&id) {
            m.remove(&fh);
            if m.is_empty() {
                p.remove(&id);
            }
        }
    }
}

/// A live jail grant: the held jail keeps its namespace number unique.
struct LiveGrant {
    jail: Jail,
    init: ProcessId,
    grants: Grants,
}

/// The filesystem.
pub struct Service<E: Engine> {
    engine: E,
    config: Config,
    registry: Registry<E::Vm>,
    jails: Arc<Jails>,
    state: Mutex<State>,
    grants: Mutex<HashMap<u64, LiveGrant>>,
    store: StateStore,
    handles: Mutex<Handles<E::Vm>>,
    /// The handle that issued each VM's latest `run`.
    runners: Mutex<HashMap<VmId, u64>>,
    next_fh: AtomicU64,
    pollers: Arc<Pollers>,
    pool: Arc<FairPool>,
    timer: Arc<Timer>,
    closer: Arc<Closer>,
    handover: Arc<Handover>,
    /// Records of the VMs that outlive the daemon (worker engine only).
    vm_store: std::sync::OnceLock<VmStore>,
    /// Serialises record writes and removals.
    records: Mutex<()>,
    /// Each jailed VM's jail init, as its record names it.
    vm_jails: Mutex<HashMap<VmId, ProcessId>>,
}

impl<E: Engine> Service<E> {
    /// Load state (dropping grants whose jail is gone) and start with no VMs.
    pub fn new(
        engine: E,
        config: Config,
        store: StateStore,
        jails: Arc<Jails>,
    ) -> Result<Arc<Service<E>>, crate::state::StateError> {
        let mut state = store.load(config.group)?;
        let grants = revive_grants(&mut state, &jails);
        let closer = Closer::new();
        let handover = Arc::new(
            Handover::new(jails.clone(), closer.clone(), config.limits.clone()).map_err(
                |source| crate::state::StateError::Io {
                    path: "eventfd".into(),
                    source,
                },
            )?,
        );
        let svc = Service {
            engine,
            registry: Registry::new(config.limits.clone()),
            pool: FairPool::start(config.workers, MAX_QUEUED_PER_USER),
            config,
            jails,
            state: Mutex::new(state.clone()),
            grants: Mutex::new(grants),
            store,
            handles: Mutex::new(Handles {
                map: HashMap::new(),
                per_user: HashMap::new(),
                fds_per_user: HashMap::new(),
            }),
            runners: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            pollers: Arc::default(),
            timer: Timer::start(),
            closer,
            handover,
            vm_store: std::sync::OnceLock::new(),
            records: Mutex::new(()),
            vm_jails: Mutex::new(HashMap::new()),
        };
        if let Err(e) = svc.store.save(&state) {
            log::warn!("saving state after dropping stale grants: {e}");
        }
        Ok(Arc::new(svc))
    }

    #[cfg(test)]
    pub fn registry(&self) -> &Registry<E::Vm> {
        &self.registry
    }

    #[cfg(test)]
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Poll wakers waiting, in all.
    #[cfg(test)]
    pub fn wakers(&self) -> usize {
        self.pollers.0.lock().values().map(|m| m.len()).sum()
    }

    /// Set a jail's grants without a process in it (unit tests' fake jails).
    #[cfg(test)]
    pub fn grant_for_test(&self, jail: &Jail, grants: Grants) {
        self.grants.lock().insert(
            jail.ns(),
            LiveGrant {
                jail: jail.clone(),
                init: ProcessId { pid: 1, start: 0 },
                grants,
            },
        );
    }

    pub fn jails(&self) -> &Arc<Jails> {
        &self.jails
    }

    pub fn handover(&self) -> &Arc<Handover> {
        &self.handover
    }

    fn grants_of(&self, jail: &Jail) -> Grants {
        if jail.is_host() {
            return Grants {
                vmm: true,
                ppt: true,
            };
        }
        self.grants
            .lock()
            .get(&jail.ns())
            .map(|g| g.grants)
            .unwrap_or_default()
    }

    fn principal(&self, creds: &Creds) -> Principal {
        Principal {
            grants: self.grants_of(&creds.jail),
            creds: creds.clone(),
        }
    }

    fn static_attrs(&self, node: Node) -> NodeAttrs {
        let s = self.state.lock();
        match node {
            Node::Vmmctl => s.vmmctl,
            Node::VmmDir => s.vmm_dir,
            Node::VmmIoDir => s.vmmio_dir,
            // Anyone may connect; what a connection may do is decided at attach.
            Node::Socket => NodeAttrs {
                uid: 0,
                gid: 0,
                mode: 0o666,
            },
            _ => NodeAttrs {
                uid: 0,
                gid: 0,
                mode: 0o755,
            },
        }
    }

    /// Attributes of a node. Visibility was checked when the node was looked up.
    pub fn getattr(&self, node: Node) -> FsResult<Attr> {
        let (attrs, size) = match node {
            Node::Vm(id) => (self.registry.node(id)?, 0),
            Node::Segment(id, idx) => {
                let name = self.registry.segment_name(id, idx)?;
                let size = self.segment(id, &name)?.size;
                (self.registry.segment_node(id, &name, |_| ())?.1, size)
            }
            Node::Vmmctl => (self.static_attrs(node), VMMCTL_SIZE),
            n => (self.static_attrs(n), 0),
        };
        Ok(Attr { node, attrs, size })
    }

    fn segment(&self, id: VmId, name: &str) -> FsResult<vmm_engine::Segment> {
        self.registry
            .runtime(id)?
            .vm
            .segments()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or(FsError::NotFound)
    }

    /// Look `name` up in directory `parent` for a caller in `jail`.
    /// `socket`: whether `vmm.sock` exists yet.
    pub fn lookup(&self, jail: &Jail, parent: Node, name: &str, socket: bool) -> FsResult<Attr> {
        let node = match (parent, name) {
            (Node::Root, "vmmctl") => Node::Vmmctl,
            (Node::Root, "vmm") => Node::VmmDir,
            (Node::Root, "vmm.io") => Node::VmmIoDir,
            (Node::Root, handover::SOCKET_NAME) if socket => Node::Socket,
            (Node::VmmDir, n) => Node::Vm(self.registry.lookup(jail, n).ok_or(FsError::NotFound)?),
            (Node::VmmIoDir, n) => {
                let (vm, seg) = n.rsplit_once('.').ok_or(FsError::NotFound)?;
                let id = self.registry.lookup(jail, vm).ok_or(FsError::NotFound)?;
                self.segment(id, seg)?;
                let (idx, _) = self.registry.segment_node(id, seg, |_| ())?;
                if idx >= MAX_SEGMENTS {
                    return Err(FsError::NotFound);
                }
                Node::Segment(id, idx)
            }
            _ => return Err(FsError::NotFound),
        };
        self.getattr(node)
    }

    /// Entries of a directory (without `.` and `..`) as the caller sees them.
    pub fn readdir(&self, jail: &Jail, dir: Node, socket: bool) -> FsResult<Vec<DirEntry>> {
        let entry = |node, name: &str| DirEntry {
            node,
            name: name.to_string(),
        };
        Ok(match dir {
            Node::Root => {
                let mut v = vec![
                    entry(Node::Vmmctl, "vmmctl"),
                    entry(Node::VmmDir, "vmm"),
                    entry(Node::VmmIoDir, "vmm.io"),
                ];
                if socket {
                    v.push(entry(Node::Socket, handover::SOCKET_NAME));
                }
                v
            }
            Node::VmmDir => self
                .registry
                .list(jail)
                .iter()
                .map(|v| entry(Node::Vm(v.id), &v.name))
                .collect(),
            Node::VmmIoDir => {
                let mut out = Vec::new();
                for v in self.registry.list(jail) {
                    let Ok(rt) = self.registry.runtime(v.id) else {
                        continue;
                    };
                    for seg in rt.vm.segments() {
                        if let Ok((idx, _)) = self.registry.segment_node(v.id, &seg.name, |_| ()) {
                            if idx < MAX_SEGMENTS {
                                out.push(entry(
                                    Node::Segment(v.id, idx),
                                    &format!("{}.{}", v.name, seg.name),
                                ));
                            }
                        }
                    }
                }
                out
            }
            _ => return Err(FsError::Invalid("not a directory".into())),
        })
    }

    /// chmod/chown/chgrp, already permitted by the kernel (default_permissions).
    pub fn setattr(
        &self,
        node: Node,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> FsResult<Attr> {
        let apply = |a: &mut NodeAttrs| {
            if let Some(m) = mode {
                a.mode = (m & 0o7777) as u16;
            }
            if let Some(u) = uid {
                a.uid = u;
            }
            if let Some(g) = gid {
                a.gid = g;
            }
        };
        let changes = mode.is_some() || uid.is_some() || gid.is_some();
        match node {
            Node::Vm(id) => {
                self.registry.set_node(id, apply)?;
                self.persist(id);
            }
            Node::Segment(id, idx) => {
                let name = self.registry.segment_name(id, idx)?;
                self.registry.segment_node(id, &name, apply)?;
                // Segment nodes come back after a restart as they were left.
                self.persist(id);
            }
            Node::Root | Node::Socket => {
                if changes {
                    return Err(FsError::NotPermitted("this node is fixed".into()));
                }
            }
            n => {
                let mut s = self.state.lock();
                let mut next = s.clone();
                apply(match n {
                    Node::Vmmctl => &mut next.vmmctl,
                    Node::VmmDir => &mut next.vmm_dir,
                    _ => &mut next.vmmio_dir,
                });
                if next != *s {
                    self.store.save(&next)?;
                    *s = next;
                }
            }
        }
        self.getattr(node)
    }

    fn add_handle(&self, user: u32, privileged: bool, kind: Kinded<E::Vm>) -> FsResult<u64> {
        let mut h = self.handles.lock();
        let n = h.per_user.get(&user).copied().unwrap_or(0);
        if !privileged && n >= MAX_HANDLES_PER_USER {
            drop(h);
            log::warn!(
                "uid {user}: open refused: {n} open vmmfs handles (limit {MAX_HANDLES_PER_USER})"
            );
            return Err(FsError::TooMany(format!(
                "too many open vmmfs files for uid {user} (limit {MAX_HANDLES_PER_USER})"
            )));
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        *h.per_user.entry(user).or_default() += 1;
        h.map.insert(fh, Handle { user, kind });
        Ok(fh)
    }

    fn refused(caller: &Caller, what: &str, e: &FsError) {
        if matches!(e, FsError::NotPermitted(_) | FsError::Limit(_)) {
            log::info!(
                "{what} refused for pid {} ({:?}): {e}",
                caller.pid,
                caller.creds
            );
        }
    }

    /// Open a file. The kernel already checked the mode bits.
    pub fn open(&self, caller: &Caller, node: Node, write: bool) -> FsResult<Opened> {
        let who = self.principal(&caller.creds);
        let user = caller.creds.ruid();
        let privileged = who.privileged();
        let result = match node {
            Node::Vmmctl => policy::open_ctl(&who, write).and_then(|()| {
                let process = ProcessId::of(caller.tgid)?;
                let kind = Kinded::Ctl(CtlHandle {
                    opener: caller.creds.clone(),
                    process,
                });
                Ok(Opened {
                    fh: self.add_handle(user, privileged, kind)?,
                    backing: None,
                })
            }),
            Node::Vm(id) => self.registry.check_open(&who, id).and_then(|rt| {
                let kind = Kinded::Vm(Box::new(VmHandle {
                    id,
                    seen: rt.vm.generation(),
                    rt,
                    opener: caller.creds.clone(),
                    snapshot: None,
                    error: None,
                    fds: HashMap::new(),
                }));
                Ok(Opened {
                    fh: self.add_handle(user, privileged, kind)?,
                    backing: None,
                })
            }),
            Node::Segment(id, idx) => self.registry.check_open(&who, id).and_then(|rt| {
                // Before the memfd is looked up: a teardown either empties
                // it or has cleared the VM's segments first (the lookup
                // then fails).
                rt.serving_segments();
                let seg = self.segment(id, &self.registry.segment_name(id, idx)?)?;
                Ok(Opened {
                    fh: self.add_handle(user, privileged, Kinded::Segment)?,
                    backing: Some(seg.fd),
                })
            }),
            _ => Err(FsError::Invalid("not a file".into())),
        };
        if let Err(e) = &result {
            Self::refused(caller, &format!("open {node:?}"), e);
        }
        result
    }

    /// Route the engine's state-change notifications to pollers of `id`,
    /// and have a VM that broke down destroyed.
    fn watch(self: &Arc<Self>, id: VmId, vm: &E::Vm) {
        let svc = Arc::downgrade(self);
        vm.set_notifier(Box::new(move || {
            if let Some(svc) = svc.upgrade() {
                svc.pollers.wake(id);
                svc.check_failed(id);
            }
        }));
    }

    /// If VM `id` broke down, destroy it after [`FAILED_VM_GRACE`]. Runs on
    /// engine threads: only table lookups and a timer entry here.
    fn check_failed(self: &Arc<Self>, id: VmId) {
        let failed = self.registry.runtime(id).is_ok_and(|rt| rt.vm.failed());
        if !failed {
            return;
        }
        let svc = Arc::downgrade(self);
        self.timer.after(
            FAILED_VM_GRACE,
            Box::new(move || {
                let Some(svc) = svc.upgrade() else { return };
                if let Some((rt, owner)) = svc.registry.mark_failed(id) {
                    log::info!("destroying VM id {id}: its engine broke down");
                    svc.teardown(id, rt, None, Some(owner));
                }
            }),
        );
    }

    /// A write: a vmmctl command or a vmm/NAME command. Answered through `done`.
    pub fn write(self: &Arc<Self>, fh: u64, caller: Caller, data: &[u8], done: Done<usize>) {
        let len = data.len();
        let mut h = self.handles.lock();
        let Some(handle) = h.map.get_mut(&fh) else {
            drop(h);
            return done(Err(FsError::Invalid("unknown handle".into())));
        };
        match &mut handle.kind {
            Kinded::Ctl(_) => {
                drop(h);
                let req = vmmctl::parse_line(data);
                self.ctl_request(
                    fh,
                    &caller,
                    "vmmctl write",
                    req,
                    Box::new(move |r| done(r.map(|()| len))),
                );
            }
            Kinded::Vm(vh) => {
                vh.snapshot = None;
                let (id, rt, opener) = (vh.id, vh.rt.clone(), vh.opener.clone());
                drop(h);
                let r = policy::authority(&opener, &caller.creds, caller.pid, "vmm/NAME write")
                    .and_then(|()| {
                        std::str::from_utf8(data)
                            .map_err(|_| FsError::Invalid("command is not UTF-8".into()))
                    });
                let line = match r {
                    Ok(l) => l,
                    Err(e) => return self.vm_done(fh, Err(e), done),
                };
                if let Some(nonce) = handover::parse_attach(line) {
                    let r = nonce
                        .map_err(FsError::from)
                        .and_then(|n| self.handover.attach(&n, fh, &opener, caller.pid))
                        .map(|()| len);
                    return self.vm_done(fh, r, done);
                }
                match Command::parse(line) {
                    Ok(cmd) => self.vm_command(fh, id, rt, &opener, cmd, len, done),
                    Err(e) => self.vm_done(fh, Err(e.into()), done),
                }
            }
            Kinded::Segment => {
                drop(h);
                done(Err(FsError::Invalid(
                    "segments are written through mmap".into(),
                )))
            }
        }
    }

    /// Answer a vmm/NAME write and keep its error for the next read.
    fn vm_done(&self, fh: u64, r: FsResult<usize>, done: Done<usize>) {
        if let Some(Kinded::Vm(vh)) = self.handles.lock().map.get_mut(&fh).map(|h| &mut h.kind) {
            vh.error = r.as_ref().err().map(|e| e.to_string());
            vh.snapshot = None;
        }
        done(r)
    }

    /// Take the descriptors `cmd` names from handle `fh`, checking what an
    /// image must be. All or none.
    fn take_fds(&self, fh: u64, cmd: &Command) -> FsResult<(Labelled, Option<(ChargeKind, u64)>)> {
        let labels = cmd.descriptors();
        let mut h = self.handles.lock();
        let Handles {
            map, fds_per_user, ..
        } = &mut *h;
        let Some(Handle {
            user,
            kind: Kinded::Vm(vh),
        }) = map.get_mut(&fh)
        else {
            return Err(FsError::Gone);
        };
        if let Some(missing) = labels.iter().find(|n| !vh.fds.contains_key(n)) {
            return Err(FsError::BadFd(*missing));
        }
        let mut charge = None;
        if cmd.is_image() {
            let kind = vh.fds[&labels[0]].kind;
            let Kind::Regular { size } = kind else {
                return Err(FsError::Invalid(format!(
                    "a boot image must be a regular file, not {kind:?}"
                )));
            };
            let (what, max) = match cmd {
                Command::Bootrom(_) => (ChargeKind::Bootrom, MAX_BOOTROM),
                Command::BootVars(_) => (ChargeKind::BootVars, MAX_BOOTROM),
                Command::Kernel(_) => (ChargeKind::Kernel, MAX_KERNEL),
                _ => (ChargeKind::Initrd, u64::MAX),
            };
            if size > max {
                return Err(FsError::Invalid(format!(
                    "image of {size} bytes is larger than {max}"
                )));
            }
            charge = Some((what, size));
        }
        let mut fds = Labelled::default();
        for n in &labels {
            let r = vh.fds.remove(n).expect("checked above");
            fds.add(*n, r.fd);
        }
        dec(fds_per_user, *user, labels.len());
        Ok((fds, charge))
    }

    #[allow(clippy::too_many_arguments)]
    fn vm_command(
        self: &Arc<Self>,
        fh: u64,
        id: VmId,
        rt: Arc<Runtime<E::Vm>>,
        opener: &Creds,
        cmd: Command,
        len: usize,
        done: Done<usize>,
    ) {
        let who = self.principal(opener);
        let in_use = match (&cmd, who.privileged()) {
            (Command::Device { .. }, false) => crate::fds::in_use(),
            _ => 0,
        };
        if let Err(e) = policy::command(&who, &cmd, &self.registry.limits, in_use) {
            log::info!("vmm/NAME command refused for {opener:?}: {e}");
            return self.vm_done(fh, Err(e), done);
        }
        let (fds, image) = match self.take_fds(fh, &cmd) {
            Ok(x) => x,
            Err(e) => return self.vm_done(fh, Err(e), done),
        };
        let charge = match (&cmd, image) {
            (Command::Memory(bytes), _) => Some((ChargeKind::Ram, *bytes)),
            (_, c) => c,
        };
        let old = match charge.map(|(k, b)| (k, self.registry.charge(id, k, b))) {
            Some((k, Ok(old))) => Some((k, old)),
            Some((_, Err(e))) => {
                log::info!("vmm/NAME command refused for {opener:?}: {e}");
                self.closer.close(opener.ruid(), fds.into_inner());
                return self.vm_done(fh, Err(e), done);
            }
            None => None,
        };
        // The job owns the descriptors and the answer; if the executor
        // refuses it, both are taken back here through these shared slots.
        let fds = Arc::new(Mutex::new(Some(fds)));
        let done = Once::new(done);
        let (svc, rt2, fds2, d2) = (self.clone(), rt.clone(), fds.clone(), done.clone());
        let run = cmd == Command::Run;
        let job = Box::new(move || {
            let Some(mut fds) = fds2.lock().take() else {
                return;
            };
            let r = rt2.vm.execute(cmd, &mut fds).map_err(FsError::from);
            match &r {
                Ok(()) if run => {
                    svc.runners.lock().insert(id, fh);
                }
                Ok(()) if old.is_some() => svc.persist(id),
                Err(_) => {
                    if let Some((k, old)) = old {
                        svc.registry.uncharge(id, k, old);
                    }
                }
                _ => {}
            }
            // What the engine did not keep is closed here, on this VM's thread.
            drop(fds);
            svc.vm_done(fh, r.map(|()| len), Box::new(move |r| d2.call(r)));
        });
        if let Err(why) = rt.exec.submit(job) {
            if let Some((k, old)) = old {
                self.registry.uncharge(id, k, old);
            }
            if let Some(fds) = fds.lock().take() {
                self.closer.close(opener.ruid(), fds.into_inner());
            }
            let e = match why {
                Refused::Busy => FsError::Busy("too many commands waiting for this VM".into()),
                Refused::Closed => FsError::Gone,
            };
            self.vm_done(fh, Err(e), Box::new(move |r| done.call(r)));
        }
    }

    /// An ioctl on vmmctl: FreeBSD's VMMCTL_VM_CREATE / VMMCTL_VM_DESTROY.
    pub fn ioctl(
        self: &Arc<Self>,
        fh: u64,
        caller: Caller,
        cmd: u32,
        data: &[u8],
        done: Done<Vec<u8>>,
    ) {
        let req = vmmctl::parse_ioctl(cmd, data);
        let out = data.to_vec();
        self.ctl_request(
            fh,
            &caller,
            "vmmctl ioctl",
            req,
            Box::new(move |r| done(r.map(|()| out))),
        );
    }

    /// A vmmctl request, written or by ioctl, from `caller` on handle `fh`:
    /// with the opener's authority, or none.
    fn ctl_request(
        self: &Arc<Self>,
        fh: u64,
        caller: &Caller,
        what: &str,
        req: vmm_protocol::Result<CtlRequest>,
        done: Done<()>,
    ) {
        let ctl = match self.handles.lock().map.get(&fh).map(|h| &h.kind) {
            Some(Kinded::Ctl(c)) => Some((c.opener.clone(), c.process)),
            _ => None,
        };
        let Some((opener, process)) = ctl else {
            return done(Err(FsError::Invalid("not a vmmctl handle".into())));
        };
        match policy::authority(&opener, &caller.creds, caller.pid, what).and_then(|()| Ok(req?)) {
            Ok(req) => self.vmmctl(fh, &opener, process, req, done),
            Err(e) => done(Err(e)),
        }
    }

    fn vmmctl(
        self: &Arc<Self>,
        fh: u64,
        opener: &Creds,
        process: ProcessId,
        req: CtlRequest,
        done: Done<()>,
    ) {
        let who = self.principal(opener);
        let user = opener.ruid();
        let svc = self.clone();
        let done = Once::new(done);
        let d2 = done.clone();
        let job: Box<dyn FnOnce() + Send> = match req {
            CtlRequest::Create { name, transient } => {
                let transient = transient.then_some(Transient {
                    fh,
                    opener: process,
                });
                let deadline = Instant::now() + DESTROY_WAIT;
                Box::new(move || svc.create(who, name, transient, process, deadline, d2))
            }
            CtlRequest::Destroy { name } => Box::new(move || svc.destroy(who, name, d2)),
        };
        if self.pool.run_or_submit(user, job).is_err() {
            log::warn!(
                "uid {user}: vmmctl request refused: {MAX_QUEUED_PER_USER} requests waiting"
            );
            done.call(Err(FsError::Busy(format!(
                "{MAX_QUEUED_PER_USER} requests of uid {user} are waiting"
            ))));
        }
    }

    /// Create on a pool thread; may park until a dying VM is gone.
    /// `process`: the process that opened vmmctl.
    #[allow(clippy::too_many_arguments)]
    fn create(
        self: Arc<Self>,
        who: Principal,
        name: String,
        transient: Option<Transient>,
        process: ProcessId,
        deadline: Instant,
        done: Once<()>,
    ) {
        let svc = self.clone();
        let (who2, name2, d2) = (who.clone(), name.clone(), done.clone());
        let retry = Box::new(move |expired: bool| {
            if expired || Instant::now() >= deadline {
                log::info!("create {name2}: still being destroyed after {DESTROY_WAIT:?}");
                return d2.call(Err(FsError::Exists(name2)));
            }
            let user = who2.creds.ruid();
            let s2 = svc.clone();
            let d3 = d2.clone();
            let job = Box::new(move || s2.create(who2, name2, transient, process, deadline, d3));
            if svc.pool.submit(user, job).is_err() {
                d2.call(Err(FsError::Busy("too many requests waiting".into())));
            }
        });
        let request = policy::NewVm {
            name: &name,
            transient,
            memory: DEFAULT_MEMORY,
            fds_in_use: if who.privileged() {
                0
            } else {
                crate::fds::in_use()
            },
        };
        let created =
            self.registry
                .create(&who, &request, self.config.group, &|p| p.alive(), retry);
        match created {
            Err(e) => {
                if matches!(e, FsError::NotPermitted(_) | FsError::Limit(_)) {
                    log::info!("create {name} refused for {:?}: {e}", who.creds);
                }
                done.call(Err(e))
            }
            Ok(Created::Parked(park)) => {
                let svc = self.clone();
                self.timer.after(
                    deadline.saturating_duration_since(Instant::now()),
                    Box::new(move || {
                        if let Some(retry) = svc.registry.expire(park) {
                            retry(true);
                        }
                    }),
                );
            }
            Ok(Created::Reserved(id)) => match self.engine.create(
                &name,
                &Creator {
                    ruid: who.creds.ruid(),
                    euid: who.creds.euid(),
                    pid: process.pid,
                },
            ) {
                Ok(vm) => {
                    self.watch(id, &vm);
                    let rt = Arc::new(Runtime::new(
                        vm,
                        Executor::new(&name, MAX_QUEUED_PER_VM),
                        false,
                    ));
                    self.registry.commit(id, rt);
                    self.persist(id);
                    done.call(Ok(()))
                }
                Err(err) => {
                    log::error!("create {name}: engine: {err}");
                    self.registry.abort(id);
                    done.call(Err(err.into()))
                }
            },
        }
    }

    /// Destroy on a pool thread.
    fn destroy(self: Arc<Self>, who: Principal, name: String, done: Once<()>) {
        match self.registry.destroy(&who, &name) {
            Ok((id, rt)) => self.teardown(id, rt, Some(done), None),
            Err(e) => {
                if matches!(e, FsError::NotPermitted(_)) {
                    log::info!("destroy {name} refused for {:?}: {e}", who.creds);
                }
                done.call(Err(e))
            }
        }
    }

    /// Tear the marked VM `id` down on its executor (a VM that never ran a
    /// command holds no client descriptor: then right here, or, when called
    /// from a FUSE thread, on the pool in `queue_for`'s turn).
    fn teardown(
        self: &Arc<Self>,
        id: VmId,
        rt: Arc<Runtime<E::Vm>>,
        done: Option<Once<()>>,
        queue_for: Option<u32>,
    ) {
        // The VM stops now, even while a command of its client is stuck on
        // the client's own hung file ahead of the teardown.
        rt.vm.kill();
        let svc = self.clone();
        let rt2 = rt.clone();
        let d2 = done.clone();
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let segments = rt2.vm.segments();
            rt2.vm.destroy();
            // Only once the worker is told to end: a record whose worker
            // is gone is dropped at the next start, a worker without a
            // record would be lost.
            svc.forget(id, &rt2.vm);
            // Open vmm.io handles pass through to the memfds and keep them
            // alive: empty them so the memory is freed now and stale mappings
            // fault instead of reading a dead guest's memory.
            if rt2.segments_served() {
                for seg in segments {
                    // SAFETY: plain syscall on a descriptor we own.
                    unsafe { libc::ftruncate(seg.fd.as_raw_fd(), 0) };
                }
            }
            svc.runners.lock().remove(&id);
            svc.registry.finish(id);
            svc.pollers.wake(id);
            if let Some(d) = d2 {
                d.call(Ok(()));
            }
        });
        match (rt.exec.submit_last(job), queue_for) {
            (Some(job), Some(user)) => self.pool.submit_always(user, job),
            (Some(job), None) => job(),
            (None, _) => {
                if let Some(d) = done {
                    self.timer
                        .after(DESTROY_REPLY_WITHIN, Box::new(move || d.call(Ok(()))));
                }
            }
        }
    }

    /// A read of vmm/NAME: the status text (see [`VmHandle::snapshot`]).
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut handles = self.handles.lock();
        let vh = match handles.map.get_mut(&fh).map(|h| &mut h.kind) {
            Some(Kinded::Vm(vh)) => vh,
            Some(_) => return Err(FsError::Invalid("nothing to read".into())),
            None => return Err(FsError::Invalid("unknown handle".into())),
        };
        if offset == 0 || vh.snapshot.is_none() {
            if self.registry.runtime(vh.id).is_err() {
                return Err(FsError::Gone);
            }
            vh.seen = vh.rt.vm.generation();
            let mut text = vh
                .error
                .take()
                .map(|e| format!("error={e}\n"))
                .unwrap_or_default();
            text += &vh.rt.vm.status();
            vh.snapshot = Some((text.into_bytes(), 0));
        }
        let (text, served) = vh.snapshot.as_mut().expect("set above");
        let end = served.saturating_add(size as usize).min(text.len());
        let chunk = text[*served..end].to_vec();
        *served = end;
        if chunk.is_empty() {
            vh.snapshot = None;
        }
        Ok(chunk)
    }

    /// poll(2) on vmm/NAME: readable when the VM changed since this handle last
    /// read. Otherwise `wake` is called on the next change (one waker per
    /// handle: a new poll replaces the last).
    pub fn poll(&self, fh: u64, wake: Waker) -> FsResult<bool> {
        let handles = self.handles.lock();
        let vh = match handles.map.get(&fh).map(|h| &h.kind) {
            Some(Kinded::Vm(vh)) => vh,
            _ => return Ok(true),
        };
        if self.registry.runtime(vh.id).is_err() || vh.rt.vm.generation() != vh.seen {
            return Ok(true);
        }
        self.pollers
            .0
            .lock()
            .entry(vh.id)
            .or_default()
            .insert(fh, wake);
        // A change between the check and the registration must not be lost.
        Ok(vh.rt.vm.generation() != vh.seen)
    }

    /// The last reference to an open file is gone.
    pub fn release(self: &Arc<Self>, fh: u64) {
        let h = {
            let mut h = self.handles.lock();
            let handle = h.map.remove(&fh);
            if let Some(handle) = &handle {
                dec(&mut h.per_user, handle.user, 1);
                if let Kinded::Vm(vh) = &handle.kind {
                    dec(&mut h.fds_per_user, handle.user, vh.fds.len());
                }
            }
            handle
        };
        let Some(Handle { user, kind }) = h else {
            return;
        };
        match kind {
            Kinded::Ctl(_) => {
                for (id, rt) in self.registry.release_handle(fh) {
                    self.teardown(id, rt, None, Some(user));
                }
            }
            Kinded::Vm(vh) => {
                self.handover.release(fh);
                self.pollers.forget(vh.id, fh);
                self.closer
                    .close(user, vh.fds.into_values().map(|r| r.fd).collect());
                // The handle that started the guest stands for the bhyve
                // process that ran it: when it is gone, so is the guest, and
                // the descriptors that process handed over are let go.
                let mut runners = self.runners.lock();
                if runners.get(&vh.id) == Some(&fh) {
                    runners.remove(&vh.id);
                    drop(runners);
                    let rt = vh.rt.clone();
                    let _ = vh.rt.exec.submit(Box::new(move || rt.vm.detach()));
                }
            }
            Kinded::Segment => {}
        }
    }

    /// Grant or revoke allow.vmm / allow.vmm_ppt for the jail of process `pid`.
    pub fn set_grants(
        &self,
        pid: u32,
        f: impl FnOnce(&mut Grants),
    ) -> Result<(u64, Grants), String> {
        let jail = self
            .jails
            .of_pid(pid)
            .map_err(|e| format!("pid {pid}: {e}"))?;
        if jail.is_host() {
            return Err(
                "that process is not in a jail (it shares the host's PID namespace)".into(),
            );
        }
        let mut live = self.grants.lock();
        let entry = match live.remove(&jail.ns()) {
            Some(g) => g,
            None => LiveGrant {
                init: jails::init_of(&jail).map_err(|e| format!("pid {pid}'s jail: {e}"))?,
                jail: jail.clone(),
                grants: Grants::default(),
            },
        };
        let mut entry = entry;
        f(&mut entry.grants);
        let g = entry.grants;
        if g != Grants::default() {
            live.insert(jail.ns(), entry);
        }
        self.save_grants(&live)
            .map_err(|e| format!("saving state: {e}"))?;
        log::info!("{jail:?}: allow.vmm={} allow.vmm_ppt={}", g.vmm, g.ppt);
        Ok((jail.ns(), g))
    }

    fn save_grants(&self, live: &HashMap<u64, LiveGrant>) -> std::io::Result<()> {
        let mut s = self.state.lock();
        let mut next = s.clone();
        next.jails = live
            .values()
            .map(|g| {
                (
                    g.jail.ns(),
                    JailGrant {
                        ns: g.jail.ns(),
                        init: g.init,
                        grants: g.grants,
                    },
                )
            })
            .collect();
        if next != *s {
            self.store.save(&next)?;
            *s = next;
        }
        Ok(())
    }

    /// Drop the grants of jails whose init has exited: the namespace is dead.
    pub fn sweep_grants(&self) {
        let mut live = self.grants.lock();
        let before = live.len();
        live.retain(|ns, g| {
            let alive = g.init.alive();
            if !alive {
                log::info!("jail {ns} has ended: its grants are dropped");
            }
            alive
        });
        if live.len() != before {
            if let Err(e) = self.save_grants(&live) {
                log::error!("saving state: {e}");
            }
        }
    }

    /// Every live jail with a grant: (namespace number, grants).
    pub fn jail_grants(&self) -> Vec<(u64, Grants)> {
        self.sweep_grants();
        let mut v: Vec<(u64, Grants)> = self
            .grants
            .lock()
            .iter()
            .map(|(ns, g)| (*ns, g.grants))
            .collect();
        v.sort_by_key(|(ns, _)| *ns);
        v
    }

    /// Write the record of VM `id` (if its engine's VMs outlive the daemon).
    fn persist(&self, id: VmId) {
        let Some(store) = self.vm_store.get() else {
            return;
        };
        let _one = self.records.lock();
        let (Some(snap), Ok(rt)) = (self.registry.snapshot(id), self.registry.runtime(id)) else {
            return;
        };
        let Some(worker) = rt.vm.worker() else {
            return;
        };
        let rec = snap.rec;
        let jail = if rec.jail.is_host() {
            JailRef::Host
        } else {
            let known = self.vm_jails.lock().get(&id).copied();
            let init = known
                .or_else(|| self.grants.lock().get(&rec.jail.ns()).map(|g| g.init))
                .or_else(|| jails::init_of(&rec.jail).ok());
            let Some(init) = init else {
                log::error!(
                    "VM {}: its jail's init is unknown: no record, the VM will not be \
                     adopted after a restart",
                    rec.name
                );
                return;
            };
            self.vm_jails.lock().insert(id, init);
            JailRef::Jail {
                ns: rec.jail.ns(),
                init,
            }
        };
        let file = VmFile {
            name: rec.name,
            jail,
            owner_euid: rec.owner_euid,
            owner_ruid: rec.owner_ruid,
            node: snap.node,
            transient: rec.transient.is_some(),
            worker,
            charges: snap.charges,
            segments: snap.segments,
        };
        if let Err(e) = store.save(&file) {
            log::error!("VM {}: saving its record: {e}", file.name);
        }
    }

    /// The VM `id` is being destroyed: drop its record.
    fn forget(&self, id: VmId, vm: &E::Vm) {
        self.vm_jails.lock().remove(&id);
        if let (Some(store), Some(w)) = (self.vm_store.get(), vm.worker()) {
            let _one = self.records.lock();
            store.remove(w.pid);
        }
    }

    /// Keep records in `store` from now on, and adopt the VMs its records
    /// name (vmmfs(8) RESTART): each worker is checked and taken over, its
    /// node comes back with its owner, group and mode. A destroy-on-close
    /// VM is destroyed: its creator's vmmctl descriptor died with the old
    /// mount. Malformed records are reported and left alone. Returns the
    /// number of VMs adopted.
    pub fn adopt_all(self: &Arc<Self>, store: VmStore) -> usize {
        let store = self.vm_store.get_or_init(|| store).clone();
        let mut adopted = 0;
        for (path, rec) in store.load_all() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    log::error!("{}: ignored: {e}", path.display());
                    continue;
                }
            };
            let pid = rec.worker.pid;
            let vm = match self.engine.adopt(&rec.name, &rec.worker) {
                Ok(vm) => vm,
                Err(e) => {
                    log::warn!("VM {} (worker pid {pid}): not adopted: {e}", rec.name);
                    store.remove(pid);
                    continue;
                }
            };
            if rec.transient {
                log::info!(
                    "VM {}: destroy-on-close, and the vmmctl descriptor that created it died \
                     with the old mount: destroyed",
                    rec.name
                );
                vm.kill();
                vm.destroy();
                store.remove(pid);
                continue;
            }
            let (jail, init) = match rec.jail {
                JailRef::Host => (self.jails.host(), None),
                JailRef::Jail { ns, init } => {
                    let live = init
                        .alive()
                        .then(|| self.jails.of_pid(init.pid).ok())
                        .flatten()
                        .filter(|j| j.ns() == ns && init.alive());
                    (live.unwrap_or_else(|| Jail::orphan(ns)), Some(init))
                }
            };
            let record = policy::VmRecord {
                name: rec.name.clone(),
                jail,
                owner_euid: rec.owner_euid,
                owner_ruid: rec.owner_ruid,
                phase: policy::Phase::Alive,
                transient: None,
                memory: 0,
            };
            // Clients of the earlier daemon may still hold its segments.
            let rt = Arc::new(Runtime::new(
                vm,
                Executor::new(&rec.name, MAX_QUEUED_PER_VM),
                true,
            ));
            match self
                .registry
                .adopt(record, rec.node, rec.segments, rec.charges, rt.clone())
            {
                Ok(id) => {
                    if let Some(init) = init {
                        self.vm_jails.lock().insert(id, init);
                    }
                    self.watch(id, &rt.vm);
                    self.check_failed(id);
                    adopted += 1;
                }
                Err(e) => {
                    log::error!("VM {} (worker pid {pid}): not adopted: {e}", rec.name);
                    rt.vm.kill();
                    rt.vm.destroy();
                    store.remove(pid);
                }
            }
        }
        adopted
    }

    /// Destroy every VM (shutdown): returns once all are gone, and the
    /// engine has cleaned up after them, or `within` passed.
    pub fn shutdown(self: &Arc<Self>, within: Duration) -> bool {
        for (id, rt) in self.registry.destroy_all() {
            self.teardown(id, rt, None, None);
        }
        let t0 = Instant::now();
        while self.registry.len() > 0 {
            if t0.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.engine.settle(within.saturating_sub(t0.elapsed()))
    }
}

impl<E: Engine> Deliver for Service<E> {
    fn deliver(&self, fh: u64, fds: Vec<(i32, Received)>) -> Result<(), (FsError, Vec<OwnedFd>)> {
        let mut h = self.handles.lock();
        let Handles {
            map, fds_per_user, ..
        } = &mut *h;
        let back = |fds: Vec<(i32, Received)>| fds.into_iter().map(|(_, r)| r.fd).collect();
        let Some(Handle {
            user,
            kind: Kinded::Vm(vh),
        }) = map.get_mut(&fh)
        else {
            return Err((FsError::Gone, back(fds)));
        };
        let added = fds.iter().filter(|(n, _)| !vh.fds.contains_key(n)).count();
        let mine = fds_per_user.get(user).copied().unwrap_or(0);
        let unprivileged = *user != 0;
        if vh.fds.len() + added > MAX_FDS_PER_HANDLE
            || (unprivileged && mine + added > MAX_FDS_PER_USER)
            || (unprivileged
                && !policy::fds_available(crate::fds::in_use(), 0, &self.registry.limits))
        {
            log::warn!(
                "uid {user}: descriptors refused: {} held by the handle, {mine} by the user \
                 (limits {MAX_FDS_PER_HANDLE}, {MAX_FDS_PER_USER})",
                vh.fds.len()
            );
            return Err((
                FsError::TooMany(format!(
                    "at most {MAX_FDS_PER_HANDLE} descriptors per handle and \
                     {MAX_FDS_PER_USER} per user wait for a command"
                )),
                back(fds),
            ));
        }
        let mut replaced = Vec::new();
        for (n, r) in fds {
            if let Some(old) = vh.fds.insert(n, r) {
                replaced.push(old.fd);
            }
        }
        *fds_per_user.entry(*user).or_default() += added;
        let user = *user;
        drop(h);
        self.closer.close(user, replaced);
        Ok(())
    }
}

/// Grants from the state file whose jail still lives; the rest are dropped
/// (and the state updated by the caller).
fn revive_grants(state: &mut State, jails: &Jails) -> HashMap<u64, LiveGrant> {
    let mut live = HashMap::new();
    state.jails.retain(|ns, g| {
        let revived = (g.init.pid != 0 && g.init.alive())
            .then(|| jails.of_pid(g.init.pid).ok())
            .flatten()
            .filter(|j| j.ns() == *ns && g.init.alive());
        match revived {
            Some(jail) => {
                live.insert(
                    *ns,
                    LiveGrant {
                        jail,
                        init: g.init,
                        grants: g.grants,
                    },
                );
                true
            }
            None => {
                log::warn!(
                    "jail ns={ns}: its init process is gone (or the grant predates this \
                     vmmfs); allow.vmm dropped, grant it again if the jail still exists"
                );
                false
            }
        }
    });
    live
}
