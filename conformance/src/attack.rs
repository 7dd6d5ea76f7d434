//! What a hostile member tries (SPEC.md "Authority"): lending a set-uid
//! program's authority, taking root's descriptors, handing a VM its own
//! files, freezing the daemon. The probes run as the attacker (their
//! operations are in attack_probes.rs); the set-uid helper is a root-owned
//! 04755 copy of this executable (`conformance setid-helper ...`), made by
//! the suite, so no sudo is needed.

use crate::harness::{Holder, Place, Who, MAX_VMS, MEMBER1, MEMBER2};
use crate::suite::Suite;
use std::time::{Duration, Instant};

/// Make (once) the set-uid-root helper: a root-owned 04755 copy of this
/// executable in the world-searchable temporary directory.
fn helper(s: &mut Suite) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = s.env.base.join("setid");
    let path = dir.join("conformance-setuid");
    let made = (|| -> std::io::Result<()> {
        if !path.exists() {
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            std::fs::copy(&s.env.exe, &path)?;
            std::os::unix::fs::chown(&path, Some(0), Some(0))?;
        }
        // chmod after chown: chown clears the set-uid bit.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4755))
    })();
    let path = path.to_string_lossy().into_owned();
    if let Err(e) = made {
        s.check("Authority: make a set-uid-root test helper", "OK", e.to_string());
        return None;
    }
    let r = s.probe(Who::user(MEMBER1), &["exec", &path, "setid-helper", "write", "1", ""]);
    s.check("Authority: the set-uid helper runs with euid 0 when a member runs it", "OK", r.clone());
    (r == "OK").then_some(path)
}

fn present(s: &Suite, path: &str) -> String {
    if s.env.stat(path).starts_with("OK ") {
        "exists".into()
    } else {
        "absent".into()
    }
}

/// SPEC "Authority" 1: a set-id program's write to a member's descriptor.
pub fn authority(s: &mut Suite) {
    let Some(h) = helper(s) else { return };
    let ctl = s.env.ctl();
    let m1 = Who::user(MEMBER1);
    let log_from = s.env.log_len();
    let r = s.probe(Who::root(), &["write", &ctl, "create au-root"]);
    s.check("Authority: root creates au-root", "OK", r);
    let r = s.probe(m1, &["setid-write", &h, &ctl, "destroy au-root"]);
    s.check("Authority: set-uid-root program writes 'destroy au-root' to a member's vmmctl -> EPERM", "EPERM", r);
    s.check("Authority: root's au-root survives", "exists", present(s, &s.env.vm("au-root")));
    let r = s.probe(m1, &["setid-write", &h, &ctl, "create au-persist"]);
    s.check("Authority: set-uid-root program writes 'create au-persist' (persistent) -> EPERM", "EPERM", r);
    s.check("Authority: no VM au-persist", "absent", present(s, &s.env.vm("au-persist")));
    let state = s.env.state_dir.join("state").to_string_lossy().into_owned();
    for (name, text, what) in [
        ("au-vm1", "bootrom {H}", "as bootrom"),
        ("au-vm2", "device 3 virtio-blk fd={H}", "as a disk"),
        ("au-vm3", "com1 {H} {H}", "as a console"),
    ] {
        let r = s.probe(m1, &["setid-vm", &h, &ctl, name, text, &state]);
        s.check(
            &format!("Authority: set-uid-root program names a root-only file {what} on a member's vm/NAME -> EPERM"),
            "EPERM",
            r,
        );
    }
    let r = s.probe(m1, &["handover", &ctl, "au-vm4", "unsent"]);
    s.check("Authority: a command naming a descriptor that was never handed over -> EBADF", "EBADF", r);
    let r = s.probe(m1, &["handover", &ctl, "au-vm5", "setid", &h, &state]);
    s.check(
        "Authority: set-uid-root program sends a root-only file on a member's hand-over socket -> EPERM",
        "EPERM",
        r,
    );
    let log = s.env.log_since(log_from);
    let logged = log.contains("its credentials are not those of the handle's opener (effective uid");
    s.check(
        "Authority: each refusal is logged with both credentials",
        "logged",
        if logged { "logged" } else { "not logged" },
    );
    s.root_destroy("au-root");
}

