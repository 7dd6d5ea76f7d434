//! The vmm access policy, one function per SPEC.md operation, each checking
//! in FreeBSD's order (`sys/dev/vmm/vmm_dev.c`: `vmmdev_create`,
//! `vmmdev_lookup_and_destroy`, `vmmctl_open`, `vmmdev_open`). Pure: the
//! functions look at a table of [`VmRecord`]s and decide; the registry
//! applies the decision.

use crate::creds::Creds;
use crate::error::{FsError, FsResult};
use crate::jails::{Jail, ProcessId};
use crate::state::Grants;
use std::borrow::Cow;
use std::collections::BTreeMap;
use vmm_engine::Command;

/// Identifier of a VM, never reused while the daemon runs.
pub type VmId = u64;

/// FreeBSD's message for an unprivileged non-transient create.
pub const MONITOR_MODE_MSG: &str = "An unprivileged user must run VMs in monitor mode";

/// FreeBSD's message for a create in a jail without allow.vmm.
pub const JAIL_MSG: &str = "VMs cannot be created in the current jail";

/// Life cycle of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Being built; the name is taken, the VM not yet visible.
    Creating,
    Alive,
    /// Being destroyed; invisible, but the name stays taken (and the
    /// resources counted) until it is gone.
    Destroying,
}

/// A transient (destroy-on-close) VM's binding to the vmmctl handle that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transient {
    pub fh: u64,
    /// The process that opened that handle: once it is gone, the handle's
    /// release (and so the destroy) is usually on its way.
    pub opener: ProcessId,
}

/// What the policy knows of a VM.
#[derive(Debug, Clone)]
pub struct VmRecord {
    pub name: String,
    pub jail: Jail,
    /// The creator's effective uid: the owner.
    pub owner_euid: u32,
    /// The creator's real uid: what the per-user limits count.
    pub owner_ruid: u32,
    pub phase: Phase,
    pub transient: Option<Transient>,
    /// Bytes of memory charged to the owner (guest RAM and boot images).
    pub memory: u64,
}

/// Who a request speaks for: the credentials of the handle's opener and the
/// grants of their jail.
#[derive(Debug, Clone)]
pub struct Principal {
    pub creds: Creds,
    pub grants: Grants,
}

impl Principal {
    /// PRIV_VMM_CREATE / PRIV_VMM_DESTROY: root outside any jail.
    pub fn privileged(&self) -> bool {
        self.creds.euid() == 0 && self.creds.jail.is_host()
    }
}

/// Resource limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// hw.vmm.maxvmms: VMs per real uid, root included.
    pub max_vms_per_user: usize,
    /// The daemon's descriptor limit (RLIMIT_NOFILE): unprivileged work
    /// that would leave fewer than [`ROOT_RESERVE_FDS`] free is refused.
    pub max_fds: u64,
    /// Guest memory (and boot images) per real uid.
    pub max_memory_per_user: u64,
    /// hw.vmm.maxcpu: vCPUs per VM.
    pub max_cpus: u16,
}

/// Descriptors kept for root's recovery (opening vmmctl, listing,
/// destroying), whatever users hold.
pub const ROOT_RESERVE_FDS: u64 = 1024;
/// Descriptors a new VM takes at first (KVM VM, memory, events).
pub const FDS_PER_NEW_VM: u64 = 16;
/// Descriptors a device may take (client descriptors, irqfds, ioeventfds,
/// thread events; virtio-net, the largest, needs 8).
pub const FDS_PER_DEVICE: u64 = 16;

/// Whether an unprivileged request that needs `need` more descriptors
/// leaves root's reserve intact.
pub fn fds_available(fds_in_use: u64, need: u64, limits: &Limits) -> bool {
    fds_in_use + need + ROOT_RESERVE_FDS <= limits.max_fds
}

fn capacity_message(fds_in_use: u64, limits: &Limits) -> String {
    format!(
        "the daemon is at capacity ({fds_in_use} of {} descriptors in use; the rest is \
         root's reserve)",
        limits.max_fds
    )
}

