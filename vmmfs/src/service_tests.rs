//! The service over the fake engine: handle semantics, authority, the
//! executors' isolation, and random sequences against a reference model of
//! SPEC.md (no /dev/kvm, no mount).

use crate::creds::{Caller, Creds};
use crate::engine::fake::{FakeEngine, FakeVm};
use crate::error::FsResult;
use crate::handover::Deliver;
use crate::jails::{Jail, Jails};
use crate::nodes::Node;
use crate::policy::Limits;
use crate::received::{Kind, Received};
use crate::service::{Config, Done, Service, DESTROY_REPLY_WITHIN, FAILED_VM_GRACE};
use crate::state::{Grants, StateStore};
use proptest::prelude::*;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST: u64 = 1;

fn host() -> Jail {
    Jail::fake(HOST, true)
}

struct Fixture {
    svc: Arc<Service<FakeEngine>>,
    dir: std::path::PathBuf,
    jails: Vec<Jail>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(max_vms: usize) -> Fixture {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmmfs-svc-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let config = Config {
        group: 5,
        limits: Limits {
            max_vms_per_user: max_vms,
            max_fds: 1 << 20,
            max_memory_per_user: 4 << 30,
            max_cpus: 4,
        },
        workers: 2,
    };
    let jails = Arc::new(Jails::fake(host()));
    let svc = Service::new(FakeEngine::default(), config, StateStore::new(&dir), jails).unwrap();
    Fixture {
        svc,
        dir,
        jails: vec![host(), Jail::fake(2, false), Jail::fake(3, false)],
    }
}

fn caller(uid: u32, jail: &Jail) -> Caller {
    let me = std::process::id();
    Caller {
        pid: me,
        tgid: me,
        creds: Creds::fake(uid, uid, jail.clone()),
    }
}

/// Call an asynchronous operation and wait for its answer.
fn call<T: Send + 'static>(f: impl FnOnce(Done<T>)) -> FsResult<T> {
    let (tx, rx) = mpsc::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the operation never answered")
}

fn errno<T>(r: FsResult<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}

impl Fixture {
    fn open_ctl(&self, c: &Caller) -> FsResult<u64> {
        self.svc.open(c, Node::Vmmctl, true).map(|o| o.fh)
    }

    fn write(&self, fh: u64, c: &Caller, text: &str) -> FsResult<usize> {
        let svc = self.svc.clone();
        let (c, text) = (c.clone(), text.to_string());
        call(move |done| svc.write(fh, c, text.as_bytes(), done))
    }

    fn open_vm(&self, c: &Caller, name: &str) -> FsResult<u64> {
        let id = self
            .svc
            .registry()
            .lookup(&c.creds.jail, name)
            .ok_or(crate::error::FsError::NotFound)?;
        self.svc.open(c, Node::Vm(id), true).map(|o| o.fh)
    }

    fn fake_vm(&self, name: &str) -> Arc<FakeVm> {
        self.svc
            .engine()
            .made
            .lock()
            .iter()
            .rev()
            .find(|v| v.name == name)
            .cloned()
            .expect("made by the engine")
    }