/// SPEC "Authority" 2/3: only descriptors a device can use, never vmmfs's own.
pub fn handover(s: &mut Suite) {
    let ctl = s.env.ctl();
    let m1 = Who::user(MEMBER1);
    for (what, extra, expect, why) in [
        ("own-ctl", None, "EINVAL", "its own vmmctl descriptor"),
        ("own-vm", None, "EINVAL", "its own vm/NAME descriptor"),
        ("datagram", None, "EINVAL", "a datagram socket"),
        ("file", Some("/etc/passwd"), "OK", "a regular file it can read"),
        ("pipe-bootrom", None, "EINVAL", "a pipe, then 'bootrom' names it (an image must be a regular file)"),
    ] {
        let name = format!("ho-{what}");
        let mut args = vec!["handover", &ctl, &name, what];
        args.extend(extra);
        let r = s.probe(m1, &args);
        s.check(&format!("Hand-over: a member hands its VM {why} -> {expect}"), expect, r);
    }
    // Monitor mode cannot be escaped through the VM's own files.
    let Some(g) = crate::tools::guests(s) else { return };
    let com2 = format!("com2,{ctl}");
    let end = crate::tools::run_bhyve(s, m1, &["-M", "-l", &com2], &g.join("hello.rom"), "ho-escape");
    let msg = crate::tools::message(&end.stderr);
    let obs = format!(
        "{}; {}; {}",
        end.status,
        if msg.contains("vmmfs mount") { "refused: vmmfs's own file" } else { &msg },
        crate::tools::ls_after(s, "ho-escape")
    );
    s.check(
        "Hand-over: bhyve -M -l com2,vmmctl (the VM's own vmmctl as a console) -> 4, VM gone",
        "status 4; refused: vmmfs's own file; vmm/ empty",
        obs,
    );
}

fn ms_of(line: &str, key: &str) -> Option<u128> {
    line.split(' ').find_map(|w| w.strip_prefix(&format!("{key}="))).and_then(|v| v.parse().ok())
}

fn within(ms: Option<u128>, limit: u128) -> String {
    match ms {
        Some(v) if v <= limit => format!("<= {limit} ms"),
        Some(v) => format!("{v} ms"),
        None => "no time".into(),
    }
}

/// Wall time of a member's bhyve -M hello.rom, and what it printed.
fn timed_bhyve(s: &Suite, rom: &std::path::Path, name: &str) -> (u128, String) {
    let t0 = Instant::now();
    let end = crate::tools::run_bhyve(s, Who::user(MEMBER1), &["-M"], rom, name);
    let ms = t0.elapsed().as_millis();
    (ms, format!("{}; {}", end.status, crate::tools::console(&end.stdout)))
}