/// A create request.
#[derive(Debug, Clone)]
pub struct NewVm<'a> {
    pub name: &'a str,
    pub transient: Option<Transient>,
    /// Guest memory the new VM is charged at first.
    pub memory: u64,
    /// Descriptors the daemon has open (0 for privileged callers: not checked).
    pub fds_in_use: u64,
}

/// A decision that may have to wait for a destroy in progress.
#[derive(Debug)]
pub enum Verdict {
    Go,
    /// The obstacle is a VM being destroyed: ask again when it is gone.
    Wait,
    No(FsError),
}

/// Whether `rec` is listed for a viewer in `viewer`'s jail.
pub fn visible(rec: &VmRecord, viewer: &Jail) -> bool {
    rec.phase == Phase::Alive && (viewer.is_host() || rec.jail == *viewer)
}

/// Whether a VM named `name` in `jail` would collide with `rec`: a jail
/// collides only with its own VMs; the host, which sees all, with every VM.
fn collides(rec: &VmRecord, name: &str, jail: &Jail) -> bool {
    rec.name == name && (jail.is_host() || rec.jail == *jail)
}

/// Name of `id` as a viewer sees it. A jail sees its VMs' names. The host
/// sees every VM; a jailed VM whose name is also used by a host VM or by an
/// older VM of another jail appears as `NAME@NS` (NS: the jail's namespace
/// number). `create` keeps every display unambiguous.
pub fn display<'a, R: AsRef<VmRecord>>(
    vms: &BTreeMap<VmId, R>,
    id: VmId,
    rec: &'a VmRecord,
    host_view: bool,
) -> Cow<'a, str> {
    if !host_view || rec.jail.is_host() {
        return Cow::Borrowed(&rec.name);
    }
    let shadowed = vms.iter().any(|(oid, o)| {
        let o = o.as_ref();
        *oid != id && o.name == rec.name && (o.jail.is_host() || *oid < id)
    });
    if shadowed {
        Cow::Owned(format!("{}@{}", rec.name, rec.jail.ns()))
    } else {
        Cow::Borrowed(&rec.name)
    }
}

/// The live VM a viewer calls `name`. Two matches would be a broken
/// invariant: then nothing matches (and it is logged), never the wrong VM.
pub fn find<R: AsRef<VmRecord>>(
    vms: &BTreeMap<VmId, R>,
    viewer: &Jail,
    name: &str,
) -> Option<VmId> {
    let mut hits = vms.iter().filter(|(id, r)| {
        let r = r.as_ref();
        visible(r, viewer) && display(vms, **id, r, viewer.is_host()) == name
    });
    let first = hits.next().map(|(id, _)| *id);
    if let Some((other, _)) = hits.next() {
        log::error!("'{name}' names VMs {first:?} and {other} for {viewer:?}; refusing both");
        return None;
    }
    first
}

/// vmmctl open: jail without allow.vmm → EPERM; then read-only → EPERM.
pub fn open_ctl(who: &Principal, write: bool) -> FsResult<()> {
    if !who.grants.vmm {
        return Err(FsError::NotPermitted(JAIL_MSG.into()));
    }
    if !write {
        return Err(FsError::NotPermitted(
            "vmmctl must be opened for writing".into(),
        ));
    }
    Ok(())
}

/// vmm/NAME (and vmm.io) open: jail without allow.vmm → EPERM; a VM the
/// opener cannot see → ENOENT. Mode bits were checked by the kernel.
pub fn open_vm(who: &Principal, rec: Option<&VmRecord>) -> FsResult<()> {
    if !who.grants.vmm {
        return Err(FsError::NotPermitted(
            "VMs cannot be used in the current jail".into(),
        ));
    }
    match rec {
        Some(r) if visible(r, &who.creds.jail) => Ok(()),
        _ => Err(FsError::NotFound),
    }
}

