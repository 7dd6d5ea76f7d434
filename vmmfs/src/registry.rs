//! The VM table. One lock, held only for table work: engine calls happen
//! outside it with the entry marked (a name being created or destroyed is
//! taken). Decisions come from [`crate::policy`]. A create that must wait for
//! a destroy in progress is parked here, with the table, so that no wake-up
//! is lost; it is retried when that VM is gone or answered at its deadline.

use crate::error::{FsError, FsResult};
use crate::jails::{Jail, ProcessId};
use crate::policy::{self, Limits, NewVm, Phase, Principal, Verdict, VmId, VmRecord};
use crate::sched::Executor;
use crate::state::NodeAttrs;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A live VM: the engine's VM and the executor that owns its client work.
pub struct Runtime<V> {
    pub vm: V,
    pub exec: Executor,
    /// Whether a memory segment of the VM may have been handed to a client
    /// (a `vmm.io` open, or an earlier daemon's): only then must its
    /// memory files be emptied at the teardown. Otherwise the dying worker
    /// holds the only other reference, and emptying would only cost the
    /// destroy the unmapping of its guest RAM (about 100 us for 256 MiB).
    segments_served: AtomicBool,
}

impl<V> Runtime<V> {
    pub fn new(vm: V, exec: Executor, segments_served: bool) -> Runtime<V> {
        Runtime {
            vm,
            exec,
            segments_served: AtomicBool::new(segments_served),
        }
    }

    /// Called by a segment open once its check passed and before it looks
    /// the memfd up: a teardown that clears the segments after the check
    /// sees the mark.
    pub fn serving_segments(&self) {
        self.segments_served.store(true, Ordering::SeqCst);
    }

    pub fn segments_served(&self) -> bool {
        self.segments_served.load(Ordering::SeqCst)
    }
}

/// What a VM's memory is charged for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeKind {
    Ram,
    Bootrom,
    Kernel,
    Initrd,
    BootVars,
}

/// A live VM as its record (vmmfs(8) RESTART) needs it.
pub struct Snapshot {
    pub rec: VmRecord,
    pub node: NodeAttrs,
    pub charges: [u64; 5],
    /// Segment nodes in order of first use (their inode numbers).
    pub segments: Vec<(String, NodeAttrs)>,
}

struct Entry<V> {
    rec: VmRecord,
    rt: Option<Arc<Runtime<V>>>,
    node: NodeAttrs,
    /// Segment nodes in order of first use: the index is part of their inode number.
    segments: Vec<(String, NodeAttrs)>,
    /// Bytes charged per kind; `rec.memory` is their sum.
    charges: [u64; 5],
}

impl<V> AsRef<VmRecord> for Entry<V> {
    fn as_ref(&self) -> &VmRecord {
        &self.rec
    }
}

/// A create waiting for a VM to go.
struct Parked {
    id: u64,
    name: String,
    ruid: u32,
    /// Called once: with `false` to try again, `true` at the deadline.
    retry: Box<dyn FnOnce(bool) + Send>,
}

struct Table<V> {
    vms: BTreeMap<VmId, Entry<V>>,
    parked: Vec<Parked>,
    next_park: u64,
}

/// Outcome of [`Registry::create`].
pub enum Created {
    /// The name is reserved for the new VM `id` (phase Creating): build it,
    /// then [`Registry::commit`] or [`Registry::abort`].
    Reserved(VmId),
    /// Waiting for a VM being destroyed; `retry` will be called.
    Parked(u64),
}

/// The table of VMs.
pub struct Registry<V> {
    t: Mutex<Table<V>>,
    next_id: AtomicU64,
    pub limits: Limits,
}

/// What the FUSE adapter lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: VmId,
    pub name: String,
}

impl<V> Registry<V> {
    pub fn new(limits: Limits) -> Registry<V> {
        Registry {
            t: Mutex::new(Table {
                vms: BTreeMap::new(),
                parked: Vec::new(),
                next_park: 0,
            }),
            next_id: AtomicU64::new(1),
            limits,
        }
    }