/// SPEC "Authority" 4: nothing a user or guest controls makes the daemon wait.
pub fn no_freeze(s: &mut Suite) {
    let Some(g) = crate::tools::guests(s) else { return };
    let (hello, multi) = (g.join("hello.rom"), g.join("multi.rom"));
    let ctl = s.env.ctl();
    let (solo, _) = timed_bhyve(s, &hello, "nf-solo");
    let m2 = Who::user(MEMBER2);
    let mut stuck: Vec<Holder> = Vec::new();
    let mut failed = Vec::new();
    let multi_s = multi.to_string_lossy().into_owned();
    let wedges: Vec<String> = (0..MAX_VMS).map(|i| format!("nf-w{i}")).collect();
    for w in &wedges {
        match s.env.start_ready(m2, &["wedge", &ctl, w, &multi_s]) {
            Ok((h, _)) => stuck.push(h),
            Err(e) => failed.push(format!("wedge {w}: {e}")),
        }
    }
    for i in 0..100 - MAX_VMS {
        let args: &[&str] = if i % 2 == 0 { &["stuck-connect", &ctl] } else { &["hold-open", &ctl] };
        match s.env.start_ready(m2, args) {
            Ok((h, _)) => stuck.push(h),
            Err(e) => failed.push(e),
        }
    }
    s.check(
        "No freeze: 100 stuck clients of vmmtest2 (3 guests printing to full console pipes, idle hand-over connections, held vmmctl)",
        "100 running",
        if failed.is_empty() { format!("{} running", stuck.len()) } else { failed.join(" / ") },
    );
    // Let the wedged guests fill their console pipes.
    std::thread::sleep(Duration::from_millis(1500));
    let r = s.probe(Who::root(), &["timed-create-destroy", &ctl, "nf-root"]);
    s.check("No freeze: root's create completes within 100 ms", "<= 100 ms", within(ms_of(&r, "create"), 100));
    s.check("No freeze: root's destroy completes within 100 ms", "<= 100 ms", within(ms_of(&r, "destroy"), 100));
    // A whole bhyve run spawns processes (a debug build, on a loaded CI
    // machine too): the bound says "not waiting on anyone", with room for
    // the machine's noise; a frozen daemon would take seconds or forever.
    let (ms, out) = timed_bhyve(s, &hello, "nf-m1");
    let bound = solo + 1000;
    s.check(
        "No freeze: vmmtest1's bhyve -M hello.rom runs, within 1 s of its unloaded time",
        format!("status 1; {}; <= {bound} ms", crate::tools::console("hello from bootrom\n")),
        format!("{out}; {}", if ms <= bound { format!("<= {bound} ms") } else { format!("{ms} ms") }),
    );
    let r = s.probe(Who::root(), &["timed-write", &ctl, "destroy nf-w0"]);
    s.check("No freeze: root destroys a wedged guest's VM within 100 ms", "<= 100 ms", within(ms_of(&r, "ms"), 100));
    for mut h in stuck {
        h.release();
    }
    let gone: Vec<String> = wedges.iter().filter(|w| present(s, &s.env.vm(w)) == "exists").cloned().collect();
    s.check(
        "No freeze: the wedged VMs are gone once their clients exit",
        "none left",
        if gone.is_empty() { "none left".into() } else { gone.join(",") },
    );
}

/// SPEC vmmctl "create": FreeBSD's order of checks.
pub fn check_order(s: &mut Suite) {
    let ctl = s.env.ctl();
    s.probe(Who::root(), &["write", &ctl, "create ord"]);
    let r = s.probe(Who::user(MEMBER1), &["write", &ctl, "create ord"]);
    s.check("Order: unprivileged non-transient create of an existing name -> EEXIST (lookup first)", "EEXIST", r);
    let r = s.probe(Who::user(MEMBER1), &["write", &ctl, "create ord-new"]);
    s.check("Order: unprivileged non-transient create of a new name -> EPERM", "EPERM", r);
    s.root_destroy("ord");
}

/// SPEC "Authority" limits.
pub fn limits(s: &mut Suite) {
    let ctl = s.env.ctl();
    let m1 = Who::user(MEMBER1);
    for (name, cmd, expect, why) in [
        ("li-mem", "memory 1T", "ENOMEM", "guest memory over the per-user limit"),
        ("li-cpu", "cpus 255", "EINVAL", "more vCPUs than hw.vmm.maxcpu"),
    ] {
        let r = s.probe(m1, &["vm-cmd", &ctl, name, cmd]);
        s.check(&format!("Limits: '{cmd}' ({why}) -> {expect}"), expect, r);
    }
    let r = s.probe(m1, &["vm-devices", &ctl, "li-dev", "40"]);
    s.check("Limits: 40 devices on one VM -> the 33rd is refused (EINVAL)", "OK 32 then EINVAL", r);
    let r = s.probe(m1, &["handover-many", &ctl, "li-fds", "17"]);
    s.check("Limits: 17 descriptors waiting on one handle -> EMFILE", "OK 16 then EMFILE", r);
}