/// `vmmdev_create`: the name → EEXIST (or wait for a destroy in progress);
/// a non-transient VM without privilege → EPERM; a jail without allow.vmm →
/// EPERM; then the limits → ENOMEM (or wait, if only dying VMs are over it).
pub fn create<R: AsRef<VmRecord>>(
    vms: &BTreeMap<VmId, R>,
    who: &Principal,
    new: &NewVm,
    limits: &Limits,
    alive: &dyn Fn(&ProcessId) -> bool,
) -> Verdict {
    let (name, transient) = (new.name, new.transient.is_some());
    let jail = &who.creds.jail;
    let mut clash = false;
    let mut wait = false;
    for r in vms.values().map(AsRef::as_ref) {
        if !collides(r, name, jail) {
            continue;
        }
        clash = true;
        // A VM on its way out does not hold the name: a destroy in progress,
        // or a transient VM whose creator has exited (the kernel sends the
        // release of its last descriptor after the process is gone).
        let dying = r.phase == Phase::Destroying
            || (r.phase == Phase::Alive && r.transient.is_some_and(|t| !alive(&t.opener)));
        if !dying {
            return Verdict::No(FsError::Exists(name.into()));
        }
        wait = true;
    }
    if !clash && would_be_ambiguous(vms, name, jail) {
        return Verdict::No(FsError::Exists(name.into()));
    }
    if wait {
        return Verdict::Wait;
    }
    if !transient && !who.privileged() {
        return Verdict::No(FsError::NotPermitted(MONITOR_MODE_MSG.into()));
    }
    if !who.grants.vmm {
        return Verdict::No(FsError::NotPermitted(JAIL_MSG.into()));
    }
    check_limits(vms, who, new.memory, limits, new.fds_in_use)
}

/// Whether a VM `name` made in `jail` would show the host a name that the
/// host already shows for another VM (`a@5` made on the host while jail 5's
/// `a` is shown as `a@5`, or the other way round).
fn would_be_ambiguous<R: AsRef<VmRecord>>(
    vms: &BTreeMap<VmId, R>,
    name: &str,
    jail: &Jail,
) -> bool {
    let new = if !jail.is_host() && vms.values().any(|r| r.as_ref().name == name) {
        format!("{name}@{}", jail.ns())
    } else {
        name.to_string()
    };
    vms.iter()
        .filter(|(_, r)| r.as_ref().phase != Phase::Destroying)
        .any(|(id, r)| display(vms, *id, r.as_ref(), true) == new)
}

fn check_limits<R: AsRef<VmRecord>>(
    vms: &BTreeMap<VmId, R>,
    who: &Principal,
    initial_memory: u64,
    limits: &Limits,
    fds_in_use: u64,
) -> Verdict {
    let ruid = who.creds.ruid();
    let mine = || {
        vms.values()
            .map(AsRef::as_ref)
            .filter(|r| r.owner_ruid == ruid)
    };
    let count = mine().count();
    let dying = mine().filter(|r| r.phase == Phase::Destroying).count();
    if count >= limits.max_vms_per_user {
        // Only because of VMs still being torn down: their destroy has
        // returned, so the user is within the limit in a moment.
        if count - dying < limits.max_vms_per_user {
            return Verdict::Wait;
        }
        return Verdict::No(FsError::Limit(format!(
            "hw.vmm.maxvmms: uid {ruid} already has {count} VMs (limit {})",
            limits.max_vms_per_user
        )));
    }
    if !who.privileged() && !fds_available(fds_in_use, FDS_PER_NEW_VM, limits) {
        return Verdict::No(FsError::Limit(capacity_message(fds_in_use, limits)));
    }
    let used: u64 = mine().map(|r| r.memory).sum();
    if used.saturating_add(initial_memory) > limits.max_memory_per_user {
        return Verdict::No(FsError::Limit(memory_message(ruid, used, limits)));
    }
    Verdict::Go
}

fn memory_message(ruid: u32, used: u64, limits: &Limits) -> String {
    format!(
        "guest memory per user: uid {ruid} uses {} MiB of {} MiB (--max-memory-per-user)",
        used >> 20,
        limits.max_memory_per_user >> 20
    )
}

