//! The VM table and the vmm access policy: who may create, destroy and see
//! which VM. Plain Rust, unit-tested without a mount.
//!
//! One lock guards the table. Engine calls that take time (creating and
//! destroying KVM VMs) run outside it, with the entry marked so that other
//! requests see a consistent picture: a name being created or destroyed is
//! taken; `create` of a name being destroyed waits for the destroy to finish.

use crate::creds::{Creds, JailId};
use crate::error::{FsError, FsResult};
use crate::state::NodeAttrs;
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_engine::Vm;

/// How long `create` waits for a same-named VM's destroy to finish.
const DESTROY_WAIT: Duration = Duration::from_secs(5);

/// FreeBSD's message for an unprivileged non-transient create.
pub const MONITOR_MODE_MSG: &str = "An unprivileged user must run VMs in monitor mode";

/// Identifier of a VM, never reused while the daemon runs.
pub type VmId = u64;

/// Life cycle of a table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The engine VM is being built; the name is taken, the VM not yet visible.
    Creating,
    Alive,
    /// Being destroyed; the name is taken until it is gone.
    Destroying,
}

struct Entry {
    name: String,
    jail: JailId,
    creator: Creds,
    /// File handle of the vmmctl open that created a transient VM.
    transient_fh: Option<u64>,
    phase: Phase,
    engine: Option<Arc<Vm>>,
    node: NodeAttrs,
    /// Segment nodes in order of first use: the index is part of their inode number.
    segments: Vec<(String, NodeAttrs)>,
}

/// A VM as a caller sees it.
#[derive(Debug, Clone)]
pub struct VmView {
    pub id: VmId,
    /// Name as listed for the viewer (see [`Registry::list`]).
    pub display: String,
}

/// What the policy needs to know about the caller's jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub jail: JailId,
    pub host: bool,
}

/// The table of VMs.
pub struct Registry {
    table: Mutex<BTreeMap<VmId, Entry>>,
    changed: Condvar,
    next_id: AtomicU64,
    host: JailId,
    max_per_user: usize,
}

impl Registry {
    pub fn new(host: JailId, max_per_user: usize) -> Registry {
        Registry {
            table: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            host,
            max_per_user,
        }
    }

    /// The host's PID namespace.
    pub fn host(&self) -> JailId {
        self.host
    }

    /// The scope of a caller.
    pub fn scope(&self, jail: JailId) -> Scope {
        Scope {
            jail,
            host: jail == self.host,
        }
    }

    /// PRIV_VMM_CREATE / PRIV_VMM_DESTROY: root outside any jail.
    pub fn privileged(&self, c: &Creds) -> bool {
        c.euid == 0 && c.jail == self.host
    }