/// SPEC "Authority" jails: grants follow a namespace, not a reusable number.
pub fn jail_reuse(s: &mut Suite) {
    let ctl = s.env.ctl();
    let jail = match s.env.jail() {
        Ok(j) => j,
        Err(e) => return s.check("Jail reuse: start a PID namespace", "OK", e),
    };
    s.check("Jail reuse: root grants allow.vmm", "OK", s.env.jail_cmd("allow", jail.pid, None));
    let ns = crate::harness::pidns_of(jail.pid);
    // Many namespaces alive at once, so that the kernel hands out numbers
    // above its lowest free one too.
    let crowd = |s: &Suite| -> Vec<crate::harness::Jail> { (0..40).filter_map(|_| s.env.jail().ok()).collect() };
    let others = crowd(s);
    let clash = others.iter().filter(|j| crate::harness::pidns_of(j.pid) == ns).count();
    s.check("Jail reuse: while the granted jail lives, no new namespace gets its number", "0", clash.to_string());
    drop(others);
    drop(jail);
    let listed = s.env.jail_list();
    let dead = ns.is_some_and(|n| listed.contains(&format!("ns={n} ")));
    s.check(
        "Jail reuse: a dead jail's grant is gone from 'vmmfs jail list'",
        "not listed",
        if dead { "listed" } else { "not listed" },
    );
    let fresh = crowd(s);
    let reused = fresh.iter().filter(|j| crate::harness::pidns_of(j.pid) == ns).count();
    let allowed =
        fresh.iter().filter(|j| s.probe(Who::root().at(Place::Jail(j.pid)), &["open", &ctl, "rdwr"]) == "OK").count();
    crate::harness::progress(&format!("  ({} fresh namespaces, {reused} with the dead jail's number)", fresh.len()));
    s.check(
        "Jail reuse: 40 fresh namespaces (any reusing the dead jail's number included) open vmmctl -> none allowed",
        "0 allowed",
        format!("{allowed} allowed"),
    );
}

/// SPEC "Authority": names are unambiguous in every view.
pub fn names_unambiguous(s: &mut Suite) {
    let ctl = s.env.ctl();
    let jail = match s.env.jail() {
        Ok(j) => j,
        Err(e) => return s.check("Names: start a PID namespace", "OK", e),
    };
    s.env.jail_cmd("allow", jail.pid, None);
    let ns = crate::harness::pidns_of(jail.pid).unwrap_or(0);
    let shadow = format!("dup@{ns}");
    s.probe(Who::root(), &["write", &ctl, "create dup"]);
    let held = s.env.hold(Who::root().at(Place::Jail(jail.pid)), "dup", "write");
    s.check(
        "Names: host has 'dup'; the jail creates its own 'dup'",
        "OK",
        held.as_ref().map(|_| "OK".to_string()).unwrap_or_else(|e| e.clone()),
    );
    let ls = s.env.readdir(&s.env.vm_dir());
    s.check("Names: the host lists both, the jail's as dup@NS", format!("OK dup,{shadow}"), ls);
    let r = s.probe(Who::root(), &["write", &ctl, &format!("create {shadow}")]);
    s.check("Names: the host cannot create a VM named like the shown dup@NS -> EEXIST", "EEXIST", r);
    let r = s.probe(Who::root(), &["write", &ctl, &format!("destroy {shadow}")]);
    s.check("Names: root destroys dup@NS -> the jail's VM", "OK", r);
    s.check("Names: the host's dup survives", "exists", present(s, &s.env.vm("dup")));
    if let Ok(mut h) = held {
        h.release();
    }
    // The other way round: a host VM named NAME@NS exists first.
    s.probe(Who::root(), &["write", &ctl, "create y"]);
    s.probe(Who::root(), &["write", &ctl, &format!("create y@{ns}")]);
    let r = s.probe(Who::root().at(Place::Jail(jail.pid)), &["write", &ctl, "create y destroy-on-close"]);
    s.check("Names: a jail's 'y' that the host would show as an existing y@NS -> EEXIST", "EEXIST", r);
    for n in ["dup", "y", &format!("y@{ns}")] {
        s.root_destroy(n);
    }
    s.env.jail_cmd("revoke", jail.pid, None);
}