/// `vmmdev_lookup_and_destroy`: a VM the caller cannot see → EINVAL (not
/// ENOENT); not the creator (same euid and same jail) and not privileged →
/// EPERM.
pub fn destroy<R: AsRef<VmRecord>>(
    vms: &BTreeMap<VmId, R>,
    who: &Principal,
    name: &str,
) -> FsResult<VmId> {
    let jail = &who.creds.jail;
    let id =
        find(vms, jail, name).ok_or_else(|| FsError::Invalid(format!("no VM named '{name}'")))?;
    let r = vms[&id].as_ref();
    let creator = r.owner_euid == who.creds.euid() && r.jail == *jail;
    if !creator && !who.privileged() {
        return Err(FsError::NotPermitted(format!(
            "VM '{name}' belongs to another user"
        )));
    }
    Ok(id)
}

/// Whether a write or ioctl from `writer` may speak for a handle opened by
/// `opener`: only with exactly the same credentials. The error is for the
/// client; the log gets the difference.
pub fn authority(opener: &Creds, writer: &Creds, pid: u32, what: &str) -> FsResult<()> {
    match opener.difference(writer) {
        None => Ok(()),
        Some(diff) => {
            log::warn!(
                "{what} from pid {pid} refused: its credentials are not those of the \
                 handle's opener ({diff}; opener {opener:?}, writer {writer:?})"
            );
            Err(FsError::NotPermitted(
                "this descriptor was opened with other credentials".into(),
            ))
        }
    }
}

/// A vmm/NAME command's own limits: vCPUs ≤ hw.vmm.maxcpu (EINVAL), PCI
/// passthrough only with allow.vmm_ppt (EPERM), a device only while the
/// daemon has descriptors beyond root's reserve (ENOMEM). Memory is charged
/// by [`charge`].
pub fn command(who: &Principal, cmd: &Command, limits: &Limits, fds_in_use: u64) -> FsResult<()> {
    match cmd {
        Command::Cpus(t) if t.cpus > limits.max_cpus => Err(FsError::Invalid(format!(
            "hw.vmm.maxcpu: {} vCPUs requested, at most {} per VM",
            t.cpus, limits.max_cpus
        ))),
        Command::Device { emulation, .. } if emulation == "passthru" && !who.grants.ppt => {
            Err(FsError::NotPermitted(
                "PCI passthrough is not allowed in the current jail (allow.vmm_ppt)".into(),
            ))
        }
        Command::Device { .. }
            if !who.privileged() && !fds_available(fds_in_use, FDS_PER_DEVICE, limits) =>
        {
            Err(FsError::Limit(capacity_message(fds_in_use, limits)))
        }
        _ => Ok(()),
    }
}

/// Charge VM `id` `bytes` instead of `old` bytes: refused (ENOMEM) if its
/// owner would go over the per-user memory limit.
pub fn charge<R: AsRef<VmRecord>>(
    vms: &BTreeMap<VmId, R>,
    id: VmId,
    old: u64,
    bytes: u64,
    limits: &Limits,
) -> FsResult<()> {
    let ruid = vms[&id].as_ref().owner_ruid;
    let used: u64 = vms
        .values()
        .map(AsRef::as_ref)
        .filter(|r| r.owner_ruid == ruid)
        .map(|r| r.memory)
        .sum();
    if used.saturating_sub(old).saturating_add(bytes) > limits.max_memory_per_user {
        return Err(FsError::Limit(memory_message(ruid, used, limits)));
    }
    Ok(())
}

impl AsRef<VmRecord> for VmRecord {
    fn as_ref(&self) -> &VmRecord {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Jail {
        Jail::fake(1, true)
    }

    fn who(uid: u32, jail: &Jail, vmm: bool) -> Principal {
        Principal {
            creds: Creds::fake(uid, uid, jail.clone()),
            grants: Grants { vmm, ppt: false },
        }
    }

    fn limits() -> Limits {
        Limits {
            max_vms_per_user: 2,
            max_fds: 2048,
            max_memory_per_user: 1 << 30,
            max_cpus: 2,
        }
    }

    fn rec(name: &str, jail: &Jail, uid: u32, phase: Phase) -> VmRecord {
        VmRecord {
            name: name.into(),
            jail: jail.clone(),
            owner_euid: uid,
            owner_ruid: uid,
            phase,
            transient: None,
            memory: 256 << 20,
        }
    }

    fn new(name: &str, transient: bool, memory: u64, fds_in_use: u64) -> NewVm<'_> {
        NewVm {
            name,
            transient: transient.then_some(Transient {
                fh: 1,
                opener: ProcessId { pid: 1, start: 0 },
            }),
            memory,
            fds_in_use,
        }
    }

