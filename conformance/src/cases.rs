//! The conformance cases: one or more rows per SPEC.md row (Files, vmmctl,
//! Per-VM device, Jails; the bhyve groups are in bhyve.rs), and the registry
//! of every group (GROUPS, run_all), the one module that imports the groups
//! of the other files. Every group leaves no VM behind.

use crate::harness::{progress, Place, Who, MAX_VMS, MEMBER1, MEMBER2, OUTSIDER};
use crate::suite::{Suite, MAX_TIMEOUTS};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by SIGINT/SIGTERM: stop after the current group.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const SEC: Duration = Duration::from_secs(1);

type Group = fn(&mut Suite);

/// Every group, in order.
pub const GROUPS: &[(&str, Group)] = &[
    ("files", files),
    ("vmmctl-open", vmmctl_open),
    ("create", create),
    ("per-vm-device", per_vm_device),
    ("names", names),
    ("flags", flags),
    ("exists-destroy", exists_destroy),
    ("limit", limit),
    ("after-destroy", after_destroy),
    ("transient", transient),
    ("reuse", reuse),
    ("delegation", delegation),
    ("vmmctl-admin", vmmctl_admin),
    ("persistence", persistence),
    ("corrupt-state", corrupt_state),
    ("default-limit", default_limit),
    ("jail-without-allow", jail_without_allow),
    ("jail-allowed", jail_allowed),
    ("jail-visibility", jail_visibility),
    ("two-jails", two_jails),
    ("jail-revoke", jail_revoke),
    ("authority", crate::attack::authority),
    ("handover", crate::attack::handover),
    ("order", crate::attack::check_order),
    ("limits", crate::attack::limits),
    ("jail-reuse", crate::attack::jail_reuse),
    ("names-unambiguous", crate::attack::names_unambiguous),
    ("ppt", crate::attack::ppt),
    ("single-instance", crate::attack::single_instance),
    ("reuse-after-exit", crate::attack::reuse_after_exit),
    ("root-reserve", crate::attack::root_reserve),
    ("no-freeze", crate::attack::no_freeze),
    ("kill-storm", crate::attack::kill_storm),
    ("sigterm", crate::attack::sigterm),
    ("bhyve-exit-status", crate::bhyve::exit_status),
    ("bhyve-sigkill", crate::bhyve::sigkill),
    ("bhyve-access", crate::bhyve::access),
    ("bhyve-jail", crate::bhyve::jail),
    ("worker-isolation", crate::isolation::worker_isolation),
];

/// Run every selected group; a panicking group becomes a failed row.
pub fn run_all(s: &mut Suite) {
    for (name, group) in GROUPS {
        if !s.selected(name) {
            continue;
        }
        if s.hung() {
            s.check(
                "vmmfs answers requests",
                "responsive",
                format!("{MAX_TIMEOUTS} timeouts in a row; stopped before '{name}'"),
            );
            break;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            s.check("suite interrupted", "completed", format!("stopped before '{name}'"));
            break;
        }
        progress(&format!("== {name}"));
        s.settle(name);
        let r = catch_unwind(AssertUnwindSafe(|| group(s)));
        if let Err(p) = r {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            s.check(&format!("group {name} ran to the end"), "completed", format!("panicked: {msg}"));
        }
        if !s.env.daemon_alive() {
            s.check(&format!("vmmfs still running after group {name}"), "running", "daemon exited");
            if let Err(e) = s.env.restart() {
                s.check("vmmfs restarted after it died", "OK", e);
                break;
            }
        }
    }
}

fn listed(readdir: &str, name: &str) -> String {
    match readdir.strip_prefix("OK ") {
        Some(list) if list.split(',').any(|n| n == name) => "listed".into(),
        Some(_) => "not listed".into(),
        None if readdir == "OK" => "not listed".into(),
        None => readdir.to_string(),
    }
}

fn exists(stat: &str) -> String {
    if stat.starts_with("OK ") {
        "exists".into()
    } else {
        stat.to_string()
    }
}

fn transient_line(name: &str) -> String {
    format!("create {name} destroy-on-close")
}

// ---------------------------------------------------------------- Files

fn files(s: &mut Suite) {
    let g = s.env.users.vmm_gid;
    let ctl = s.ctl();
    let mount = match crate::harness::mount_options(&s.env.mount) {
        Some((fstype, opts)) => {
            let has = |o: &str| opts.iter().any(|x| x == o);
            let mut v = vec![if fstype.starts_with("fuse") { "fuse".to_string() } else { fstype }];
            for o in ["default_permissions", "allow_other"] {
                v.push(if has(o) { o.to_string() } else { format!("no {o}") });
            }
            v.join(",")
        }
        None => "not mounted".into(),
    };
    s.check("Files: mount is FUSE with default_permissions,allow_other", "fuse,default_permissions,allow_other", mount);
    s.check(
        "Files: vmmctl is root:vmm 0660, a regular file",
        format!("OK uid=0 gid={g} mode=0660 type=file"),
        s.env.stat(&ctl),
    );
    let seen = s.probe(Who::user(MEMBER1), &["stat", &ctl]);
    s.check("Files: a member sees vmmctl as root:vmm 0660", format!("OK uid=0 gid={g} mode=0660 type=file"), seen);
    s.check("Files: vmm/ is root:root 0755", "OK uid=0 gid=0 mode=0755 type=dir", s.env.stat(&s.env.vm_dir()));
    s.check("Files: vmm.io/ is root:root 0755", "OK uid=0 gid=0 mode=0755 type=dir", s.env.stat(&s.env.io_dir()));
    let r = s.root_create("f-root");
    s.check("Files: root creates VM f-root (write 'create NAME')", "OK", r);
    s.check(
        "Files: vmm/f-root is root:vmm 0600, a regular file",
        s.node_line(0, 0o600),
        s.env.stat(&s.env.vm("f-root")),
    );
    s.check(
        "Files: vmm.io/f-root.sysmem is root:vmm 0600, a regular file",
        s.node_line(0, 0o600),
        s.env.stat(&s.env.seg("f-root")),
    );
    s.check(
        "Files: root can mmap vmm.io/f-root.sysmem (shared between opens)",
        "OK",
        s.probe(Who::root(), &["mmap-rw", &s.env.seg("f-root")]),
    );
    let r = s.root_destroy("f-root");
    s.check("Files: root destroys f-root (write 'destroy NAME')", "OK", r);
}

// ---------------------------------------------------------------- vmmctl: open