/// SPEC "Resources used by bhyve": allow.vmm_ppt is checked.
pub fn ppt(s: &mut Suite) {
    let ctl = s.env.ctl();
    let jail = match s.env.jail() {
        Ok(j) => j,
        Err(e) => return s.check("ppt: start a PID namespace", "OK", e),
    };
    s.env.jail_cmd("allow", jail.pid, None);
    let jroot = Who::root().at(Place::Jail(jail.pid));
    let r = s.probe(jroot, &["vm-cmd", &ctl, "ppt1", "device 5 passthru 1/0/0"]);
    s.check("ppt: passthru in a jail with allow.vmm only -> EPERM", "EPERM", r);
    s.env.jail_cmd("allow-ppt", jail.pid, None);
    let r = s.probe(jroot, &["vm-cmd", &ctl, "ppt2", "device 5 passthru 1/0/0"]);
    s.check("ppt: passthru with allow.vmm_ppt -> past the jail check (EOPNOTSUPP: no IOMMU support)", "EOPNOTSUPP", r);
    s.env.jail_cmd("revoke", jail.pid, None);
}

/// Issue "fair and predictable": one daemon per state directory and mount point.
pub fn single_instance(s: &mut Suite) {
    let vmmfs = s.env.vmmfs.clone();
    let second = |state: &std::path::Path, mnt: &std::path::Path| -> String {
        let child = std::process::Command::new(&vmmfs)
            .args(["--group", crate::harness::GROUP, "--state-dir"])
            .arg(state)
            .arg(mnt)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return format!("spawn: {e}"),
        };
        let Some(st) = crate::harness::wait_timeout(&mut child, Duration::from_secs(10)) else {
            // It is serving: stop it, and take its mount away if it made one.
            crate::harness::kill_and_reap(&mut child);
            return "started (a second daemon is serving)".into();
        };
        let mut e = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut e);
        }
        if e.contains("another vmmfs daemon") {
            "refused: state directory in use".into()
        } else if e.contains("already a vmmfs mount") {
            "refused: already mounted".into()
        } else {
            format!("exited {st}: {}", e.lines().last().unwrap_or(""))
        }
    };
    let other_mnt = s.env.base.join("mnt2");
    let _ = std::fs::create_dir_all(&other_mnt);
    let r = second(&s.env.state_dir.clone(), &other_mnt);
    s.check("Single instance: a second daemon on the same state directory exits", "refused: state directory in use", r);
    let other_state = s.env.base.join("state2");
    let r = second(&other_state, &s.env.mount.clone());
    s.check("Single instance: a second daemon on the same mount point exits", "refused: already mounted", r);
    let r = s.probe(Who::root(), &["write", &s.env.ctl(), "create si"]);
    s.check("Single instance: the first daemon still serves", "OK", r);
    s.root_destroy("si");
}

/// Issue "fair and predictable" 4: destroy-on-close is done when the owner is reaped.
pub fn reuse_after_exit(s: &mut Suite) {
    // About 10 s on an idle 2-core machine.
    let r =
        s.env.probe_within(Who::user(MEMBER1), &["reuse-loop", &s.env.ctl(), "rx", "10000"], Duration::from_secs(120));
    s.check(
        "Destroy-on-close: 10000 x (child creates rx destroy-on-close and exits; create again once reaped) -> never EEXIST",
        "OK n=10000 eexist=0 other=0",
        r,
    );
}