    fn verdict(v: Verdict) -> String {
        match v {
            Verdict::Go => "go".into(),
            Verdict::Wait => "wait".into(),
            Verdict::No(e) => format!("errno {}", e.errno()),
        }
    }

    #[test]
    fn create_checks_in_freebsd_order() {
        let h = host();
        let j = Jail::fake(7, false);
        let mut vms = BTreeMap::new();
        vms.insert(1, rec("a", &h, 1000, Phase::Alive));
        let alive = |_: &ProcessId| true;
        let c = |w: &Principal, name: &str, t: bool, vms: &BTreeMap<u64, VmRecord>| {
            verdict(create(
                vms,
                w,
                &new(name, t, 256 << 20, 100),
                &limits(),
                &alive,
            ))
        };
        // Exists before privilege: an unprivileged non-transient create of an existing name.
        assert_eq!(c(&who(1000, &h, true), "a", false, &vms), "errno 17");
        assert_eq!(c(&who(1000, &h, true), "b", false, &vms), "errno 1");
        // Privilege before jail: a jail without allow.vmm (reachable with an
        // inherited descriptor) gets EPERM either way.
        assert_eq!(c(&who(0, &j, false), "b", true, &vms), "errno 1");
        assert_eq!(c(&who(1000, &h, true), "b", true, &vms), "go");
        vms.insert(2, rec("b", &h, 1000, Phase::Alive));
        assert_eq!(c(&who(1000, &h, true), "c", true, &vms), "errno 12");
        // Root's reserve: a user may not take the last descriptors; root may.
        let mut few = BTreeMap::new();
        few.insert(1, rec("a", &h, 1000, Phase::Alive));
        let full = |w: &Principal| {
            verdict(create(
                &few,
                w,
                &new("n", true, 0, 2048 - 1024),
                &limits(),
                &alive,
            ))
        };
        assert_eq!(full(&who(1001, &h, true)), "errno 12");
        assert_eq!(full(&who(0, &h, true)), "go");
        // Over the limit only because of a VM being destroyed: wait.
        vms.get_mut(&2).unwrap().phase = Phase::Destroying;
        assert_eq!(c(&who(1000, &h, true), "c", true, &vms), "wait");
        assert_eq!(c(&who(1000, &h, true), "b", true, &vms), "wait");
    }

    #[test]
    fn a_transient_vm_of_an_exited_creator_is_waited_for() {
        let h = host();
        let mut vms = BTreeMap::new();
        let mut r = rec("t", &h, 1000, Phase::Alive);
        r.transient = Some(Transient {
            fh: 3,
            opener: ProcessId { pid: 42, start: 1 },
        });
        vms.insert(1, r);
        let w = who(1000, &h, true);
        let gone = |_: &ProcessId| false;
        let here = |_: &ProcessId| true;
        assert_eq!(
            verdict(create(&vms, &w, &new("t", true, 0, 100), &limits(), &gone)),
            "wait"
        );
        assert_eq!(
            verdict(create(&vms, &w, &new("t", true, 0, 100), &limits(), &here)),
            "errno 17"
        );
    }