fn vmmctl_open(s: &mut Suite) {
    let ctl = s.ctl();
    for mode in ["wronly", "rdwr"] {
        let r = s.probe(Who::user(OUTSIDER), &["open", &ctl, mode]);
        s.check(&format!("vmmctl: non-member open {mode} (no write access) -> EACCES"), "EACCES", r);
    }
    let r = s.probe(Who::user(OUTSIDER), &["open", &ctl, "rdonly"]);
    s.check("vmmctl: non-member open rdonly -> EACCES (no read access either)", "EACCES", r);
    let r = s.probe(Who::user(MEMBER1), &["open", &ctl, "rdonly"]);
    s.check("vmmctl: member open rdonly -> EPERM", "EPERM", r);
    let r = s.probe(Who::root(), &["open", &ctl, "rdonly"]);
    s.check("vmmctl: root open rdonly -> EPERM (even root)", "EPERM", r);
    for mode in ["wronly", "rdwr"] {
        let r = s.probe(Who::user(MEMBER1), &["open", &ctl, mode]);
        s.check(&format!("vmmctl: member open {mode} -> OK"), "OK", r);
    }
    let r = s.probe(Who::root(), &["open", &ctl, "rdwr"]);
    s.check("vmmctl: root open rdwr -> OK", "OK", r);
}

// ---------------------------------------------------------------- vmmctl: create

fn create(s: &mut Suite) {
    let ctl = s.ctl();
    let log_from = s.env.log_len();
    let r = s.probe(Who::user(MEMBER1), &["write", &ctl, "create c-nt"]);
    s.check("vmmctl: member non-transient create (write) -> EPERM", "EPERM", r);
    let r = s.probe(Who::user(MEMBER1), &["ioctl-create", &ctl, "c-nt", "0"]);
    s.check("vmmctl: member non-transient create (ioctl flags 0) -> EPERM", "EPERM", r);
    std::thread::sleep(Duration::from_millis(100));
    let logged = if s.env.log_since(log_from).contains("An unprivileged user must run VMs in monitor mode") {
        "logged"
    } else {
        "not in daemon log"
    };
    s.check("vmmctl: EPERM text 'An unprivileged user must run VMs in monitor mode' in daemon log", "logged", logged);

    let r = s.probe(Who::user(MEMBER1), &["ioctl-create", &ctl, "c-ioc", "1"]);
    s.check("vmmctl: member create destroy-on-close (ioctl flags 0x1) -> OK", "OK", r);
    s.check(
        "vmmctl: ioctl-created transient VM gone after its creator exits (<=1 s)",
        "gone",
        s.env.gone_within(&s.env.vm("c-ioc"), SEC),
    );

    let r = s.probe(Who::root(), &["ioctl-create", &ctl, "c-rioc", "0"]);
    s.check("vmmctl: root non-transient create (ioctl flags 0) -> OK", "OK", r);
    s.check("vmmctl: root's non-transient VM outlives its creator", "exists", exists(&s.env.stat(&s.env.vm("c-rioc"))));
    let r = s.probe(Who::root(), &["ioctl-destroy", &ctl, "c-rioc"]);
    s.check("vmmctl: root destroy (ioctl) -> OK", "OK", r);
    s.check("vmmctl: vmm/NAME gone after destroy", "ENOENT", s.env.stat(&s.env.vm("c-rioc")));
}

// ---------------------------------------------------------------- Per-VM device

fn per_vm_device(s: &mut Suite) {
    let u1 = s.env.users.m1.uid;
    let h = match s.env.hold(Who::user(MEMBER1), "d-vm", "write") {
        Ok(h) => {
            s.check("vmmctl: member create NAME destroy-on-close (write) -> OK", "OK", "OK");
            h
        }
        Err(obs) => return s.check("vmmctl: member create NAME destroy-on-close (write) -> OK", "OK", obs),
    };
    let (vm, seg) = (s.env.vm("d-vm"), s.env.seg("d-vm"));
    s.check("Files: vmm/NAME is creator-euid:vmm 0600, a regular file", s.node_line(u1, 0o600), s.env.stat(&vm));
    s.check(
        "Files: vmm.io/NAME.sysmem is creator-euid:vmm 0600, a regular file",
        s.node_line(u1, 0o600),
        s.env.stat(&seg),
    );
    s.check(
        "Files: owner mmaps vmm.io/NAME.sysmem; 2nd open+mmap sees the byte",
        "OK",
        s.probe(Who::user(MEMBER1), &["mmap-rw", &seg]),
    );
    for mode in ["rdwr", "rdonly"] {
        let r = s.probe(Who::user(MEMBER2), &["open", &vm, mode]);
        s.check(&format!("Per-VM: other member open vmm/NAME {mode} -> EACCES"), "EACCES", r);
    }
    let r = s.probe(Who::user(OUTSIDER), &["open", &vm, "rdwr"]);
    s.check("Per-VM: non-member open vmm/NAME -> EACCES", "EACCES", r);
    let r = s.probe(Who::user(MEMBER2), &["open", &seg, "rdwr"]);
    s.check("Per-VM: other member open vmm.io/NAME.sysmem -> EACCES", "EACCES", r);
    s.check("Per-VM: owner open vmm/NAME rdwr -> OK", "OK", s.probe(Who::user(MEMBER1), &["open", &vm, "rdwr"]));
    s.check("Per-VM: root opens any VM's vmm/NAME -> OK", "OK", s.probe(Who::root(), &["open", &vm, "rdwr"]));
    s.check(
        "Per-VM: root opens any VM's vmm.io/NAME.sysmem -> OK",
        "OK",
        s.probe(Who::root(), &["open", &seg, "rdwr"]),
    );
    let r = s.probe(Who::user(MEMBER1), &["write-read", &vm, "cpus 2", "cpus"]);
    s.check("Per-VM: owner operates the VM (write 'cpus 2', read cpus=)", "OK cpus=2", r);
    let r = s.probe(Who::user(MEMBER1), &["read", &vm, "state"]);
    s.check("Per-VM: owner reads status (state=configuring)", "OK state=configuring", r);
    let dir = s.probe(Who::user(MEMBER2), &["readdir", &s.env.vm_dir()]);
    s.check("Per-VM: ls vmm/ lists the VM (to any user on the host)", "listed", listed(&dir, "d-vm"));
    let dir = s.probe(Who::user(MEMBER2), &["readdir", &s.env.io_dir()]);
    s.check("Per-VM: ls vmm.io/ lists NAME.sysmem", "listed", listed(&dir, "d-vm.sysmem"));
    drop(h);
    s.check("vmmctl: transient VM destroyed when its holder exits (<=1 s)", "gone", s.env.gone_within(&vm, SEC));
    s.check("vmmctl: vmm.io/NAME.sysmem gone with the VM", "ENOENT", s.env.stat(&seg));
}