/// Issue "fair and predictable" 1: root keeps its way in whatever a user holds.
pub fn root_reserve(s: &mut Suite) {
    let ctl = s.env.ctl();
    let m2 = Who::user(MEMBER2);
    let mut held = Vec::new();
    let filled = s.env.start_ready(m2, &["fill", &ctl, "rr"]);
    let vms = match filled {
        Ok((h, rest)) => {
            held.push(h);
            rest
        }
        Err(e) => e,
    };
    s.check("Root reserve: vmmtest2 creates VMs until its limit", format!("{MAX_VMS} ENOMEM"), vms);
    let (mut conns, mut refused) = (0, 0);
    for _ in 0..40 {
        if let Ok((h, how)) = s.env.start_ready(m2, &["stuck-connect", &ctl]) {
            held.push(h);
            match how.as_str() {
                "connected" => conns += 1,
                _ => refused += 1,
            }
        }
    }
    let r = s.probe(m2, &["open-many", &ctl, "5000"]);
    // The filling probe holds one handle of the 4096 already.
    s.check(
        "Root reserve: vmmtest2 opens vmmctl 5000 times -> refused at its limit of 4096 handles",
        "OK 4095 then EMFILE",
        r,
    );
    s.check(
        "Root reserve: vmmtest2 opens 40 idle hand-over connections -> 32 held, the rest refused",
        "32 held, 8 refused",
        format!("{conns} held, {refused} refused"),
    );
    let ls = s.env.readdir(&s.env.vm_dir());
    s.check(
        "Root reserve: root lists vmm/",
        format!("OK {}", (0..MAX_VMS).map(|i| format!("rr{i}")).collect::<Vec<_>>().join(",")),
        ls,
    );
    let results: Vec<String> = (0..MAX_VMS).map(|i| s.root_destroy(&format!("rr{i}"))).collect();
    s.check("Root reserve: root destroys each of vmmtest2's VMs", ["OK"; MAX_VMS].join(","), results.join(","));
    for mut h in held {
        h.release();
    }
}

/// SPEC "Authority": SIGTERM always completes within 5 s.
pub fn sigterm(s: &mut Suite) {
    let Some(g) = crate::tools::guests(s) else { return };
    let multi = g.join("multi.rom").to_string_lossy().into_owned();
    let ctl = s.env.ctl();
    let m2 = Who::user(MEMBER2);
    let mut stuck: Vec<Holder> = Vec::new();
    for i in 0..MAX_VMS {
        if let Ok((h, _)) = s.env.start_ready(m2, &["wedge", &ctl, &format!("st-w{i}"), &multi]) {
            stuck.push(h);
        }
    }
    for i in 0..20 {
        let args: &[&str] = if i % 2 == 0 { &["stuck-connect", &ctl] } else { &["hold-open", &ctl] };
        if let Ok((h, _)) = s.env.start_ready(m2, args) {
            stuck.push(h);
        }
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (status, took) = s.env.terminate(Duration::from_secs(10));
    let obs = if took <= Duration::from_secs(5) {
        format!("{status} within 5 s")
    } else {
        format!("{status} after {took:?}")
    };
    s.check("SIGTERM: with wedged guests and 20 stuck clients, vmmfs exits 0 within 5 s", "status 0 within 5 s", obs);
    let mounted = crate::harness::is_mounted(&s.env.mount);
    s.check("SIGTERM: the mount is gone", "unmounted", if mounted { "mounted" } else { "unmounted" });
    for mut h in stuck {
        h.release();
    }
    crate::harness::unmount(&s.env.mount);
    let r = s.env.start();
    s.check("SIGTERM: vmmfs starts again on the same state", "OK", r.err().unwrap_or_else(|| "OK".into()));
}

/// What the daemon holds: descriptors (and memfds among them), threads, and
/// passt processes on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    fds: usize,
    memfds: usize,
    threads: usize,
    passt: usize,
}

/// [`held`] once the daemon is at rest: the same for half a second (after
/// a destroy the daemon refills its spare workers in the background, a
/// moment of one more thread and descriptor), or after 5 s whatever it is.
fn steady_held(pid: u32) -> Held {
    let end = Instant::now() + Duration::from_secs(5);
    let mut last = held(pid);
    let mut same = 0;
    while same < 5 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let now = held(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

fn held(pid: u32) -> Held {
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|st| st.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0);
    let passt = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "passt"))
                .count()
        })
        .unwrap_or(0);
    Held { fds: links.len(), memfds: links.iter().filter(|l| l.contains("memfd:")).count(), threads, passt }
}