    #[test]
    fn display_names_stay_unambiguous() {
        let h = host();
        let j5 = Jail::fake(5, false);
        let j6 = Jail::fake(6, false);
        let mut vms = BTreeMap::new();
        let alive = |_: &ProcessId| true;
        let l = limits();
        vms.insert(1, rec("a", &j6, 0, Phase::Alive));
        // Jail 5's "a" would be shown to the host as "a@5".
        vms.insert(2, rec("a@5", &h, 0, Phase::Alive));
        assert_eq!(
            verdict(create(
                &vms,
                &who(0, &j5, true),
                &new("a", true, 0, 100),
                &l,
                &alive
            )),
            "errno 17"
        );
        vms.remove(&2);
        vms.insert(3, rec("a", &j5, 0, Phase::Alive));
        assert_eq!(display(&vms, 3, &vms[&3], true), "a@5");
        assert_eq!(display(&vms, 1, &vms[&1], true), "a");
        assert_eq!(display(&vms, 3, &vms[&3], false), "a");
        // The host cannot take the name jail 5's VM is shown under.
        assert_eq!(
            verdict(create(
                &vms,
                &who(0, &h, true),
                &new("a@5", false, 0, 100),
                &l,
                &alive
            )),
            "errno 17"
        );
        assert_eq!(find(&vms, &h, "a@5"), Some(3));
        assert_eq!(find(&vms, &j5, "a"), Some(3));
        assert_eq!(find(&vms, &j6, "a@5"), None);
    }

    #[test]
    fn destroy_rules() {
        let h = host();
        let j = Jail::fake(9, false);
        let mut vms = BTreeMap::new();
        vms.insert(1, rec("v", &h, 1000, Phase::Alive));
        vms.insert(2, rec("w", &j, 1000, Phase::Alive));
        let e = |r: FsResult<VmId>| r.map_err(|e| e.errno());
        assert_eq!(
            e(destroy(&vms, &who(1001, &h, true), "v")),
            Err(libc::EPERM)
        );
        assert_eq!(e(destroy(&vms, &who(1000, &h, true), "v")), Ok(1));
        assert_eq!(
            e(destroy(&vms, &who(1000, &j, true), "v")),
            Err(libc::EINVAL)
        );
        assert_eq!(
            e(destroy(&vms, &who(1000, &h, true), "w")),
            Err(libc::EPERM)
        );
        assert_eq!(e(destroy(&vms, &who(0, &h, true), "w")), Ok(2));
        assert_eq!(
            e(destroy(&vms, &who(0, &j, true), "w")),
            Err(libc::EPERM),
            "jailed root"
        );
        vms.get_mut(&1).unwrap().phase = Phase::Destroying;
        assert_eq!(e(destroy(&vms, &who(0, &h, true), "v")), Err(libc::EINVAL));
    }

    #[test]
    fn command_limits() {
        let h = host();
        let j = Jail::fake(9, false);
        let l = limits();
        let cmd = |s: &str| Command::parse(s).unwrap();
        let e = |r: FsResult<()>| r.map_err(|e| e.errno());
        assert_eq!(
            e(command(&who(0, &h, true), &cmd("cpus 3"), &l, 0)),
            Err(libc::EINVAL)
        );
        assert_eq!(e(command(&who(0, &h, true), &cmd("cpus 2"), &l, 0)), Ok(()));
        let passthru = cmd("device 5 passthru 1/0/0");
        assert_eq!(
            e(command(&who(0, &j, true), &passthru, &l, 0)),
            Err(libc::EPERM)
        );
        let mut ppt = who(0, &j, true);
        ppt.grants.ppt = true;
        assert_eq!(e(command(&ppt, &passthru, &l, 0)), Ok(()));
        let dev = cmd("device 3 virtio-rnd");
        assert_eq!(
            e(command(&who(1000, &h, true), &dev, &l, 1020)),
            Err(libc::ENOMEM)
        );
        assert_eq!(e(command(&who(0, &h, true), &dev, &l, 1020)), Ok(()));
        let mut vms = BTreeMap::new();
        vms.insert(1, rec("v", &h, 1000, Phase::Alive));
        vms.insert(2, rec("w", &h, 1000, Phase::Alive));
        assert!(charge(&vms, 1, 256 << 20, 768 << 20, &l).is_ok());
        assert_eq!(
            charge(&vms, 1, 256 << 20, (768 << 20) + 1, &l)
                .unwrap_err()
                .errno(),
            libc::ENOMEM
        );
    }
}