// ---------------------------------------------------------------- names

fn names(s: &mut Suite) {
    let ctl = s.ctl();
    let long = "x".repeat(230);
    let bad: [(&str, &str); 8] = [
        ("empty", ""),
        ("230 bytes", &long),
        ("space", "a b"),
        ("tab", "a\tb"),
        ("'\"'", "a\"b"),
        ("'/'", "a/b"),
        ("'.'", "."),
        ("'..'", ".."),
    ];
    for (label, name) in bad {
        let r = s.probe(Who::user(MEMBER1), &["write", &ctl, &transient_line(name)]);
        s.check(&format!("vmmctl: name {label} (write) -> EINVAL"), "EINVAL", r);
        let r = s.probe(Who::user(MEMBER1), &["ioctl-create", &ctl, name, "1"]);
        s.check(&format!("vmmctl: name {label} (ioctl) -> EINVAL"), "EINVAL", r);
    }
    let r = s.probe(Who::user(MEMBER1), &["write", &ctl, &transient_line(&"y".repeat(229))]);
    s.check("vmmctl: name of 229 bytes (write) -> OK", "OK", r);
    let r = s.probe(Who::user(MEMBER1), &["ioctl-create", &ctl, &"z".repeat(229), "1"]);
    s.check("vmmctl: name of 229 bytes (ioctl) -> OK", "OK", r);
}

// ---------------------------------------------------------------- flags, reserved

fn flags(s: &mut Suite) {
    let ctl = s.ctl();
    for (label, flags, reserved) in [
        ("unknown flag 0x2", "0x2", None),
        ("unknown flag 0x80000000 with 0x1", "0x80000001", None),
        ("reserved[0] != 0", "0x1", Some("0")),
        ("reserved[14] != 0", "0x1", Some("14")),
    ] {
        let mut args = vec!["ioctl-create", &ctl, "r-flag", flags];
        args.extend(reserved);
        let r = s.probe(Who::user(MEMBER1), &args);
        s.check(&format!("vmmctl: create with {label} -> EINVAL"), "EINVAL", r);
    }
    let r = s.root_create("r-rsv");
    s.check("vmmctl: root creates r-rsv", "OK", r);
    for idx in ["0", "15"] {
        let r = s.probe(Who::root(), &["ioctl-destroy", &ctl, "r-rsv", idx]);
        s.check(&format!("vmmctl: destroy with reserved[{idx}] != 0 -> EINVAL"), "EINVAL", r);
    }
    s.check("vmmctl: VM survives destroys with bad reserved fields", "exists", exists(&s.env.stat(&s.env.vm("r-rsv"))));
    let r = s.root_destroy("r-rsv");
    s.check("vmmctl: root destroys r-rsv", "OK", r);
}

// ---------------------------------------------------------------- EEXIST, destroy

fn exists_destroy(s: &mut Suite) {
    let ctl = s.ctl();
    let h = match s.env.hold(Who::user(MEMBER1), "e-dup", "write") {
        Ok(h) => h,
        Err(obs) => return s.check("vmmctl: member creates e-dup", "OK", obs),
    };
    let line = transient_line("e-dup");
    s.check(
        "vmmctl: duplicate name, other member (write) -> EEXIST",
        "EEXIST",
        s.probe(Who::user(MEMBER2), &["write", &ctl, &line]),
    );
    s.check(
        "vmmctl: duplicate name, other member (ioctl) -> EEXIST",
        "EEXIST",
        s.probe(Who::user(MEMBER2), &["ioctl-create", &ctl, "e-dup", "1"]),
    );
    s.check(
        "vmmctl: duplicate name, same user (write) -> EEXIST",
        "EEXIST",
        s.probe(Who::user(MEMBER1), &["write", &ctl, &line]),
    );
    s.check("vmmctl: duplicate name, root non-transient -> EEXIST", "EEXIST", s.root_create("e-dup"));

    s.check("vmmctl: destroy unknown VM, root (write) -> EINVAL", "EINVAL", s.root_destroy("e-none"));
    s.check(
        "vmmctl: destroy unknown VM, root (ioctl) -> EINVAL",
        "EINVAL",
        s.probe(Who::root(), &["ioctl-destroy", &ctl, "e-none"]),
    );
    s.check(
        "vmmctl: destroy unknown VM, member (write) -> EINVAL",
        "EINVAL",
        s.probe(Who::user(MEMBER1), &["write", &ctl, "destroy e-none"]),
    );

    s.check(
        "vmmctl: destroy other user's VM (write) -> EPERM",
        "EPERM",
        s.probe(Who::user(MEMBER2), &["write", &ctl, "destroy e-dup"]),
    );
    s.check(
        "vmmctl: destroy other user's VM (ioctl) -> EPERM",
        "EPERM",
        s.probe(Who::user(MEMBER2), &["ioctl-destroy", &ctl, "e-dup"]),
    );
    s.check("vmmctl: other user's failed destroy left the VM", "exists", exists(&s.env.stat(&s.env.vm("e-dup"))));
    let r = s.probe(Who::user(MEMBER1), &["write", &ctl, "destroy e-dup"]);
    s.check("vmmctl: creator destroys its VM from another descriptor -> OK", "OK", r);
    s.check("vmmctl: destroyed VM's node gone (<=1 s)", "gone", s.env.gone_within(&s.env.vm("e-dup"), SEC));
    drop(h);

    for (label, via) in [("write", "write"), ("ioctl", "ioctl")] {
        let name = format!("e-root-{label}");
        let h = match s.env.hold(Who::user(MEMBER1), &name, "write") {
            Ok(h) => h,
            Err(obs) => return s.check("vmmctl: member creates a VM for root to destroy", "OK", obs),
        };
        let r =
            if via == "write" { s.root_destroy(&name) } else { s.probe(Who::root(), &["ioctl-destroy", &ctl, &name]) };
        s.check(&format!("vmmctl: root destroys a member's VM ({label}) -> OK"), "OK", r);
        s.check(
            &format!("vmmctl: node gone after root's destroy ({label})"),
            "gone",
            s.env.gone_within(&s.env.vm(&name), SEC),
        );
        drop(h);
    }
}

// ---------------------------------------------------------------- per-user limit