/// Bounded kill storm (issue "fair and predictable"): 4 users start bhyve -M
/// (some with slirp networking) and raw transient clients while random
/// SIGKILLs hit bhyve parents, their monitor children and the clients; then
/// nothing may be left: VMs, descriptors, memfds, threads, passt processes.
pub fn kill_storm(s: &mut Suite) {
    let Some(g) = crate::tools::guests(s) else { return };
    let rom = g.join("multi.rom");
    let Some(pid) = s.env.daemon_pid() else { return };
    // The engine keeps /dev/kvm open from its first VM on: make that happen first.
    s.probe(Who::root(), &["timed-create-destroy", &s.env.ctl(), "ks-warm"]);
    let before = steady_held(pid);
    let seed = crate::tools::seed();
    crate::harness::progress(&format!("  kill-storm: seed {seed:#x} (CONFORMANCE_SEED repeats it)"));
    let mut rng = crate::tools::Rng(seed);
    let users = [Who::root(), Who::user(MEMBER1), Who::user(MEMBER2), Who::user(MEMBER1).with_ruid(60123)];
    enum Live {
        Bhyve(crate::harness::Tool),
        Client(Holder),
    }
    let mut live: Vec<Live> = Vec::new();
    let (mut kills, mut started) = (0, 0);
    let t0 = Instant::now();
    let mut i = 0u64;
    while t0.elapsed() < STORM {
        i += 1;
        let who = users[rng.index(users.len())];
        match rng.below(10) {
            0..=3 if live.len() < 12 => {
                let name = format!("ks{i}");
                let net = rng.below(4) == 0;
                let extra: Vec<&str> = if net { vec!["-M", "-s", "3,virtio-net,slirp"] } else { vec!["-M"] };
                let args = crate::tools::bhyve_args(&extra, &rom, &name);
                if let Ok(t) = s.env.tool(who, "bhyve", &crate::tools::strs(&args)) {
                    live.push(Live::Bhyve(t));
                    started += 1;
                }
            }
            4..=5 if live.len() < 12 => {
                if let Ok(h) = s.env.hold(who, &format!("kc{i}"), if rng.below(2) == 0 { "write" } else { "ioctl" }) {
                    live.push(Live::Client(h));
                    started += 1;
                }
            }
            _ if !live.is_empty() => {
                let k = rng.index(live.len());
                match &mut live[k] {
                    Live::Bhyve(t) => {
                        // The monitor child, or the parent.
                        let kid = crate::harness::children_of(t.pid()).first().copied();
                        match kid.filter(|_| rng.below(2) == 0) {
                            Some(c) => {
                                // A process of bhyve's, which we started.
                                crate::harness::kill(c, libc::SIGKILL);
                                let _ = t.wait(Duration::from_secs(5));
                            }
                            None => t.sigkill(),
                        }
                    }
                    Live::Client(h) => h.sigkill(),
                }
                live.swap_remove(k);
                kills += 1;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(rng.below(60)));
    }
    for l in &mut live {
        match l {
            Live::Bhyve(t) => t.sigkill(),
            Live::Client(h) => h.sigkill(),
        }
        kills += 1;
    }
    drop(live);
    crate::harness::progress(&format!("  kill-storm: {started} started, {kills} SIGKILLs"));
    let settled = |s: &Suite| s.leftovers().is_empty() && held(pid) == before;
    let end = Instant::now() + Duration::from_secs(10);
    while !settled(s) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    s.check("Kill storm: 4 users, random SIGKILLs of bhyve parents, children and raw clients -> no VM left", "none", {
        let l = s.leftovers();
        if l.is_empty() {
            "none".into()
        } else {
            l.join(",")
        }
    });
    let after = held(pid);
    s.check(
        "Kill storm: the daemon's descriptors, memfds and threads and the passt processes are back to where they were",
        format!("{before:?}"),
        format!("{after:?}"),
    );
    let alive = if s.env.daemon_alive() { "alive" } else { "dead" };
    s.check("Kill storm: the daemon is alive", "alive", alive);
}

/// How long the kill storm starts and kills.
const STORM: Duration = Duration::from_secs(40);
