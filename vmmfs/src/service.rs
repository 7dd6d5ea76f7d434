//! The filesystem's behaviour, independent of FUSE: nodes, handles and the
//! vmmctl and vmm/NAME protocols. The fuser adapter (fs.rs) only converts
//! types and replies.

use crate::creds::{Creds, JailId};
use crate::error::{FsError, FsResult};
use crate::fdpass::ClientFds;
use crate::nodes::{Node, MAX_SEGMENTS};
use crate::registry::{Registry, Scope, VmId};
use crate::state::{Grants, NodeAttrs, State, StateStore};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmm_engine::{Command, Vm};
use vmm_protocol::vmmctl::{self, CtlRequest};

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

/// Open flags the policy looks at.
#[derive(Debug, Clone, Copy)]
pub struct OpenMode {
    pub write: bool,
}

impl OpenMode {
    pub fn from_flags(flags: i32) -> OpenMode {
        OpenMode {
            write: flags & libc::O_ACCMODE != libc::O_RDONLY,
        }
    }
}

/// Who sent a request, as FUSE reports it.
#[derive(Debug, Clone, Copy)]
pub struct Requester {
    /// Thread id, in the daemon's PID namespace.
    pub tid: u32,
    pub fsuid: u32,
}

impl Requester {
    /// Credentials of the requesting process now: like FreeBSD, vmmctl
    /// commands are judged by the caller's credentials at the time of the
    /// command (a descriptor inherited into a jail is used with the jail's).
    fn creds(&self) -> FsResult<Creds> {
        Creds::of_request(self.tid, self.fsuid)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH).into())
    }
}

enum Handle {
    /// vmmctl. Only its release uses what the open recorded: the handle itself.
    Ctl,
    Vm(VmHandle),
    Segment,
}

struct VmHandle {
    id: VmId,
    vm: Arc<Vm>,
    /// Engine generation this handle last read: poll is ready when it moved.
    seen: u64,
    /// Status text being read, and how much of it was served. Reads at offset 0
    /// start a fresh one; other reads continue it (the kernel's file offset
    /// also moves with writes, so it is not used); once it is exhausted (read
    /// returned 0) or after a write, the next read starts afresh.
    snapshot: Option<(Vec<u8>, usize)>,
    /// Message of the last failed command, reported by the next read.
    error: Option<String>,
}

type Waker = Box<dyn FnOnce() + Send>;

/// Pending poll wake-ups, per VM.
#[derive(Default)]
struct Pollers(Mutex<HashMap<VmId, Vec<Waker>>>);

impl Pollers {
    fn wake(&self, id: VmId) {
        let wakers = self.0.lock().remove(&id).unwrap_or_default();
        for w in wakers {
            w();
        }
    }
}

/// Daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Group of vmmctl on first start and of every VM node.
    pub group: u32,
    pub max_vms_per_user: usize,
}

/// The filesystem.
pub struct Service {
    config: Config,
    registry: Registry,
    state: Mutex<State>,
    store: StateStore,
    handles: Mutex<HashMap<u64, Handle>>,
    /// The handle that issued each VM's latest `run`.
    runners: Mutex<HashMap<VmId, u64>>,
    next_fh: AtomicU64,
    pollers: Arc<Pollers>,
}