fn limit(s: &mut Suite) {
    let ctl = s.ctl();
    let n = (MAX_VMS + 1).to_string();
    let mut want = vec!["OK"; MAX_VMS];
    want.push("ENOMEM");
    let want = want.join(",");
    let r = s.probe(Who::user(MEMBER1), &["create-many", &ctl, "l-m", &n]);
    s.check(&format!("vmmctl: member's VM #{n} with --max-vms-per-user {MAX_VMS} -> ENOMEM"), &want, r);
    for i in 1..=MAX_VMS {
        s.env.gone_within(&s.env.vm(&format!("l-m{i}")), SEC);
    }

    let mut got = Vec::new();
    for i in 1..=MAX_VMS + 1 {
        got.push(s.root_create(&format!("l-r{i}")));
    }
    s.check(&format!("vmmctl: root's VM #{n} -> ENOMEM (root included)"), &want, got.join(","));
    for i in 1..=MAX_VMS {
        s.root_destroy(&format!("l-r{i}"));
    }

    let names: Vec<String> = (1..=MAX_VMS).map(|i| format!("l-u{i}")).collect();
    let h = match s.env.hold(Who::user(MEMBER1), &names.join(","), "write") {
        Ok(h) => h,
        Err(obs) => return s.check("vmmctl: member holds the maximum of VMs", "OK", obs),
    };
    let m1 = s.env.users.m1.uid;
    let r = s.probe(Who::user(MEMBER2).with_ruid(m1), &["write", &ctl, &transient_line("l-x1")]);
    s.check("vmmctl: limit counts the real uid (ruid=full user, euid=other) -> ENOMEM", "ENOMEM", r);
    let r = s.probe(Who::user(MEMBER2), &["write", &ctl, &transient_line("l-x2")]);
    s.check("vmmctl: another user is not limited by it -> OK", "OK", r);
    let r = s.probe(Who::user(MEMBER1), &["write", &ctl, "destroy l-u1"]);
    s.check("vmmctl: member destroys one of its VMs", "OK", r);
    let r = s.retry_eexist(Who::user(MEMBER1), &["write", &ctl, &transient_line("l-x3")], SEC);
    s.check("vmmctl: after a destroy the member may create again -> OK", "OK", r);
    drop(h);
}

// ---------------------------------------------------------------- after destroy

fn after_destroy(s: &mut Suite) {
    let ctl = s.ctl();
    let r = s.probe(Who::user(MEMBER1), &["stale-fd", &ctl, "a-vm", "vm", "destroy"]);
    s.check("vmmctl: after destroy, write/read on open vmm/NAME fd -> ENXIO", "write=ENXIO read=ENXIO", r);
    let r = s.probe(Who::user(MEMBER1), &["stale-fd", &ctl, "a-seg", "seg", "destroy"]);
    // Documented difference (vmm.4): passthrough segments cannot fail with ENXIO; they are emptied.
    s.check(
        "vmmctl: after destroy, open vmm.io/NAME.sysmem fd -> EOF, old mapping faults",
        "read=EOF mapping=SIGBUS",
        r,
    );
    let r = s.root_create("a-root");
    s.check("vmmctl: root creates a-root", "OK", r);
    let r = s.root_destroy("a-root");
    s.check("vmmctl: root destroys a-root", "OK", r);
    s.check("vmmctl: after destroy vmm/NAME -> ENOENT", "ENOENT", s.env.stat(&s.env.vm("a-root")));
    s.check("vmmctl: after destroy vmm.io/NAME.sysmem -> ENOENT", "ENOENT", s.env.stat(&s.env.seg("a-root")));
    let dir = s.probe(Who::root(), &["readdir", &s.env.vm_dir()]);
    s.check("vmmctl: after destroy ls vmm/ does not list it", "not listed", listed(&dir, "a-root"));
}

// ---------------------------------------------------------------- transient VMs

fn transient(s: &mut Suite) {
    let ctl = s.ctl();
    for via in ["write", "ioctl"] {
        let name = format!("t-kill-{via}");
        let mut h = match s.env.hold(Who::user(MEMBER1), &name, via) {
            Ok(h) => h,
            Err(obs) => return s.check(&format!("transient: member creates {name}"), "OK", obs),
        };
        s.check(
            &format!("transient: {name} exists while its holder lives"),
            "exists",
            exists(&s.env.stat(&s.env.vm(&name))),
        );
        h.sigkill();
        s.check(
            &format!("transient: holder SIGKILLed -> VM destroyed <=1 s ({via})"),
            "gone",
            s.env.gone_within(&s.env.vm(&name), SEC),
        );
    }
    let r = s.probe(Who::user(MEMBER1), &["dup-fork-release", &ctl, "t-fork"]);
    s.check("transient: VM lives until the last dup/fork copy closes, then goes <=1 s", "OK", r);
    let r = s.probe(Who::user(MEMBER1), &["stale-fd", &ctl, "t-stale", "vm", "close"]);
    s.check("Per-VM: open vmm/NAME does not keep a transient VM; its fd -> ENXIO", "write=ENXIO read=ENXIO", r);
}

// ---------------------------------------------------------------- name reuse

fn reuse(s: &mut Suite) {
    let ctl = s.ctl();
    let r = s.probe(Who::user(MEMBER1), &["reuse", &ctl, "u-a", "destroy"]);
    s.check("vmmctl: name reusable right after 'destroy' returns", "OK", r);
    let r = s.probe(Who::user(MEMBER1), &["reuse", &ctl, "u-b", "close"]);
    s.check("vmmctl: transient name reusable <=1 s after close", "OK", r);
    let mut h = match s.env.hold(Who::user(MEMBER1), "u-c", "write") {
        Ok(h) => h,
        Err(obs) => return s.check("vmmctl: member creates u-c", "OK", obs),
    };
    h.sigkill();
    let r = s.retry_eexist(Who::user(MEMBER2), &["write", &ctl, &transient_line("u-c")], SEC);
    s.check("vmmctl: name of a SIGKILLed holder's VM free for another user <=1 s", "OK", r);
}

// ---------------------------------------------------------------- chmod/chgrp/chown of vmm/NAME