    fn wait_vms(&self, n: usize) -> bool {
        let end = Instant::now() + Duration::from_secs(2);
        while self.svc.registry().len() != n {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

fn null() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

#[test]
fn writes_from_other_credentials_carry_no_authority() {
    let f = fixture(4);
    let member = caller(1000, &f.jails[0]);
    let fh = f.open_ctl(&member).unwrap();
    // A set-uid program holding the member's descriptor: effective uid 0.
    let mut setuid = member.clone();
    setuid.creds.uid[1] = 0;
    setuid.creds.uid[2] = 0;
    assert_eq!(errno(f.write(fh, &setuid, "create p")), libc::EPERM);
    let mut grouped = member.clone();
    grouped.creds.groups = Arc::from(vec![0]);
    assert_eq!(
        errno(f.write(fh, &grouped, "create p destroy-on-close")),
        libc::EPERM
    );
    let mut jailed = member.clone();
    jailed.creds.jail = f.jails[1].clone();
    assert_eq!(
        errno(f.write(fh, &jailed, "create p destroy-on-close")),
        libc::EPERM
    );
    assert_eq!(f.svc.registry().len(), 0, "nothing was created");
    assert_eq!(errno(f.write(fh, &member, "create p destroy-on-close")), 0);
    f.svc.release(fh);
    assert!(f.wait_vms(0), "destroyed with its handle");
}

#[test]
fn a_revoked_jail_keeps_its_vms_but_cannot_open_them() {
    let f = fixture(4);
    let jail = f.jails[1].clone();
    let jroot = caller(0, &jail);
    assert_eq!(errno(f.open_ctl(&jroot)), libc::EPERM, "no allow.vmm yet");
    f.svc.grant_for_test(
        &jail,
        Grants {
            vmm: true,
            ppt: false,
        },
    );
    let ctl = f.open_ctl(&jroot).unwrap();
    assert_eq!(
        errno(f.write(ctl, &jroot, "create j")),
        libc::EPERM,
        "jailed root: no privilege"
    );
    f.write(ctl, &jroot, "create j destroy-on-close").unwrap();
    assert_eq!(errno(f.open_vm(&jroot, "j")), 0);
    f.svc.grant_for_test(&jail, Grants::default());
    assert_eq!(errno(f.open_vm(&jroot, "j")), libc::EPERM);
    assert_eq!(
        errno(f.open_vm(&caller(0, &f.jails[2]), "j")),
        libc::ENOENT,
        "other jails never see it"
    );
    assert_eq!(
        errno(f.open_vm(&caller(0, &f.jails[0]), "j")),
        0,
        "the host does"
    );
    f.svc.release(ctl);
    assert!(f.wait_vms(0));
}

#[test]
fn descriptors_are_taken_all_or_none() {
    let f = fixture(4);
    let root = caller(0, &f.jails[0]);
    let ctl = f.open_ctl(&root).unwrap();
    f.write(ctl, &root, "create d").unwrap();
    let vm = f.open_vm(&root, "d").unwrap();
    let reg = |fd| Received {
        fd,
        kind: Kind::Regular { size: 4096 },
    };
    f.svc.deliver(vm, vec![(5, reg(null()))]).unwrap();
    assert_eq!(errno(f.write(vm, &root, "com1 5 6")), libc::EBADF);
    assert_eq!(errno(f.write(vm, &root, "com1 5 5")), 0, "5 is still there");
    assert_eq!(f.fake_vm("d").fds.lock().len(), 1);
    assert_eq!(
        errno(f.write(vm, &root, "bootrom 5")),
        libc::EBADF,
        "used up"
    );
    let pipe = Received {
        fd: null(),
        kind: Kind::Pipe,
    };
    f.svc.deliver(vm, vec![(7, pipe)]).unwrap();
    assert_eq!(
        errno(f.write(vm, &root, "kernel 7")),
        libc::EINVAL,
        "images are regular files"
    );
    let many: Vec<(i32, Received)> = (10..27).map(|n| (n, reg(null()))).collect();
    let (e, back) = f.svc.deliver(vm, many).unwrap_err();
    assert_eq!(
        (e.errno(), back.len()),
        (libc::EMFILE, 17),
        "all handed back"
    );
    f.svc.release(vm);
    f.write(ctl, &root, "destroy d").unwrap();
}

#[test]
fn a_stuck_vm_blocks_only_itself() {
    let f = fixture(8);
    let root = caller(0, &f.jails[0]);
    let ctl = f.open_ctl(&root).unwrap();
    for n in ["s", "t"] {
        f.write(ctl, &root, &format!("create {n}")).unwrap();
    }
    let (s, t) = (
        f.open_vm(&root, "s").unwrap(),
        f.open_vm(&root, "t").unwrap(),
    );
    f.fake_vm("s").set_stuck(true);
    // A command on s waits on s's executor; nobody else does.
    let (tx, stuck_reply) = mpsc::channel();
    f.svc.write(
        s,
        root.clone(),
        b"memory 64M",
        Box::new(move |r| {
            let _ = tx.send(r.is_ok());
        }),
    );
    assert!(stuck_reply
        .recv_timeout(Duration::from_millis(100))
        .is_err());
    let t0 = Instant::now();
    assert_eq!(errno(f.write(t, &root, "memory 64M")), 0);
    f.write(ctl, &root, "create u").unwrap();
    f.write(ctl, &root, "destroy u").unwrap();
    f.write(ctl, &root, "destroy s").unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "other work waited on the stuck VM: {:?}",
        t0.elapsed()
    );
    assert!(
        f.svc.registry().lookup(&root.creds.jail, "s").is_none(),
        "s is gone for clients"
    );
    // Its name is still taken: a create waits for the teardown, and gets it.
    let svc = f.svc.clone();
    let r2 = root.clone();
    let waiter =
        std::thread::spawn(move || call(move |done| svc.write(ctl, r2, b"create s", done)));
    std::thread::sleep(DESTROY_REPLY_WITHIN);
    f.fake_vm("s").set_stuck(false);
    assert_eq!(
        errno(waiter.join().unwrap()),
        0,
        "created once the old s was torn down"
    );
    assert!(stuck_reply.recv_timeout(Duration::from_secs(2)).is_ok());
    for h in [s, t] {
        f.svc.release(h);
    }
    for n in ["s", "t"] {
        f.write(ctl, &root, &format!("destroy {n}")).unwrap();
    }
}

#[test]
fn a_vm_that_breaks_down_is_destroyed_alone_after_its_client_could_read_why() {
    let f = fixture(8);
    let root = caller(0, &f.jails[0]);
    let ctl = f.open_ctl(&root).unwrap();
    for n in ["dies", "lives"] {
        f.write(ctl, &root, &format!("create {n}")).unwrap();
    }
    let h = f.open_vm(&root, "dies").unwrap();
    f.fake_vm("dies").fail();
    // Still there for its client during the grace period...
    assert!(f.svc.read(h, 0, 4096).is_ok());
    assert!(f.svc.registry().lookup(&root.creds.jail, "dies").is_some());
    // ...then destroyed; the other VM stays.
    let end = Instant::now() + FAILED_VM_GRACE + Duration::from_secs(2);
    while f.svc.registry().lookup(&root.creds.jail, "dies").is_some() {
        assert!(Instant::now() < end, "the broken VM was not destroyed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(f.wait_vms(1));
    assert!(f
        .fake_vm("dies")
        .destroyed
        .load(std::sync::atomic::Ordering::Acquire));
    assert!(f.svc.registry().lookup(&root.creds.jail, "lives").is_some());
    assert!(!f
        .fake_vm("lives")
        .destroyed
        .load(std::sync::atomic::Ordering::Acquire));
    assert_eq!(errno(f.svc.read(h, 0, 4096)), libc::ENXIO);
    f.svc.release(h);
    f.write(ctl, &root, "destroy lives").unwrap();
}

#[test]
fn a_create_waiting_for_a_stuck_destroy_gives_up_with_eexist() {
    let f = fixture(8);
    let root = caller(0, &f.jails[0]);
    let ctl = f.open_ctl(&root).unwrap();
    f.write(ctl, &root, "create w").unwrap();
    let vm = f.open_vm(&root, "w").unwrap();
    f.write(vm, &root, "memory 64M").unwrap();
    f.fake_vm("w").set_stuck(true);
    f.write(ctl, &root, "destroy w").unwrap();
    let t0 = Instant::now();
    assert_eq!(errno(f.write(ctl, &root, "create w")), libc::EEXIST);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    f.fake_vm("w").set_stuck(false);
    assert!(f.wait_vms(0));
}

#[test]
fn poll_keeps_one_waker_per_handle() {
    let f = fixture(4);
    let root = caller(0, &f.jails[0]);
    let ctl = f.open_ctl(&root).unwrap();
    f.write(ctl, &root, "create p").unwrap();
    let vm = f.open_vm(&root, "p").unwrap();
    let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..1000 {
        let w = woken.clone();
        let ready = f
            .svc
            .poll(
                vm,
                Box::new(move || {
                    w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }),
            )
            .unwrap();
        assert!(!ready);
    }
    assert_eq!(f.svc.wakers(), 1);
    f.write(vm, &root, "memory 64M").unwrap();
    assert_eq!(woken.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(f.svc.wakers(), 0);
    f.svc.release(vm);
    f.write(ctl, &root, "destroy p").unwrap();
}

// ---------------------------------------------------------------- the model

/// SPEC.md, as plainly as it reads.
#[derive(Default, Debug)]
struct Model {
    /// (name, jail ns, owner uid, transient: creating handle, mode)
    vms: Vec<(String, u64, u32, Option<usize>, u32)>,
    /// Jails with allow.vmm.
    allowed: Vec<u64>,
}

impl Model {
    fn privileged(uid: u32, ns: u64) -> bool {
        uid == 0 && ns == HOST
    }

    fn may(&self, ns: u64) -> bool {
        ns == HOST || self.allowed.contains(&ns)
    }

    fn create(
        &mut self,
        uid: u32,
        ns: u64,
        name: &str,
        transient: Option<usize>,
        max: usize,
    ) -> i32 {
        let clash = self
            .vms
            .iter()
            .any(|v| v.0 == name && (ns == HOST || v.1 == ns));
        let shown = if ns != HOST && self.vms.iter().any(|v| v.0 == name) {
            format!("{name}@{ns}")
        } else {
            name.to_string()
        };
        if clash || self.view(HOST).contains(&shown) {
            return libc::EEXIST;
        }
        if transient.is_none() && !Self::privileged(uid, ns) {
            return libc::EPERM;
        }
        if !self.may(ns) {
            return libc::EPERM;
        }
        if self.vms.iter().filter(|v| v.2 == uid).count() >= max {
            return libc::ENOMEM;
        }
        self.vms.push((name.into(), ns, uid, transient, 0o600));
        0
    }

    fn destroy(&mut self, uid: u32, ns: u64, name: &str) -> i32 {
        let view = self.view(ns);
        let Some(i) = view.iter().position(|n| n == name) else {
            return libc::EINVAL;
        };
        let idx = self.visible(ns)[i];
        let v = &self.vms[idx];
        if !(Self::privileged(uid, ns) || v.2 == uid && v.1 == ns) {
            return libc::EPERM;
        }
        self.vms.remove(idx);
        0
    }

    fn visible(&self, ns: u64) -> Vec<usize> {
        (0..self.vms.len())
            .filter(|i| ns == HOST || self.vms[*i].1 == ns)
            .collect()
    }

    /// vmm/NAME open(O_RDWR) by `uid` in `ns`: the kernel's lookup and
    /// permission check (group vmm has no member here), then the daemon's.
    fn open_vm(&self, uid: u32, ns: u64, name: &str) -> i32 {
        let Some(i) = self.view(ns).iter().position(|n| n == name) else {
            return libc::ENOENT;
        };
        let v = &self.vms[self.visible(ns)[i]];
        let bits = if uid == v.2 { v.4 >> 6 } else { v.4 };
        if uid != 0 && bits & 0o6 != 0o6 {
            return libc::EACCES;
        }
        if !self.may(ns) {
            return libc::EPERM;
        }
        0
    }

    /// Names as a viewer in `ns` sees them, in creation order.
    fn view(&self, ns: u64) -> Vec<String> {
        self.visible(ns)
            .into_iter()
            .map(|i| {
                let v = &self.vms[i];
                let shadowed = ns == HOST
                    && v.1 != HOST
                    && self
                        .vms
                        .iter()
                        .enumerate()
                        .any(|(j, o)| j != i && o.0 == v.0 && (o.1 == HOST || j < i));
                if shadowed {
                    format!("{}@{}", v.0, v.1)
                } else {
                    v.0.clone()
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Open {
        who: usize,
        jail: usize,
    },
    Create {
        handle: usize,
        name: usize,
        transient: bool,
    },
    Destroy {
        handle: usize,
        name: usize,
    },
    Close {
        handle: usize,
    },
    Allow {
        jail: usize,
        on: bool,
    },
    Foreign {
        handle: usize,
        who: usize,
    },
    OpenVm {
        who: usize,
        jail: usize,
        name: usize,
    },
    /// Root on the host changes a VM node's mode.
    Chmod {
        name: usize,
        mode: u32,
    },
}

/// What the kernel checks before a FUSE open (default_permissions): the
/// mode bits the daemon reports, root exempt.
fn dac(uid: u32, gid: u32, a: &crate::state::NodeAttrs) -> bool {
    let bits = if uid == a.uid {
        a.mode >> 6
    } else if gid == a.gid {
        a.mode >> 3
    } else {
        a.mode
    };
    uid == 0 || u32::from(bits) & 0o6 == 0o6
}

const USERS: [u32; 3] = [0, 1000, 1001];
const NAMES: [&str; 4] = ["a", "b", "a@2", "b@3"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..3usize, 0..3usize).prop_map(|(who, jail)| Op::Open { who, jail }),
        4 => (0..6usize, 0..4usize, any::<bool>())
            .prop_map(|(handle, name, transient)| Op::Create { handle, name, transient }),
        2 => (0..6usize, 0..4usize).prop_map(|(handle, name)| Op::Destroy { handle, name }),
        1 => (0..6usize).prop_map(|handle| Op::Close { handle }),
        1 => (1..3usize, any::<bool>()).prop_map(|(jail, on)| Op::Allow { jail, on }),
        1 => (0..6usize, 0..3usize).prop_map(|(handle, who)| Op::Foreign { handle, who }),
        2 => (0..3usize, 0..3usize, 0..4usize).prop_map(|(who, jail, name)| Op::OpenVm { who, jail, name }),
        1 => (0..4usize, prop::sample::select(vec![0o600u32, 0o660, 0o666]))
            .prop_map(|(name, mode)| Op::Chmod { name, mode }),
    ]
}

fn check_sequence(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let f = fixture(2);
    let mut m = Model::default();
    // Open handles: (fh, who, jail), by index; closed ones are None.
    let mut handles: Vec<Option<(u64, usize, usize)>> = Vec::new();
    for op in ops {
        match op {
            Op::Open { who, jail } => {
                let c = caller(USERS[who], &f.jails[jail]);
                let ns = f.jails[jail].ns();
                let want = if m.may(ns) { 0 } else { libc::EPERM };
                match f.open_ctl(&c) {
                    Ok(fh) => {
                        prop_assert_eq!(0, want, "open {:?}", c.creds);
                        handles.push(Some((fh, who, jail)));
                    }
                    Err(e) => prop_assert_eq!(e.errno(), want, "open {:?}", c.creds),
                }
            }
            Op::Create {
                handle,
                name,
                transient,
            } => {
                let Some(Some((fh, who, jail))) = handles.get(handle).cloned() else {
                    continue;
                };
                let c = caller(USERS[who], &f.jails[jail]);
                let line = format!(
                    "create {}{}",
                    NAMES[name],
                    if transient { " destroy-on-close" } else { "" }
                );
                let got = errno(f.write(fh, &c, &line));
                let want = m.create(
                    c.creds.euid(),
                    f.jails[jail].ns(),
                    NAMES[name],
                    transient.then_some(handle),
                    2,
                );
                prop_assert_eq!(got, want, "{} by {:?}", line, c.creds);
            }
            Op::Destroy { handle, name } => {
                let Some(Some((fh, who, jail))) = handles.get(handle).cloned() else {
                    continue;
                };
                let c = caller(USERS[who], &f.jails[jail]);
                let got = errno(f.write(fh, &c, &format!("destroy {}", NAMES[name])));
                let want = m.destroy(c.creds.euid(), f.jails[jail].ns(), NAMES[name]);
                prop_assert_eq!(got, want, "destroy {} by {:?}", NAMES[name], c.creds);
            }
            Op::Close { handle } => {
                let Some(Some((fh, _, _))) = handles.get(handle).cloned() else {
                    continue;
                };
                handles[handle] = None;
                f.svc.release(fh);
                m.vms.retain(|v| v.3 != Some(handle));
                prop_assert!(f.wait_vms(m.vms.len()), "transient VMs of a closed handle");
            }
            Op::Allow { jail, on } => {
                let ns = f.jails[jail].ns();
                f.svc.grant_for_test(
                    &f.jails[jail],
                    Grants {
                        vmm: on,
                        ppt: false,
                    },
                );
                m.allowed.retain(|n| *n != ns);
                if on {
                    m.allowed.push(ns);
                }
            }
            Op::OpenVm { who, jail, name } => {
                let c = caller(USERS[who], &f.jails[jail]);
                let got = match f.svc.registry().lookup(&f.jails[jail], NAMES[name]) {
                    None => libc::ENOENT,
                    Some(id) => {
                        let a = f.svc.getattr(Node::Vm(id)).unwrap().attrs;
                        if !dac(USERS[who], USERS[who], &a) {
                            libc::EACCES
                        } else {
                            match f.svc.open(&c, Node::Vm(id), true) {
                                Ok(o) => {
                                    f.svc.release(o.fh);
                                    0
                                }
                                Err(e) => e.errno(),
                            }
                        }
                    }
                };
                let want = m.open_vm(USERS[who], f.jails[jail].ns(), NAMES[name]);
                prop_assert_eq!(got, want, "open vmm/{} by {:?}", NAMES[name], c.creds);
            }
            Op::Chmod { name, mode } => {
                let host = &f.jails[0];
                if let Some(id) = f.svc.registry().lookup(host, NAMES[name]) {
                    f.svc.setattr(Node::Vm(id), Some(mode), None, None).unwrap();
                }
                let view = m.view(HOST);
                if let Some(i) = view.iter().position(|n| n == NAMES[name]) {
                    let idx = m.visible(HOST)[i];
                    m.vms[idx].4 = mode;
                }
            }
            Op::Foreign { handle, who } => {
                let Some(Some((fh, owner, jail))) = handles.get(handle).cloned() else {
                    continue;
                };
                if who == owner {
                    continue;
                }
                let c = caller(USERS[who], &f.jails[jail]);
                prop_assert_eq!(errno(f.write(fh, &c, "destroy a")), libc::EPERM);
            }
        }
        for (j, jail) in f.jails.iter().enumerate() {
            let mut got: Vec<String> = f
                .svc
                .registry()
                .list(jail)
                .into_iter()
                .map(|l| l.name)
                .collect();
            let mut want = m.view(jail.ns());
            got.sort();
            want.sort();
            prop_assert_eq!(got, want, "listing of jail {}", j);
        }
    }
    for (fh, _, _) in handles.into_iter().flatten() {
        f.svc.release(fh);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_follow_the_spec(ops in proptest::collection::vec(op(), 1..60)) {
        check_sequence(ops)?;
    }
}