    /// Decide a create for `who` and reserve the name, or park `retry`.
    pub fn create(
        &self,
        who: &Principal,
        new: &NewVm,
        gid: u32,
        alive: &dyn Fn(&ProcessId) -> bool,
        retry: Box<dyn FnOnce(bool) + Send>,
    ) -> FsResult<Created> {
        let mut t = self.t.lock();
        let (name, transient, initial_memory) = (new.name, new.transient, new.memory);
        match policy::create(&t.vms, who, new, &self.limits, alive) {
            Verdict::No(e) => Err(e),
            Verdict::Wait => {
                let id = t.next_park;
                t.next_park += 1;
                t.parked.push(Parked {
                    id,
                    name: name.into(),
                    ruid: who.creds.ruid(),
                    retry,
                });
                Ok(Created::Parked(id))
            }
            Verdict::Go => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let node = NodeAttrs {
                    uid: who.creds.euid(),
                    gid,
                    mode: 0o600,
                };
                t.vms.insert(
                    id,
                    Entry {
                        rec: VmRecord {
                            name: name.into(),
                            jail: who.creds.jail.clone(),
                            owner_euid: who.creds.euid(),
                            owner_ruid: who.creds.ruid(),
                            phase: Phase::Creating,
                            transient,
                            memory: initial_memory,
                        },
                        rt: None,
                        node,
                        segments: Vec::new(),
                        charges: [initial_memory, 0, 0, 0, 0],
                    },
                );
                Ok(Created::Reserved(id))
            }
        }
    }

    /// A parked create reached its deadline: its retry, if it is still parked.
    pub fn expire(&self, park: u64) -> Option<Box<dyn FnOnce(bool) + Send>> {
        let mut t = self.t.lock();
        let i = t.parked.iter().position(|p| p.id == park)?;
        Some(t.parked.swap_remove(i).retry)
    }

    /// The VM reserved as `id` is built.
    pub fn commit(&self, id: VmId, rt: Arc<Runtime<V>>) {
        let mut t = self.t.lock();
        let e = t
            .vms
            .get_mut(&id)
            .expect("reserved entries stay until commit or abort");
        e.rt = Some(rt);
        e.rec.phase = Phase::Alive;
        log::info!(
            "created VM {} (id {id}) for uid {} ({:?}){}",
            e.rec.name,
            e.rec.owner_euid,
            e.rec.jail,
            if e.rec.transient.is_some() {
                ", destroy-on-close"
            } else {
                ""
            }
        );
    }

    /// Enter a VM an earlier daemon created (adopted after a restart), alive.
    /// Refused if its name is taken: names are unambiguous in every view.
    pub fn adopt(
        &self,
        rec: VmRecord,
        node: NodeAttrs,
        segments: Vec<(String, NodeAttrs)>,
        charges: [u64; 5],
        rt: Arc<Runtime<V>>,
    ) -> Result<VmId, String> {
        let mut t = self.t.lock();
        if t.vms.values().any(|e| e.rec.name == rec.name) {
            return Err(format!("a VM named {} exists already", rec.name));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut rec = rec;
        rec.phase = Phase::Alive;
        rec.memory = charges.iter().sum();
        log::info!(
            "adopted VM {} (id {id}) of uid {} ({:?})",
            rec.name,
            rec.owner_euid,
            rec.jail
        );
        t.vms.insert(
            id,
            Entry {
                rec,
                rt: Some(rt),
                node,
                segments,
                charges,
            },
        );
        Ok(id)
    }

    /// What a live VM's record needs: its table entry, node, charges and
    /// segment nodes.
    pub fn snapshot(&self, id: VmId) -> Option<Snapshot> {
        let t = self.t.lock();
        let e = t.vms.get(&id).filter(|e| e.rec.phase == Phase::Alive)?;
        Some(Snapshot {
            rec: e.rec.clone(),
            node: e.node,
            charges: e.charges,
            segments: e.segments.clone(),
        })
    }

    /// Building the VM reserved as `id` failed.
    pub fn abort(&self, id: VmId) {
        self.finish(id);
    }

    fn mark(e: &mut Entry<V>, id: VmId) -> (VmId, Option<Arc<Runtime<V>>>) {
        e.rec.phase = Phase::Destroying;
        (id, e.rt.clone())
    }

    /// Mark the VM `name` (as `who` sees it) for destruction.
    pub fn destroy(&self, who: &Principal, name: &str) -> FsResult<(VmId, Arc<Runtime<V>>)> {
        let mut t = self.t.lock();
        let id = policy::destroy(&t.vms, who, name)?;
        let e = t.vms.get_mut(&id).expect("found by policy");
        match Self::mark(e, id) {
            (id, Some(rt)) => Ok((id, rt)),
            _ => unreachable!("alive VMs have a runtime"),
        }
    }

    /// The vmmctl handle `fh` was released: mark its transient VMs.
    pub fn release_handle(&self, fh: u64) -> Vec<(VmId, Arc<Runtime<V>>)> {
        self.mark_where(|r| r.transient.is_some_and(|t| t.fh == fh))
    }

    /// Mark the live VM `id` (its engine broke down): its runtime and the
    /// real uid of its owner, in whose turn the teardown runs.
    pub fn mark_failed(&self, id: VmId) -> Option<(Arc<Runtime<V>>, u32)> {
        let mut t = self.t.lock();
        let e = t.vms.get_mut(&id).filter(|e| e.rec.phase == Phase::Alive)?;
        let owner = e.rec.owner_ruid;
        Self::mark(e, id).1.map(|rt| (rt, owner))
    }

    /// Mark every VM (daemon shutdown).
    pub fn destroy_all(&self) -> Vec<(VmId, Arc<Runtime<V>>)> {
        self.mark_where(|_| true)
    }

    fn mark_where(&self, f: impl Fn(&VmRecord) -> bool) -> Vec<(VmId, Arc<Runtime<V>>)> {
        let mut t = self.t.lock();
        t.vms
            .iter_mut()
            .filter(|(_, e)| e.rec.phase == Phase::Alive && f(&e.rec))
            .filter_map(|(id, e)| match Self::mark(e, *id) {
                (id, Some(rt)) => Some((id, rt)),
                _ => None,
            })
            .collect()
    }

    /// The VM `id` is gone (torn down, or never built): free its name and
    /// retry the creates that waited for it.
    pub fn finish(&self, id: VmId) {
        let retries: Vec<Box<dyn FnOnce(bool) + Send>> = {
            let mut t = self.t.lock();
            let Some(e) = t.vms.remove(&id) else {
                return;
            };
            if e.rec.phase != Phase::Creating {
                log::info!("destroyed VM {} (id {id})", e.rec.name);
            }
            let (name, ruid) = (e.rec.name, e.rec.owner_ruid);
            let (go, stay): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut t.parked)
                .into_iter()
                .partition(|p| p.name == name || p.ruid == ruid);
            t.parked = stay;
            go.into_iter().map(|p| p.retry).collect()
        };
        for r in retries {
            r(false);
        }
    }

    /// The runtime of a live VM.
    pub fn runtime(&self, id: VmId) -> FsResult<Arc<Runtime<V>>> {
        let t = self.t.lock();
        match t.vms.get(&id) {
            Some(e) if e.rec.phase == Phase::Alive => e.rt.clone().ok_or(FsError::Gone),
            _ => Err(FsError::Gone),
        }
    }

    /// Whether VM `id` may be opened by `who` (policy::open_vm).
    pub fn check_open(&self, who: &Principal, id: VmId) -> FsResult<Arc<Runtime<V>>> {
        let t = self.t.lock();
        let e = t.vms.get(&id);
        policy::open_vm(who, e.map(|e| &e.rec))?;
        e.and_then(|e| e.rt.clone()).ok_or(FsError::NotFound)
    }

    /// The live VM a viewer in `jail` calls `name`.
    pub fn lookup(&self, jail: &Jail, name: &str) -> Option<VmId> {
        policy::find(&self.t.lock().vms, jail, name)
    }

    /// Every VM visible to a viewer in `jail`, with the names it sees.
    pub fn list(&self, jail: &Jail) -> Vec<Listed> {
        let t = self.t.lock();
        t.vms
            .iter()
            .filter(|(_, e)| policy::visible(&e.rec, jail))
            .map(|(id, e)| Listed {
                id: *id,
                name: policy::display(&t.vms, *id, &e.rec, jail.is_host()).into_owned(),
            })
            .collect()
    }

    /// Charge VM `id` `bytes` of memory for `kind` (replacing what `kind`
    /// was charged); returns the previous charge, for [`Registry::uncharge`].
    pub fn charge(&self, id: VmId, kind: ChargeKind, bytes: u64) -> FsResult<u64> {
        let mut t = self.t.lock();
        let old = t.vms.get(&id).ok_or(FsError::Gone)?.charges[kind as usize];
        policy::charge(&t.vms, id, old, bytes, &self.limits)?;
        let e = t.vms.get_mut(&id).expect("checked above");
        e.charges[kind as usize] = bytes;
        e.rec.memory = e.charges.iter().sum();
        Ok(old)
    }

    /// Undo a [`Registry::charge`] whose command failed.
    pub fn uncharge(&self, id: VmId, kind: ChargeKind, old: u64) {
        if let Some(e) = self.t.lock().vms.get_mut(&id) {
            e.charges[kind as usize] = old;
            e.rec.memory = e.charges.iter().sum();
        }
    }

    /// Attributes of the VM node.
    pub fn node(&self, id: VmId) -> FsResult<NodeAttrs> {
        self.with_alive(id, |e| e.node)
    }

    fn with_alive<T>(&self, id: VmId, f: impl FnOnce(&mut Entry<V>) -> T) -> FsResult<T> {
        let mut t = self.t.lock();
        t.vms
            .get_mut(&id)
            .filter(|e| e.rec.phase == Phase::Alive)
            .map(f)
            .ok_or(FsError::NotFound)
    }

    /// Change the VM node's attributes (chmod/chown, already permitted by the kernel).
    pub fn set_node(&self, id: VmId, f: impl FnOnce(&mut NodeAttrs)) -> FsResult<NodeAttrs> {
        self.with_alive(id, |e| {
            f(&mut e.node);
            e.node
        })
    }

    /// Index and attributes of segment `seg` of VM `id`, after `f` (the node is
    /// made on first use from the VM's initial ownership: creator, group, 0600).
    pub fn segment_node(
        &self,
        id: VmId,
        seg: &str,
        f: impl FnOnce(&mut NodeAttrs),
    ) -> FsResult<(usize, NodeAttrs)> {
        self.with_alive(id, |e| {
            let idx = match e.segments.iter().position(|(n, _)| n == seg) {
                Some(i) => i,
                None => {
                    let initial = NodeAttrs {
                        uid: e.rec.owner_euid,
                        gid: e.node.gid,
                        mode: 0o600,
                    };
                    e.segments.push((seg.to_string(), initial));
                    e.segments.len() - 1
                }
            };
            f(&mut e.segments[idx].1);
            (idx, e.segments[idx].1)
        })
    }

    /// Name of segment node `idx` of VM `id`.
    pub fn segment_name(&self, id: VmId, idx: usize) -> FsResult<String> {
        self.with_alive(id, |e| e.segments.get(idx).map(|(n, _)| n.clone()))?
            .ok_or(FsError::NotFound)
    }

    /// Number of VMs in any phase.
    pub fn len(&self) -> usize {
        self.t.lock().vms.len()
    }
}