fn delegation(s: &mut Suite) {
    let (u1, g1) = (s.env.users.m1.uid, s.env.users.m1.gid);
    let u2 = s.env.users.m2.uid;
    let vmm_gid = s.env.users.vmm_gid;
    let h = match s.env.hold(Who::user(MEMBER1), "g-vm", "write") {
        Ok(h) => h,
        Err(obs) => return s.check("delegation: member creates g-vm", "OK", obs),
    };
    let vm = s.env.vm("g-vm");
    s.check(
        "delegation: other member open before chmod -> EACCES",
        "EACCES",
        s.probe(Who::user(MEMBER2), &["open", &vm, "rdwr"]),
    );
    s.check(
        "delegation: non-owner chmod vmm/NAME -> EPERM",
        "EPERM",
        s.probe(Who::user(MEMBER2), &["chmod", &vm, "0666"]),
    );
    s.check("delegation: owner chmod g+rw vmm/NAME -> OK", "OK", s.probe(Who::user(MEMBER1), &["chmod", &vm, "0660"]));
    s.check("delegation: vmm/NAME now 0660", s.node_line(u1, 0o660), s.env.stat(&vm));
    s.check(
        "delegation: other member open after chmod g+rw -> OK",
        "OK",
        s.probe(Who::user(MEMBER2), &["open", &vm, "rdwr"]),
    );
    let r = s.probe(Who::user(MEMBER2), &["write-read", &vm, "cpus 2", "cpus"]);
    s.check("delegation: delegated member operates the VM (cpus 2)", "OK cpus=2", r);
    s.check("delegation: non-member still -> EACCES", "EACCES", s.probe(Who::user(OUTSIDER), &["open", &vm, "rdwr"]));
    let r = s.probe(Who::user(MEMBER1), &["chown", &vm, "-1", "0"]);
    s.check("delegation: owner chgrp to a group it is not in -> EPERM", "EPERM", r);
    if g1 != vmm_gid {
        let r = s.probe(Who::user(MEMBER1), &["chown", &vm, "-1", &g1.to_string()]);
        s.check("delegation: owner chgrp to its own group -> OK", "OK", r);
        s.check(
            "delegation: member of old group now -> EACCES",
            "EACCES",
            s.probe(Who::user(MEMBER2), &["open", &vm, "rdwr"]),
        );
        let r = s.probe(Who::user(MEMBER1), &["chown", &vm, "-1", &vmm_gid.to_string()]);
        s.check("delegation: owner chgrp back to vmm -> OK", "OK", r);
    }
    let r = s.probe(Who::user(MEMBER1), &["chown", &vm, &u2.to_string(), "-1"]);
    s.check("delegation: owner chown (give away) -> EPERM (only root chowns)", "EPERM", r);
    s.check("delegation: root chmod 0600 -> OK", "OK", s.probe(Who::root(), &["chmod", &vm, "0600"]));
    let r = s.probe(Who::root(), &["chown", &vm, &u2.to_string(), "-1"]);
    s.check("delegation: root chown vmm/NAME to another member -> OK", "OK", r);
    s.check("delegation: vmm/NAME now owned by the new owner", s.node_line(u2, 0o600), s.env.stat(&vm));
    s.check("delegation: new owner opens -> OK", "OK", s.probe(Who::user(MEMBER2), &["open", &vm, "rdwr"]));
    s.check("delegation: old owner opens -> EACCES", "EACCES", s.probe(Who::user(MEMBER1), &["open", &vm, "rdwr"]));
    drop(h);
    s.check("delegation: VM gone with its creator's descriptor", "gone", s.env.gone_within(&vm, SEC));
}

// ---------------------------------------------------------------- vmmctl administration

fn vmmctl_admin(s: &mut Suite) {
    let ctl = s.ctl();
    let vmm_gid = s.env.users.vmm_gid;
    let out_gid = s.env.users.out.gid;
    s.check("admin: member chmod vmmctl -> EPERM", "EPERM", s.probe(Who::user(MEMBER1), &["chmod", &ctl, "0666"]));
    s.check("admin: root chmod vmmctl 0666 -> OK", "OK", s.probe(Who::root(), &["chmod", &ctl, "0666"]));
    let r = s.probe(Who::user(OUTSIDER), &["write", &ctl, &transient_line("m-out")]);
    s.check("admin: vmmctl 0666 lets a non-member create a transient VM", "OK", r);
    let r = s.probe(Who::user(OUTSIDER), &["write", &ctl, "create m-out2"]);
    s.check("admin: ... but not a non-transient one -> EPERM", "EPERM", r);
    s.check("admin: root chmod vmmctl 0660 (restore) -> OK", "OK", s.probe(Who::root(), &["chmod", &ctl, "0660"]));
    s.check(
        "admin: non-member open after restore -> EACCES",
        "EACCES",
        s.probe(Who::user(OUTSIDER), &["open", &ctl, "rdwr"]),
    );
    if out_gid == vmm_gid {
        return s.check("admin: vmmtest3's primary group differs from vmm", "different", "same");
    }
    let r = s.probe(Who::root(), &["chown", &ctl, "-1", &out_gid.to_string()]);
    s.check("admin: root chgrp vmmctl to another group -> OK", "OK", r);
    s.check(
        "admin: member of the new group opens vmmctl -> OK",
        "OK",
        s.probe(Who::user(OUTSIDER), &["open", &ctl, "rdwr"]),
    );
    s.check(
        "admin: vmm member (no longer the group) -> EACCES",
        "EACCES",
        s.probe(Who::user(MEMBER1), &["open", &ctl, "rdwr"]),
    );
    let r = s.probe(Who::root(), &["chown", &ctl, "-1", &vmm_gid.to_string()]);
    s.check("admin: root chgrp vmmctl back to vmm -> OK", "OK", r);
    s.check("admin: vmm member opens vmmctl again -> OK", "OK", s.probe(Who::user(MEMBER1), &["open", &ctl, "rdwr"]));
    let vmmctl_line = format!("OK uid=0 gid={vmm_gid} mode=0660 type=file");
    s.check("admin: vmmctl back to root:vmm 0660", vmmctl_line, s.env.stat(&ctl));
}

// ---------------------------------------------------------------- persistence