    /// Create a VM named `name` for `c`, owned by `c.euid` with group `gid`.
    /// `transient_fh`: destroy it when that vmmctl handle is released.
    pub fn create(
        &self,
        c: &Creds,
        name: &str,
        gid: u32,
        transient_fh: Option<u64>,
    ) -> FsResult<(VmId, Arc<Vm>)> {
        if transient_fh.is_none() && !self.privileged(c) {
            log::warn!(
                "create {name} refused for uid {} (pid {}): {MONITOR_MODE_MSG}",
                c.euid,
                c.pid
            );
            return Err(FsError::NotPermitted(MONITOR_MODE_MSG.into()));
        }
        let scope = self.scope(c.jail);
        let deadline = Instant::now() + DESTROY_WAIT;
        let mut t = self.table.lock();
        loop {
            let clash = t
                .values()
                .filter(|e| e.name == name && (scope.host || e.jail == c.jail))
                .map(|e| e.phase);
            let phases: Vec<Phase> = clash.collect();
            if phases.is_empty() {
                break;
            }
            // Wait only while every clash is a destroy in progress.
            if phases.iter().all(|p| *p == Phase::Destroying)
                && !self.changed.wait_until(&mut t, deadline).timed_out()
            {
                continue;
            }
            return Err(FsError::Exists(name.into()));
        }
        let count = t.values().filter(|e| e.creator.ruid == c.ruid).count();
        if count >= self.max_per_user {
            return Err(FsError::Limit(self.max_per_user));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let node = NodeAttrs {
            uid: c.euid,
            gid,
            mode: 0o600,
        };
        t.insert(
            id,
            Entry {
                name: name.into(),
                jail: c.jail,
                creator: *c,
                transient_fh,
                phase: Phase::Creating,
                engine: None,
                node,
                segments: Vec::new(),
            },
        );
        drop(t);
        let built = Vm::create(name);
        let mut t = self.table.lock();
        match built {
            Ok(vm) => {
                let vm = Arc::new(vm);
                let e = t
                    .get_mut(&id)
                    .expect("creating entries are only removed here");
                e.engine = Some(vm.clone());
                e.phase = Phase::Alive;
                log::info!(
                    "created VM {name} (id {id}) for uid {} jail {}{}",
                    c.euid,
                    c.jail.0,
                    if transient_fh.is_some() {
                        ", destroy-on-close"
                    } else {
                        ""
                    }
                );
                Ok((id, vm))
            }
            Err(err) => {
                t.remove(&id);
                self.changed.notify_all();
                log::error!("create {name}: engine: {err}");
                Err(err.into())
            }
        }
    }

    /// Display name of `e` for a viewer in `scope`: its name, except that the
    /// host, which sees every jail's VMs, sees a jailed VM whose name is also
    /// used by a host VM or an older VM of another jail as `NAME@JAIL`.
    fn display(&self, t: &BTreeMap<VmId, Entry>, id: VmId, e: &Entry, scope: Scope) -> String {
        if !scope.host || e.jail == self.host {
            return e.name.clone();
        }
        let shadowed = t
            .iter()
            .any(|(oid, o)| *oid != id && o.name == e.name && (o.jail == self.host || *oid < id));
        if shadowed {
            format!("{}@{}", e.name, e.jail.0)
        } else {
            e.name.clone()
        }
    }

    fn visible(&self, e: &Entry, scope: Scope) -> bool {
        e.phase != Phase::Creating && (scope.host || e.jail == scope.jail)
    }

    /// Find a VM visible in `scope` by its display name.
    fn find(&self, t: &BTreeMap<VmId, Entry>, scope: Scope, name: &str) -> Option<VmId> {
        t.iter()
            .filter(|(_, e)| self.visible(e, scope) && e.phase == Phase::Alive)
            .find(|(id, e)| self.display(t, **id, e, scope) == name)
            .map(|(id, _)| *id)
    }

    /// Destroy the VM `name` as seen by `c`.
    pub fn destroy(&self, c: &Creds, name: &str) -> FsResult<()> {
        let scope = self.scope(c.jail);
        let mut t = self.table.lock();
        let id = self
            .find(&t, scope, name)
            .ok_or_else(|| FsError::Invalid(format!("no VM named '{name}'")))?;
        let e = t.get_mut(&id).expect("found above");
        let creator = e.creator.euid == c.euid && e.jail == c.jail;
        if !creator && !self.privileged(c) {
            return Err(FsError::NotPermitted(format!(
                "VM '{name}' belongs to another user"
            )));
        }
        e.phase = Phase::Destroying;
        drop(t);
        self.finish_destroy(id);
        Ok(())
    }

    /// The vmmctl handle `fh` was released: destroy its transient VMs.
    pub fn release_handle(&self, fh: u64) {
        let ids: Vec<VmId> = {
            let mut t = self.table.lock();
            t.iter_mut()
                .filter(|(_, e)| e.transient_fh == Some(fh) && e.phase == Phase::Alive)
                .map(|(id, e)| {
                    e.phase = Phase::Destroying;
                    *id
                })
                .collect()
        };
        for id in ids {
            self.finish_destroy(id);
        }
    }

    /// Destroy every VM (daemon shutdown).
    pub fn destroy_all(&self) {
        let ids: Vec<VmId> = {
            let mut t = self.table.lock();
            t.iter_mut()
                .filter(|(_, e)| e.phase == Phase::Alive)
                .map(|(id, e)| {
                    e.phase = Phase::Destroying;
                    *id
                })
                .collect()
        };
        for id in ids {
            self.finish_destroy(id);
        }
    }

    fn finish_destroy(&self, id: VmId) {
        let engine = self.table.lock().get(&id).and_then(|e| e.engine.clone());
        if let Some(vm) = engine {
            let segments = vm.segments();
            vm.destroy();
            // Open vmm.io handles pass through to the memfds and keep them
            // alive: empty them so the memory is freed now and stale mappings
            // fault instead of reading a dead guest's memory.
            for seg in segments {
                // SAFETY: plain syscall on a descriptor we own.
                unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&*seg.fd), 0) };
            }
        }
        let mut t = self.table.lock();
        if let Some(e) = t.remove(&id) {
            log::info!("destroyed VM {} (id {id})", e.name);
        }
        self.changed.notify_all();
    }

    /// Look up a VM by display name for a viewer.
    pub fn lookup(&self, scope: Scope, name: &str) -> Option<VmView> {
        let t = self.table.lock();
        let id = self.find(&t, scope, name)?;
        Some(VmView {
            id,
            display: name.into(),
        })
    }

    /// Every VM visible to a viewer.
    pub fn list(&self, scope: Scope) -> Vec<VmView> {
        let t = self.table.lock();
        t.iter()
            .filter(|(_, e)| self.visible(e, scope) && e.phase == Phase::Alive)
            .map(|(id, e)| VmView {
                id: *id,
                display: self.display(&t, *id, e, scope),
            })
            .collect()
    }

    /// Whether `id` is alive and visible in `scope`.
    pub fn is_visible(&self, scope: Scope, id: VmId) -> bool {
        let t = self.table.lock();
        t.get(&id)
            .is_some_and(|e| e.phase == Phase::Alive && self.visible(e, scope))
    }

    /// The engine VM of a live VM.
    pub fn engine(&self, id: VmId) -> FsResult<Arc<Vm>> {
        let t = self.table.lock();
        match t.get(&id) {
            Some(Entry {
                phase: Phase::Alive,
                engine: Some(vm),
                ..
            }) => Ok(vm.clone()),
            _ => Err(FsError::Gone),
        }
    }

    /// Attributes of the VM node.
    pub fn node(&self, id: VmId) -> FsResult<NodeAttrs> {
        let t = self.table.lock();
        t.get(&id)
            .filter(|e| e.phase == Phase::Alive)
            .map(|e| e.node)
            .ok_or(FsError::NotFound)
    }

    /// Change the VM node's attributes (chmod/chown, already permitted by the kernel).
    pub fn set_node(&self, id: VmId, f: impl FnOnce(&mut NodeAttrs)) -> FsResult<NodeAttrs> {
        let mut t = self.table.lock();
        let e = t
            .get_mut(&id)
            .filter(|e| e.phase == Phase::Alive)
            .ok_or(FsError::NotFound)?;
        f(&mut e.node);
        Ok(e.node)
    }

    /// Index and attributes of segment `seg` of VM `id`, after `f` (the node is
    /// made on first use from the VM's initial ownership: creator, group, 0600).
    pub fn segment_node(
        &self,
        id: VmId,
        seg: &str,
        f: impl FnOnce(&mut NodeAttrs),
    ) -> FsResult<(usize, NodeAttrs)> {
        let mut t = self.table.lock();
        let e = t
            .get_mut(&id)
            .filter(|e| e.phase == Phase::Alive)
            .ok_or(FsError::NotFound)?;
        let idx = match e.segments.iter().position(|(n, _)| n == seg) {
            Some(i) => i,
            None => {
                let initial = NodeAttrs {
                    uid: e.creator.euid,
                    gid: e.node.gid,
                    mode: 0o600,
                };
                e.segments.push((seg.to_string(), initial));
                e.segments.len() - 1
            }
        };
        f(&mut e.segments[idx].1);
        Ok((idx, e.segments[idx].1))
    }

    /// Name of segment node `idx` of VM `id`.
    pub fn segment_name(&self, id: VmId, idx: usize) -> FsResult<String> {
        let t = self.table.lock();
        let e = t
            .get(&id)
            .filter(|e| e.phase == Phase::Alive)
            .ok_or(FsError::NotFound)?;
        e.segments
            .get(idx)
            .map(|(n, _)| n.clone())
            .ok_or(FsError::NotFound)
    }

    /// Number of VMs (any phase).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: JailId = JailId(1);
    const JAIL_A: JailId = JailId(2);
    const JAIL_B: JailId = JailId(3);

    fn who(euid: u32, jail: JailId) -> Creds {
        Creds {
            pid: 1,
            ruid: euid,
            euid,
            jail,
        }
    }

    fn reg() -> Registry {
        Registry::new(HOST, 3)
    }

    fn errno<T>(r: FsResult<T>) -> i32 {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.errno(),
        }
    }

    #[test]
    fn unprivileged_must_use_monitor_mode() {
        let r = reg();
        assert_eq!(errno(r.create(&who(1000, HOST), "a", 0, None)), libc::EPERM);
        assert_eq!(
            errno(r.create(&who(0, JAIL_A), "a", 0, None)),
            libc::EPERM,
            "jailed root has no privilege"
        );
        assert!(r.create(&who(0, HOST), "a", 0, None).is_ok());
        assert!(r.create(&who(1000, HOST), "b", 0, Some(7)).is_ok());
    }

    #[test]
    fn exists_limit_and_destroy_rules() {
        let r = reg();
        let u = who(1000, HOST);
        r.create(&u, "a", 5, Some(1)).unwrap();
        assert_eq!(errno(r.create(&u, "a", 5, Some(1))), libc::EEXIST);
        r.create(&u, "b", 5, Some(1)).unwrap();
        r.create(&u, "c", 5, Some(2)).unwrap();
        assert_eq!(errno(r.create(&u, "d", 5, Some(1))), libc::ENOMEM);
        assert!(
            r.create(&who(1001, HOST), "d", 5, Some(3)).is_ok(),
            "limit is per user"
        );
        assert_eq!(errno(r.destroy(&who(1001, HOST), "a")), libc::EPERM);
        assert_eq!(errno(r.destroy(&u, "zzz")), libc::EINVAL);
        r.destroy(&u, "a").unwrap();
        assert_eq!(errno(r.destroy(&u, "a")), libc::EINVAL);
        r.destroy(&who(0, HOST), "d").unwrap();
        let b = r.lookup(r.scope(HOST), "b").unwrap().id;
        assert_eq!(
            r.node(b).unwrap(),
            NodeAttrs {
                uid: 1000,
                gid: 5,
                mode: 0o600
            }
        );
        r.release_handle(1);
        assert!(r.lookup(r.scope(HOST), "b").is_none());
        assert!(r.lookup(r.scope(HOST), "c").is_some());
        r.release_handle(2);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn jails_see_only_their_own() {
        let r = reg();
        let (id_host, _) = r.create(&who(0, HOST), "x", 0, None).unwrap();
        let (id_a, _) = r.create(&who(0, JAIL_A), "x", 0, Some(1)).unwrap();
        r.create(&who(0, JAIL_B), "x", 0, Some(2)).unwrap();
        assert_eq!(
            errno(r.create(&who(0, JAIL_A), "x", 0, Some(3))),
            libc::EEXIST
        );
        assert_eq!(r.lookup(r.scope(JAIL_A), "x").unwrap().id, id_a);
        assert_eq!(r.list(r.scope(JAIL_A)).len(), 1);
        assert!(!r.is_visible(r.scope(JAIL_A), id_host));
        let host_names: Vec<String> = r
            .list(r.scope(HOST))
            .into_iter()
            .map(|v| v.display)
            .collect();
        assert_eq!(
            host_names,
            vec!["x".to_string(), "x@2".into(), "x@3".into()]
        );
        assert_eq!(r.lookup(r.scope(HOST), "x@2").unwrap().id, id_a);
        assert_eq!(errno(r.create(&who(0, HOST), "x", 0, None)), libc::EEXIST);
        // A jail cannot destroy what it cannot see; root on the host can destroy anything.
        r.destroy(&who(0, JAIL_A), "x").unwrap();
        assert!(
            r.lookup(r.scope(HOST), "x").is_some(),
            "host VM survived the jail's destroy"
        );
        assert_eq!(errno(r.destroy(&who(0, JAIL_A), "x")), libc::EINVAL);
        r.destroy(&who(0, HOST), "x@3").unwrap();
        r.destroy(&who(0, HOST), "x").unwrap();
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn jailed_creator_needs_same_jail() {
        let r = reg();
        r.create(&who(1000, HOST), "v", 0, Some(1)).unwrap();
        assert_eq!(
            errno(r.destroy(&who(1000, JAIL_A), "v")),
            libc::EINVAL,
            "invisible from the jail"
        );
        r.create(&who(1000, JAIL_A), "w", 0, Some(2)).unwrap();
        assert_eq!(
            errno(r.destroy(&who(1000, HOST), "w")),
            libc::EPERM,
            "same uid, other jail"
        );
    }

    #[test]
    fn create_waits_for_a_destroy_in_progress() {
        let r = Arc::new(reg());
        let u = who(0, HOST);
        r.create(&u, "a", 0, None).unwrap();
        {
            let mut t = r.table.lock();
            t.values_mut().next().unwrap().phase = Phase::Destroying;
        }
        let r2 = r.clone();
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let id = *r2.table.lock().keys().next().unwrap();
            r2.finish_destroy(id);
        });
        let t0 = Instant::now();
        r.create(&u, "a", 0, None).unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(90));
        finisher.join().unwrap();
    }

    #[test]
    fn concurrent_users_keep_names_unique() {
        let r = Arc::new(Registry::new(HOST, 1000));
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let me = who(0, HOST);
                    for i in 0..40 {
                        let name = format!("n{}", (i + w) % 5);
                        match r.create(&me, &name, 0, None) {
                            Ok(_) | Err(FsError::Exists(_)) => {}
                            Err(e) => panic!("create: {e}"),
                        }
                        match r.destroy(&me, &name) {
                            Ok(()) | Err(FsError::Invalid(_)) => {}
                            Err(e) => panic!("destroy: {e}"),
                        }
                        let names: Vec<String> = r
                            .list(r.scope(HOST))
                            .into_iter()
                            .map(|v| v.display)
                            .collect();
                        let mut unique = names.clone();
                        unique.sort();
                        unique.dedup();
                        assert_eq!(names.len(), unique.len(), "{names:?}");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        r.destroy_all();
        assert_eq!(r.len(), 0);
    }
}