impl Service {
    /// Load state and start with no VMs.
    pub fn new(
        config: Config,
        store: StateStore,
        host: JailId,
    ) -> Result<Service, crate::state::StateError> {
        let state = store.load(config.group)?;
        Ok(Service {
            registry: Registry::new(host, config.max_vms_per_user),
            config,
            state: Mutex::new(state),
            store,
            handles: Mutex::new(HashMap::new()),
            runners: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            pollers: Arc::default(),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn scope(&self, jail: JailId) -> Scope {
        self.registry.scope(jail)
    }

    fn grants(&self, jail: JailId) -> Grants {
        if jail == self.registry.host() {
            return Grants {
                vmm: true,
                ppt: true,
            };
        }
        self.state
            .lock()
            .jails
            .get(&jail)
            .copied()
            .unwrap_or_default()
    }

    fn static_attrs(&self, node: Node) -> NodeAttrs {
        let s = self.state.lock();
        match node {
            Node::Vmmctl => s.vmmctl,
            Node::VmmDir => s.vmm_dir,
            Node::VmmIoDir => s.vmmio_dir,
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
            n => (self.static_attrs(n), 0),
        };
        Ok(Attr { node, attrs, size })
    }

    fn segment(&self, id: VmId, name: &str) -> FsResult<vmm_engine::Segment> {
        self.registry
            .engine(id)?
            .segments()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or(FsError::NotFound)
    }

    /// Look `name` up in directory `parent` for a caller in `jail`.
    pub fn lookup(&self, jail: JailId, parent: Node, name: &str) -> FsResult<Attr> {
        let scope = self.scope(jail);
        let node = match (parent, name) {
            (Node::Root, "vmmctl") => Node::Vmmctl,
            (Node::Root, "vmm") => Node::VmmDir,
            (Node::Root, "vmm.io") => Node::VmmIoDir,
            (Node::VmmDir, n) => {
                Node::Vm(self.registry.lookup(scope, n).ok_or(FsError::NotFound)?.id)
            }
            (Node::VmmIoDir, n) => {
                let (vm, seg) = n.rsplit_once('.').ok_or(FsError::NotFound)?;
                let id = self.registry.lookup(scope, vm).ok_or(FsError::NotFound)?.id;
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
    pub fn readdir(&self, jail: JailId, dir: Node) -> FsResult<Vec<DirEntry>> {
        let scope = self.scope(jail);
        let entry = |node, name: &str| DirEntry {
            node,
            name: name.to_string(),
        };
        Ok(match dir {
            Node::Root => vec![
                entry(Node::Vmmctl, "vmmctl"),
                entry(Node::VmmDir, "vmm"),
                entry(Node::VmmIoDir, "vmm.io"),
            ],
            Node::VmmDir => self
                .registry
                .list(scope)
                .iter()
                .map(|v| entry(Node::Vm(v.id), &v.display))
                .collect(),
            Node::VmmIoDir => {
                let mut out = Vec::new();
                for v in self.registry.list(scope) {
                    let Ok(vm) = self.registry.engine(v.id) else {
                        continue;
                    };
                    for seg in vm.segments() {
                        if let Ok((idx, _)) = self.registry.segment_node(v.id, &seg.name, |_| ()) {
                            if idx < MAX_SEGMENTS {
                                out.push(entry(
                                    Node::Segment(v.id, idx),
                                    &format!("{}.{}", v.display, seg.name),
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
        match node {
            Node::Vm(id) => {
                self.registry.set_node(id, apply)?;
            }
            Node::Segment(id, idx) => {
                let name = self.registry.segment_name(id, idx)?;
                self.registry.segment_node(id, &name, apply)?;
            }
            Node::Root => {
                if mode.is_some() || uid.is_some() || gid.is_some() {
                    return Err(FsError::NotPermitted("the root of vmmfs is fixed".into()));
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

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, h);
        fh
    }

    fn jail_check(&self, creds: &Creds, what: &str) -> FsResult<()> {
        if self.grants(creds.jail).vmm {
            return Ok(());
        }
        log::info!(
            "{what} refused for pid {}: jail {} lacks allow.vmm",
            creds.pid,
            creds.jail.0
        );
        Err(FsError::NotPermitted(
            "VMs cannot be used in the current jail".into(),
        ))
    }

    /// Open a file. The kernel already checked the mode bits.
    pub fn open(&self, creds: Creds, node: Node, mode: OpenMode) -> FsResult<Opened> {
        match node {
            Node::Vmmctl => {
                self.jail_check(&creds, "open vmmctl")?;
                if !mode.write {
                    return Err(FsError::NotPermitted(
                        "vmmctl must be opened for writing".into(),
                    ));
                }
                Ok(Opened {
                    fh: self.add_handle(Handle::Ctl),
                    backing: None,
                })
            }
            Node::Vm(id) => {
                self.jail_check(&creds, "open vmm/NAME")?;
                if !self.registry.is_visible(self.scope(creds.jail), id) {
                    return Err(FsError::NotFound);
                }
                // Its notifier was set when it was created (see vmmctl()).
                let vm = self.registry.engine(id)?;
                let h = VmHandle {
                    id,
                    seen: vm.generation(),
                    vm,
                    snapshot: None,
                    error: None,
                };
                Ok(Opened {
                    fh: self.add_handle(Handle::Vm(h)),
                    backing: None,
                })
            }
            Node::Segment(id, idx) => {
                self.jail_check(&creds, "open vmm.io/NAME.SEG")?;
                if !self.registry.is_visible(self.scope(creds.jail), id) {
                    return Err(FsError::NotFound);
                }
                let seg = self.segment(id, &self.registry.segment_name(id, idx)?)?;
                Ok(Opened {
                    fh: self.add_handle(Handle::Segment),
                    backing: Some(seg.fd),
                })
            }
            _ => Err(FsError::Invalid("not a file".into())),
        }
    }

    /// Route the engine's state-change notifications to pollers of `id`.
    fn watch(&self, id: VmId, vm: &Vm) {
        let pollers = Arc::downgrade(&self.pollers);
        vm.set_notifier(Box::new(move || {
            if let Some(p) = pollers.upgrade() {
                p.wake(id);
            }
        }));
    }

    /// A write: a vmmctl command or a vmm/NAME command.
    pub fn write(&self, fh: u64, who: Requester, data: &[u8]) -> FsResult<usize> {
        let mut handles = self.handles.lock();
        match handles.get_mut(&fh) {
            Some(Handle::Ctl) => {
                drop(handles);
                self.vmmctl(fh, &who.creds()?, vmmctl::parse_line(data)?)?;
                Ok(data.len())
            }
            Some(Handle::Vm(h)) => {
                let (vm, id) = (h.vm.clone(), h.id);
                drop(handles);
                let result = std::str::from_utf8(data)
                    .map_err(|_| FsError::Invalid("command is not UTF-8".into()))
                    .and_then(|line| Ok(Command::parse(line)?))
                    .and_then(|cmd| {
                        let run = cmd == Command::Run;
                        vm.execute(cmd, &mut ClientFds::new(who.tid))?;
                        if run {
                            self.runners.lock().insert(id, fh);
                        }
                        Ok(())
                    });
                if let Some(Handle::Vm(h)) = self.handles.lock().get_mut(&fh) {
                    h.error = result.as_ref().err().map(|e| e.to_string());
                    h.snapshot = None;
                }
                result.map(|()| data.len())
            }
            Some(Handle::Segment) => {
                Err(FsError::Invalid("segments are written through mmap".into()))
            }
            None => Err(FsError::Invalid("unknown handle".into())),
        }
    }

    /// An ioctl on vmmctl: FreeBSD's VMMCTL_VM_CREATE / VMMCTL_VM_DESTROY.
    pub fn ioctl(&self, fh: u64, who: Requester, cmd: u32, data: &[u8]) -> FsResult<Vec<u8>> {
        if !matches!(self.handles.lock().get(&fh), Some(Handle::Ctl)) {
            return Err(FsError::Invalid("ioctl on a node that takes none".into()));
        }
        let req = vmmctl::parse_ioctl(cmd, data)?;
        self.vmmctl(fh, &who.creds()?, req)?;
        Ok(data.to_vec())
    }

    fn vmmctl(&self, fh: u64, creds: &Creds, req: CtlRequest) -> FsResult<()> {
        match req {
            CtlRequest::Create { name, transient } => {
                self.jail_check(creds, "create")?;
                let (id, vm) = self.registry.create(
                    creds,
                    &name,
                    self.config.group,
                    transient.then_some(fh),
                )?;
                self.watch(id, &vm);
                Ok(())
            }
            // As FreeBSD: no allow.vmm check here; a jail finds only its own VMs.
            CtlRequest::Destroy { name } => self.registry.destroy(creds, &name),
        }
    }

    /// A read of vmm/NAME: the status text (see [`VmHandle::snapshot`]).
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut handles = self.handles.lock();
        let h = match handles.get_mut(&fh) {
            Some(Handle::Vm(h)) => h,
            Some(_) => return Err(FsError::Invalid("nothing to read".into())),
            None => return Err(FsError::Invalid("unknown handle".into())),
        };
        if offset == 0 || h.snapshot.is_none() {
            if self.registry.engine(h.id).is_err() {
                return Err(FsError::Gone);
            }
            h.seen = h.vm.generation();
            let mut text = h
                .error
                .take()
                .map(|e| format!("error={e}\n"))
                .unwrap_or_default();
            text += &h.vm.status();
            h.snapshot = Some((text.into_bytes(), 0));
        }
        let (text, served) = h.snapshot.as_mut().expect("set above");
        let end = served.saturating_add(size as usize).min(text.len());
        let chunk = text[*served..end].to_vec();
        *served = end;
        if chunk.is_empty() {
            h.snapshot = None;
        }
        Ok(chunk)
    }

    /// poll(2) on vmm/NAME: readable when the VM changed since this handle last
    /// read. Otherwise `wake` is called on the next change.
    pub fn poll(&self, fh: u64, wake: Waker) -> FsResult<bool> {
        let handles = self.handles.lock();
        let h = match handles.get(&fh) {
            Some(Handle::Vm(h)) => h,
            _ => return Ok(true),
        };
        if self.registry.engine(h.id).is_err() || h.vm.generation() != h.seen {
            return Ok(true);
        }
        self.pollers.0.lock().entry(h.id).or_default().push(wake);
        // A change between the check and the registration must not be lost.
        if h.vm.generation() != h.seen {
            drop(handles);
            return Ok(true);
        }
        Ok(false)
    }

    /// The last reference to an open file is gone.
    pub fn release(&self, fh: u64) {
        let h = self.handles.lock().remove(&fh);
        match h {
            Some(Handle::Ctl) => self.registry.release_handle(fh),
            Some(Handle::Vm(h)) => {
                // The handle that started the guest stands for the bhyve
                // process that ran it: when it is gone, so is the guest, and
                // the descriptors that process handed over are let go.
                let mut runners = self.runners.lock();
                if runners.get(&h.id) == Some(&fh) {
                    runners.remove(&h.id);
                    drop(runners);
                    h.vm.detach();
                }
            }
            _ => {}
        }
    }

    /// Grant or revoke allow.vmm / allow.vmm_ppt for a PID namespace; persisted.
    pub fn set_grants(&self, jail: JailId, f: impl FnOnce(&mut Grants)) -> std::io::Result<Grants> {
        let mut s = self.state.lock();
        let mut next = s.clone();
        let g = next.jails.entry(jail).or_default();
        f(g);
        let g = *g;
        if g == Grants::default() {
            next.jails.remove(&jail);
        }
        self.store.save(&next)?;
        *s = next;
        Ok(g)
    }

    /// Every jail with a grant.
    pub fn jails(&self) -> Vec<(JailId, Grants)> {
        self.state
            .lock()
            .jails
            .iter()
            .map(|(j, g)| (*j, *g))
            .collect()
    }

    /// Destroy every VM (shutdown).
    pub fn shutdown(&self) {
        self.registry.destroy_all();
    }
}