fn persistence(s: &mut Suite) {
    let (ctl, vm_dir, io_dir) = (s.ctl(), s.env.vm_dir(), s.env.io_dir());
    let vmm_gid = s.env.users.vmm_gid;
    let out_gid = s.env.users.out.gid;
    let jail = match s.env.jail() {
        Ok(j) => j,
        Err(e) => return s.check("persistence: start a PID namespace", "OK", e),
    };
    s.check("persistence: vmmfs jail allow --pid -> OK", "OK", s.env.jail_cmd("allow", jail.pid, None));
    let (out_s, vmm_s) = (out_gid.to_string(), vmm_gid.to_string());
    let steps: [(&str, &[&str]); 5] = [
        ("chgrp vmmtest3 vmmctl", &["chown", &ctl, "-1", &out_s]),
        ("chmod 0620 vmmctl", &["chmod", &ctl, "0620"]),
        ("chmod 0711 vmm/", &["chmod", &vm_dir, "0711"]),
        ("chmod 0750 vmm.io/", &["chmod", &io_dir, "0750"]),
        ("chgrp vmm vmm.io/", &["chown", &io_dir, "-1", &vmm_s]),
    ];
    for (label, args) in steps {
        let r = s.probe(Who::root(), args);
        s.check(&format!("persistence: root {label}"), "OK", r);
    }
    let r = s.env.restart();
    s.check("persistence: daemon restarts on the same state dir", "OK", r.err().unwrap_or_else(|| "OK".into()));
    s.check(
        "persistence: vmmctl chgrp+chmod survive restart",
        format!("OK uid=0 gid={out_gid} mode=0620 type=file"),
        s.env.stat(&ctl),
    );
    s.check("persistence: vmm/ chmod survives restart", "OK uid=0 gid=0 mode=0711 type=dir", s.env.stat(&vm_dir));
    s.check(
        "persistence: vmm.io/ chmod+chgrp survive restart",
        format!("OK uid=0 gid={vmm_gid} mode=0750 type=dir"),
        s.env.stat(&io_dir),
    );
    let r = s.probe(Who::root().at(Place::Jail(jail.pid)), &["open", &ctl, "rdwr"]);
    s.check("persistence: allow.vmm grant survives restart (jailed root opens vmmctl)", "OK", r);
    // Restore the defaults, and check they persist too.
    let restore: [(&str, &[&str]); 5] = [
        ("chgrp vmm vmmctl", &["chown", &ctl, "-1", &vmm_s]),
        ("chmod 0660 vmmctl", &["chmod", &ctl, "0660"]),
        ("chmod 0755 vmm/", &["chmod", &vm_dir, "0755"]),
        ("chmod 0755 vmm.io/", &["chmod", &io_dir, "0755"]),
        ("chgrp root vmm.io/", &["chown", &io_dir, "-1", "0"]),
    ];
    for (label, args) in restore {
        let r = s.probe(Who::root(), args);
        s.check(&format!("persistence: restore: root {label}"), "OK", r);
    }
    s.check("persistence: vmmfs jail revoke --pid -> OK", "OK", s.env.jail_cmd("revoke", jail.pid, None));
    let r = s.env.restart();
    s.check("persistence: daemon restarts again", "OK", r.err().unwrap_or_else(|| "OK".into()));
    let g = s.env.users.vmm_gid;
    s.check(
        "persistence: restored vmmctl root:vmm 0660 survives restart",
        format!("OK uid=0 gid={g} mode=0660 type=file"),
        s.env.stat(&ctl),
    );
    s.check(
        "persistence: restored vmm.io/ root:root 0755 survives restart",
        "OK uid=0 gid=0 mode=0755 type=dir",
        s.env.stat(&io_dir),
    );
    let r = s.probe(Who::root().at(Place::Jail(jail.pid)), &["open", &ctl, "rdwr"]);
    s.check("persistence: revoke survives restart (jailed root open -> EPERM)", "EPERM", r);
}

// ---------------------------------------------------------------- default limit

/// A second daemon without --max-vms-per-user: the limit is 4 x CPUs.
fn default_limit(s: &mut Suite) {
    let dir = s.env.base.join("default-limit-state");
    let mnt = s.env.base.join("default-limit-mnt");
    let setup = std::fs::create_dir_all(&dir).and_then(|()| std::fs::create_dir_all(&mnt));
    if let Err(e) = setup {
        return s.check("default limit: set up", "OK", e.to_string());
    }
    let log = s.env.base.join("default-limit.log");
    let Ok(log_file) = std::fs::File::create(&log) else {
        return s.check("default limit: log file", "OK", "cannot create");
    };
    let child = Command::new(&s.env.vmmfs)
        .args(["--group", "vmm", "--state-dir"])
        .arg(&dir)
        .arg(&mnt)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return s.check("default limit: run vmmfs", "OK", e.to_string()),
    };
    let ctl = mnt.join("vmmctl");
    let end = Instant::now() + Duration::from_secs(10);
    let mut up = false;
    while Instant::now() < end && matches!(child.try_wait(), Ok(None)) {
        let c = ctl.clone();
        if crate::harness::is_mounted(&mnt)
            && crate::harness::timed(Duration::from_secs(5), move || c.exists()) == Some(true)
        {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if up {
        // SAFETY: plain sysconf query.
        let cpus = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1);
        let max = 4 * cpus;
        let mut want = vec!["OK"; max];
        want.push("ENOMEM");
        let r = s.probe(Who::user(MEMBER1), &["create-many", &ctl.to_string_lossy(), "dl-", &(max + 1).to_string()]);
        s.check(&format!("vmmctl: default limit is 4 x CPUs ({max}): VM #{} -> ENOMEM", max + 1), want.join(","), r);
    } else {
        s.check("default limit: second vmmfs mounts", "OK", crate::harness::tail(&log, 5));
    }
    crate::harness::kill_and_reap(&mut child);
    crate::harness::unmount(&mnt);
}

// ---------------------------------------------------------------- corrupt state

fn corrupt_state(s: &mut Suite) {
    let dir = s.env.base.join("corrupt-state");
    let mnt = s.env.base.join("corrupt-mnt");
    let setup = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::create_dir_all(&mnt))
        .and_then(|()| std::fs::write(dir.join("state"), "this is not a vmmfs state file\n"));
    if let Err(e) = setup {
        return s.check("corrupt state: set up", "OK", e.to_string());
    }
    let child = Command::new(&s.env.vmmfs)
        .args(["--group", "vmm", "--state-dir"])
        .arg(&dir)
        .arg(&mnt)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return s.check("corrupt state: run vmmfs", "OK", e.to_string()),
    };
    let observed = match crate::harness::wait_timeout(&mut child, Duration::from_secs(10)) {
        None => {
            let _ = child.kill();
            let _ = child.wait();
            "still running after 10 s".to_string()
        }
        Some(st) => {
            let out = child
                .wait_with_output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout));
            let text = out.unwrap_or_default();
            let names_file = text.contains(&dir.join("state").to_string_lossy().into_owned())
                || text.contains(&dir.to_string_lossy().into_owned());
            let says_why = text.to_lowercase().contains("corrupt");
            if st.success() {
                "exit 0".into()
            } else if names_file && says_why {
                "non-zero exit, message names the file and says corrupt".into()
            } else {
                format!("non-zero exit, unclear message: {}", text.lines().next().unwrap_or(""))
            }
        }
    };
    crate::harness::unmount(&mnt);
    s.check(
        "persistence: corrupt state file -> vmmfs exits non-zero with a clear message",
        "non-zero exit, message names the file and says corrupt",
        observed,
    );
    let kept = std::fs::read_to_string(dir.join("state")).unwrap_or_default() == "this is not a vmmfs state file\n";
    s.check("persistence: corrupt state file left untouched", "kept", if kept { "kept" } else { "overwritten" });
}

// ---------------------------------------------------------------- jails

fn jail_without_allow(s: &mut Suite) {
    let ctl = s.ctl();
    let r = s.probe(Who::root().at(Place::FreshJail), &["open", &ctl, "rdwr"]);
    s.check("Jails: root in a jail without allow.vmm opens vmmctl -> EPERM", "EPERM", r);
    let r = s.probe(Who::user(MEMBER1).at(Place::FreshJail), &["open", &ctl, "rdwr"]);
    s.check("Jails: member in a jail without allow.vmm opens vmmctl -> EPERM", "EPERM", r);
    for via in ["write", "ioctl"] {
        let r = s.probe(Who::root(), &["jail-inherit", &ctl, &format!("j-inh-{via}"), via]);
        s.check(&format!("Jails: create in a jail without allow.vmm (host fd inherited, {via}) -> EPERM"), "EPERM", r);
    }
    for via in ["destroy-write", "destroy-ioctl"] {
        let name = format!("j-inh-{via}");
        let r = s.root_create(&name);
        s.check(&format!("Jails: host root creates {name}"), "OK", r);
        let r = s.probe(Who::root(), &["jail-inherit", &ctl, &name, via]);
        // SPEC "Authority": the writer (in a jail) is not the opener (on the
        // host), so the command carries no authority at all.
        s.check(&format!("Jails: jail destroys a host VM via a host fd ({via}) -> EPERM (not the opener)"), "EPERM", r);
        let left = exists(&s.env.stat(&s.env.vm(&name)));
        s.check(&format!("Jails: host VM survives the jail's destroy attempt ({via})"), "exists", left);
        s.root_destroy(&name);
    }
}

fn jail_allowed(s: &mut Suite) {
    let ctl = s.ctl();
    let u1 = s.env.users.m1.uid;
    let jail = match s.env.jail() {
        Ok(j) => j,
        Err(e) => return s.check("Jails: start a PID namespace", "OK", e),
    };
    let non_root = s.env.users.m1.clone();
    let r = s.env.jail_cmd("allow", jail.pid, Some(&non_root));
    s.check(
        "Jails: non-root cannot grant allow.vmm",
        "refused",
        if r == "OK" { "accepted".to_string() } else { "refused".into() },
    );
    s.check("Jails: root grants allow.vmm (vmmfs jail allow --pid)", "OK", s.env.jail_cmd("allow", jail.pid, None));
    let jroot = Who::root().at(Place::Jail(jail.pid));
    let jm1 = Who::user(MEMBER1).at(Place::Jail(jail.pid));
    s.check("Jails: jailed root opens vmmctl with allow.vmm -> OK", "OK", s.probe(jroot, &["open", &ctl, "rdwr"]));
    let r = s.probe(Who::root().at(Place::FreshJail), &["open", &ctl, "rdwr"]);
    s.check("Jails: the grant is per jail (another jail still -> EPERM)", "EPERM", r);
    s.check(
        "Jails: jailed root non-transient create (write) -> EPERM",
        "EPERM",
        s.probe(jroot, &["write", &ctl, "create j-nt"]),
    );
    s.check(
        "Jails: jailed root non-transient create (ioctl) -> EPERM",
        "EPERM",
        s.probe(jroot, &["ioctl-create", &ctl, "j-nt", "0"]),
    );
    let hr = s.env.hold(jroot, "j-root", "write");
    s.check(
        "Jails: jailed root transient create -> OK",
        "OK",
        hr.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    let hm = s.env.hold(jm1, "j-m1", "ioctl");
    s.check(
        "Jails: jailed member transient create (ioctl) -> OK",
        "OK",
        hm.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    s.check(
        "Jails: host sees the jail's VM node (creator:vmm 0600)",
        s.node_line(u1, 0o600),
        s.env.stat(&s.env.vm("j-m1")),
    );
    let dir = s.probe(Who::root(), &["readdir", &s.env.vm_dir()]);
    s.check("Jails: host ls vmm/ lists the jail's VMs", "listed", listed(&dir, "j-root"));
    s.check("Jails: jailed owner opens its vmm/NAME -> OK", "OK", s.probe(jm1, &["open", &s.env.vm("j-m1"), "rdwr"]));
    let r = s.probe(Who::root(), &["open", &s.env.vm("j-m1"), "rdwr"]);
    s.check("Jails: host root opens a jail's vmm/NAME -> OK", "OK", r);
    let r = s.probe(jroot, &["open", &s.env.vm("j-m1"), "rdwr"]);
    s.check("Jails: jailed root opens a VM of its jail (root DAC) -> OK", "OK", r);
    let r = s.probe(Who::user(MEMBER1), &["write", &ctl, "destroy j-m1"]);
    s.check("Jails: same euid on the host (other jail) destroys jail VM -> EPERM", "EPERM", r);
    let r = s.probe(jroot, &["write", &ctl, "destroy j-m1"]);
    s.check("Jails: jailed root destroys another user's VM in its jail -> EPERM", "EPERM", r);
    let r = s.probe(jm1, &["write", &ctl, "destroy j-m1"]);
    s.check("Jails: creator (same euid, same jail) destroys it -> OK", "OK", r);
    let r = s.root_destroy("j-root");
    s.check("Jails: host root destroys a jail's VM -> OK", "OK", r);
    s.check("Jails: jail VM node gone after host root's destroy", "gone", s.env.gone_within(&s.env.vm("j-root"), SEC));
    drop(hr);
    drop(hm);
    drop(jail);
}

fn jail_visibility(s: &mut Suite) {
    let ctl = s.ctl();
    let jail = match s.env.jail() {
        Ok(j) => j,
        Err(e) => return s.check("Jails: start a PID namespace", "OK", e),
    };
    s.check("Jails: root grants allow.vmm", "OK", s.env.jail_cmd("allow", jail.pid, None));
    let jroot = Who::root().at(Place::Jail(jail.pid));
    let jm1 = Who::user(MEMBER1).at(Place::Jail(jail.pid));
    let r = s.root_create("v-host");
    s.check("Jails: host root creates v-host", "OK", r);
    s.check("Jails: jail stat vmm/<host VM> -> ENOENT", "ENOENT", s.probe(jroot, &["stat", &s.env.vm("v-host")]));
    s.check(
        "Jails: jail stat vmm.io/<host VM>.sysmem -> ENOENT",
        "ENOENT",
        s.probe(jroot, &["stat", &s.env.seg("v-host")]),
    );
    s.check(
        "Jails: jail open vmm/<host VM> -> ENOENT",
        "ENOENT",
        s.probe(jroot, &["open", &s.env.vm("v-host"), "rdwr"]),
    );
    let dir = s.probe(jroot, &["readdir", &s.env.vm_dir()]);
    s.check("Jails: jail ls vmm/ does not list host VMs", "not listed", listed(&dir, "v-host"));
    let dir = s.probe(jroot, &["readdir", &s.env.io_dir()]);
    s.check("Jails: jail ls vmm.io/ does not list host segments", "not listed", listed(&dir, "v-host.sysmem"));
    s.check(
        "Jails: jail destroys host VM (write) -> EINVAL (invisible)",
        "EINVAL",
        s.probe(jroot, &["write", &ctl, "destroy v-host"]),
    );
    s.check(
        "Jails: jail destroys host VM (ioctl) -> EINVAL (invisible)",
        "EINVAL",
        s.probe(jroot, &["ioctl-destroy", &ctl, "v-host"]),
    );
    let h = s.env.hold(jm1, "v-host", "write");
    s.check(
        "Jails: jail creates a name a host VM uses -> OK (collides only in its jail)",
        "OK",
        h.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    drop(h);
    let h = s.env.hold(jm1, "v-jail", "write");
    s.check(
        "Jails: jailed member creates v-jail",
        "OK",
        h.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    s.check("Jails: host create of a jail VM's name -> EEXIST (visible to host)", "EEXIST", s.root_create("v-jail"));
    let r = s.root_destroy("v-host");
    s.check("Jails: host root destroys v-host", "OK", r);
    drop(h);
    drop(jail);
}

fn two_jails(s: &mut Suite) {
    let ctl = s.ctl();
    let (a, b) = match (s.env.jail(), s.env.jail()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return s.check("Jails: start two PID namespaces", "OK", e),
    };
    s.check("Jails: grant jail A", "OK", s.env.jail_cmd("allow", a.pid, None));
    s.check("Jails: grant jail B", "OK", s.env.jail_cmd("allow", b.pid, None));
    let am = Who::user(MEMBER1).at(Place::Jail(a.pid));
    let bm = Who::user(MEMBER1).at(Place::Jail(b.pid));
    let ha = s.env.hold(am, "w-same", "write");
    s.check("Jails: jail A creates w-same", "OK", ha.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()));
    let hb = s.env.hold(bm, "w-same", "write");
    s.check(
        "Jails: jail B creates the same name -> OK",
        "OK",
        hb.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    let hb2 = s.env.hold(bm, "w-bonly", "write");
    s.check(
        "Jails: jail B creates w-bonly",
        "OK",
        hb2.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    let dir = s.probe(am, &["readdir", &s.env.vm_dir()]);
    s.check("Jails: jail A does not list jail B's VMs", "not listed", listed(&dir, "w-bonly"));
    s.check("Jails: jail A stat jail B's VM -> ENOENT", "ENOENT", s.probe(am, &["stat", &s.env.vm("w-bonly")]));
    s.check("Jails: jail A destroy jail B's VM -> EINVAL", "EINVAL", s.probe(am, &["write", &ctl, "destroy w-bonly"]));
    let r = s.probe(bm, &["write", &ctl, "destroy w-same"]);
    s.check("Jails: jail B destroys its w-same -> OK", "OK", r);
    s.check("Jails: jail A's w-same unaffected", "exists", exists(&s.probe(am, &["stat", &s.env.vm("w-same")])));
    drop((ha, hb, hb2));
    drop((a, b));
}

fn jail_revoke(s: &mut Suite) {
    let ctl = s.ctl();
    let jail = match s.env.jail() {
        Ok(j) => j,
        Err(e) => return s.check("Jails: start a PID namespace", "OK", e),
    };
    s.check("Jails: grant allow.vmm", "OK", s.env.jail_cmd("allow", jail.pid, None));
    let jm1 = Who::user(MEMBER1).at(Place::Jail(jail.pid));
    let h = s.env.hold(jm1, "k-rev", "write");
    s.check(
        "Jails: jailed member creates k-rev",
        "OK",
        h.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    s.check("Jails: revoke allow.vmm (vmmfs jail revoke --pid)", "OK", s.env.jail_cmd("revoke", jail.pid, None));
    s.check("Jails: after revoke, jail open vmmctl -> EPERM", "EPERM", s.probe(jm1, &["open", &ctl, "rdwr"]));
    s.check(
        "Jails: after revoke, jail open its own vmm/NAME -> EPERM",
        "EPERM",
        s.probe(jm1, &["open", &s.env.vm("k-rev"), "rdwr"]),
    );
    s.check("Jails: the host still sees the revoked jail's VM", "exists", exists(&s.env.stat(&s.env.vm("k-rev"))));
    s.check("Jails: grant again", "OK", s.env.jail_cmd("allow", jail.pid, None));
    s.check("Jails: after re-grant, jail opens vmmctl -> OK", "OK", s.probe(jm1, &["open", &ctl, "rdwr"]));
    drop(h);
    s.check("Jails: jail VM destroyed with its holder", "gone", s.env.gone_within(&s.env.vm("k-rev"), SEC));
    s.check("Jails: revoke again (cleanup)", "OK", s.env.jail_cmd("revoke", jail.pid, None));
    drop(jail);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_helpers() {
        assert_eq!(listed("OK a,b", "b"), "listed");
        assert_eq!(listed("OK ab", "b"), "not listed");
        assert_eq!(listed("OK", "b"), "not listed");
        assert_eq!(listed("EACCES", "b"), "EACCES");
        assert_eq!(exists("OK uid=0"), "exists");
        assert_eq!(exists("ENOENT"), "ENOENT");
    }

    #[test]
    fn group_names_unique() {
        let mut names: Vec<&str> = GROUPS.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), GROUPS.len());
    }
}
