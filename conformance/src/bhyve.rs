//! The bhyve groups: `bhyve` and `bhyvectl` (bhyve-compat) run as the real
//! users, on the host and in jails, against the mount under test
//! (`VMM_DEV_DIR`), booting the engine's test guests (vmm-engine/guests):
//! SPEC.md "bhyve exit status", "Monitor mode", "Resources used by bhyve",
//! "Jails". Each row reports the exit status, the message and what root's
//! `ls vmm/` shows afterwards.

use crate::harness::{children_of, exited_within, progress, Place, Who, MEMBER1, MEMBER2, OUTSIDER};
use crate::suite::Suite;
use crate::tools::{
    bhyve_args, cleanup, console, guests, ls, ls_after, ls_text, message, multi, no_trace_within, outcome, run_bhyve,
    seed, strs, Rng, GONE, READY, RUN,
};
use std::path::Path;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- exit statuses

/// SPEC "bhyve exit status" / "Monitor mode": a member's bhyve -M to each status.
pub fn exit_status(s: &mut Suite) {
    let Some(g) = guests(s) else { return };
    let (hello, multi_rom) = (g.join("hello.rom"), g.join("multi.rom"));
    let m1 = Who::user(MEMBER1);

    let end = run_bhyve(s, m1, &["-M"], &hello, "be-hello");
    let obs =
        format!("{}; {}; {}; {}", end.status, message(&end.stderr), console(&end.stdout), ls_after(s, "be-hello"));
    s.check(
        "bhyve: vmmtest1 bhyve -M hello.rom -> powered off (1)",
        format!("status 1; no message; {}; vmm/ empty", console("hello from bootrom\n")),
        obs,
    );
    cleanup(s, "be-hello");

    // -U: FreeBSD's one UUID form becomes the guest's SMBIOS UUID; anything
    // else ends bhyve before the guest runs, as bhyve's smbios_build does.
    for (uuid, status, said, out) in [
        ("3b1a2c4d-0000-4000-8000-000000000001", 1, "no message", "hello from bootrom\n"),
        ("not-a-uuid", 4, "says why", ""),
    ] {
        let end = run_bhyve(s, m1, &["-M", "-U", uuid], &hello, "be-uuid");
        let msg = message(&end.stderr);
        let msg = if status == 4 && msg.contains("is not a UUID") { "says why".into() } else { msg };
        s.check(
            &format!("bhyve: vmmtest1 bhyve -M -U {uuid} hello.rom -> {status}"),
            format!("status {status}; {said}; {}; vmm/ empty", console(out)),
            format!("{}; {msg}; {}; {}", end.status, console(&end.stdout), ls_after(s, "be-uuid")),
        );
        cleanup(s, "be-uuid");
    }

    // multi.rom's letters (vmm-engine/guests/multi.s). 'n' is int3 at CPL0,
    // which KVM cannot emulate here: an engine error exit.
    for (cmd, status, what) in [
        ("p", 1, "powers off (PM1a)"),
        ("h", 2, "halts (cli; hlt)"),
        ("t", 3, "triple-faults"),
        ("n", 4, "hits an instruction KVM cannot emulate"),
    ] {
        let name = format!("be-{cmd}");
        let case = format!("bhyve: vmmtest1 bhyve -M multi.rom, guest {what} -> {status}");
        let mut t = match multi(s, m1, &multi_rom, &name) {
            Ok(t) => t,
            Err(e) => {
                s.check(&case, "ready", e);
                cleanup(s, &name);
                continue;
            }
        };
        if cmd == "p" {
            s.check("bhyve: ls vmm/ shows vmmtest1's running bhyve -M VM", format!("vmm/ {name}"), ls(s));
            let st = s.probe(Who::root(), &["stat", &s.env.vm(&name)]);
            s.check(
                "bhyve: vmm/NAME of a member's bhyve -M is vmmtest1:vmm 0600",
                format!("OK uid={} gid={} mode=0600 type=file", s.env.users.m1.uid, s.env.users.vmm_gid),
                st,
            );
        }
        t.send(cmd);
        let st = t.wait(RUN);
        // An error exit (status 4) is explained on stderr; the others are quiet.
        let said = message(&t.stderr());
        let said =
            if status == 4 && said.starts_with(&format!("bhyve: vm {name}: ")) { "says why".into() } else { said };
        let quiet = if status == 4 { "says why" } else { "no message" };
        let obs = format!("{st}; {said}; {}; {}", console(&t.stdout()), ls_after(s, &name));
        s.check(&case, format!("status {status}; {quiet}; {}; vmm/ empty", console("ready\n")), obs);
        cleanup(s, &name);
    }

    // Guest reboot: the monitor re-initialises the VM and boots it again.
    for (cmd, how) in [("r", "reset via 0xcf9"), ("k", "reset via the i8042")] {
        let name = format!("be-reboot-{cmd}");
        let case = format!("bhyve -M: guest reboot ({how}) -> re-initialised, boots again, bhyve keeps running");
        let mut t = match multi(s, m1, &multi_rom, &name) {
            Ok(t) => t,
            Err(e) => {
                s.check(&case, "ready", e);
                cleanup(s, &name);
                continue;
            }
        };
        t.send(cmd);
        let again = if t.wait_output("ready", 2, READY) { "booted again" } else { "not booted again" };
        let alive = if t.running() { "bhyve running".to_string() } else { format!("bhyve exited ({})", t.wait(RUN)) };
        s.check(&case, format!("booted again; bhyve running; vmm/ {name}"), format!("{again}; {alive}; {}", ls(s)));
        t.send("p");
        let st = t.wait(RUN);
        let obs = format!("{st}; {}; {}; {}", message(&t.stderr()), console(&t.stdout()), ls_after(s, &name));
        s.check(
            &format!("bhyve -M: after the reboot ({cmd}) the guest powers off -> 1, its output twice"),
            format!("status 1; no message; {}; vmm/ empty", console("ready\nready\n")),
            obs,
        );
        cleanup(s, &name);
    }
}

// ---------------------------------------------------------------- SIGKILL

const KILL_ITERATIONS: u64 = 12;
/// The group stops starting iterations after this long.
const KILL_BUDGET: Duration = Duration::from_secs(30);

/// SIGKILL to bhyve, which we started, or its monitor child.
fn sigkill_pid(pid: u32) {
    crate::harness::kill(pid, libc::SIGKILL);
}

/// The first child of `parent` within `limit`.
fn child_within(parent: u32, limit: Duration) -> Option<u32> {
    let end = Instant::now() + limit;
    loop {
        if let Some(c) = children_of(parent).first().copied() {
            return Some(c);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// SPEC "Monitor mode": SIGKILL of either bhyve process, at random moments,
/// never leaks the VM: vmm/ and vmm.io/ have no trace of it within 1 s.
pub fn sigkill(s: &mut Suite) {
    let Some(g) = guests(s) else { return };
    let rom = g.join("multi.rom");
    let seed = seed();
    progress(&format!("  bhyve-sigkill: seed {seed:#x} (CONFORMANCE_SEED={seed:#x} repeats these moments)"));
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut ran = 0;
    for i in 0..KILL_ITERATIONS {
        if start.elapsed() > KILL_BUDGET {
            break;
        }
        ran += 1;
        let kill_child = rng.below(2) == 1;
        let moment = rng.below(3);
        let ms = rng.below(if moment == 0 { 80 } else { 250 });
        let name = format!("bk-{i}");
        let mut t = match s.env.tool(Who::user(MEMBER1), "bhyve", &strs(&bhyve_args(&["-M"], &rom, &name))) {
            Ok(t) => t,
            Err(e) => {
                s.check(&format!("bhyve -M SIGKILL #{i}: start bhyve"), "OK", e);
                continue;
            }
        };
        // Right after exec (maybe before the VM exists), at the prompt, or
        // while the monitor re-initialises the VM after a guest reboot.
        let when = match moment {
            0 => format!("{ms}ms after start"),
            1 => {
                t.wait_output("ready", 1, READY);
                format!("ready+{ms}ms")
            }
            _ => {
                t.wait_output("ready", 1, READY);
                t.send("r");
                format!("reboot+{ms}ms")
            }
        };
        std::thread::sleep(Duration::from_millis(ms));
        let bhyve = t.pid();
        let (victim, expected) = if kill_child {
            ("child", "no trace within 1000ms; bhyve status 4")
        } else {
            ("parent", "no trace within 1000ms; monitor child exited")
        };
        let case = format!("bhyve -M: SIGKILL {victim} at {when} (seed {seed:#x} #{i})");
        let observed = if kill_child {
            // The child exists once the VM is created and configured.
            match child_within(bhyve, READY) {
                Some(c) => {
                    sigkill_pid(c);
                    let gone = no_trace_within(s, &name, GONE);
                    format!("{gone}; bhyve {}", t.wait(Duration::from_secs(5)))
                }
                None => format!("no monitor child ({}; {})", t.wait(Duration::from_secs(1)), message(&t.stderr())),
            }
        } else {
            let kids = children_of(bhyve);
            t.sigkill();
            let gone = no_trace_within(s, &name, GONE);
            let _ = t.wait(Duration::from_secs(5));
            let kids: Vec<u32> = kids.into_iter().chain(children_of(bhyve)).collect();
            let alive: Vec<String> =
                kids.iter().filter(|k| !exited_within(**k, Duration::from_secs(3))).map(|k| k.to_string()).collect();
            if alive.is_empty() {
                format!("{gone}; monitor child exited")
            } else {
                format!("{gone}; monitor child {} still running", alive.join(","))
            }
        };
        s.check(&case, expected, observed);
        drop(t);
        cleanup(s, &name);
    }
    s.check(
        &format!("bhyve -M: SIGKILL iterations within {}s", KILL_BUDGET.as_secs()),
        KILL_ITERATIONS.to_string(),
        ran.to_string(),
    );
}

// ---------------------------------------------------------------- access

/// What the invoking member gets opening /dev/vfio/vfio (SPEC: without write
/// access, "Permission denied"; a host without VFIO has no such file).
fn vfio_error(s: &Suite) -> String {
    match s.probe(Who::user(MEMBER1), &["open", "/dev/vfio/vfio", "rdwr"]).as_str() {
        "ENOENT" => "No such file or directory".into(),
        _ => "Permission denied".into(),
    }
}

/// SPEC "vmmctl", "Resources used by bhyve", "Per-VM device": who may run
/// bhyve, with what, and on whose VM.
pub fn access(s: &mut Suite) {
    let Some(g) = guests(s) else { return };
    let (hello, multi_rom) = (g.join("hello.rom"), g.join("multi.rom"));
    let ctl = s.env.ctl();
    let m1 = Who::user(MEMBER1);

    let end = run_bhyve(s, Who::user(OUTSIDER), &["-M"], &hello, "ba-out");
    s.check(
        "bhyve: vmmtest3 (not in vmm) bhyve -M -> Permission denied on vmmctl, 4",
        format!("status 4; bhyve: open {ctl}: Permission denied; vmm/ empty"),
        outcome(s, &end, "ba-out"),
    );
    cleanup(s, "ba-out");

    let end = run_bhyve(s, m1, &[], &hello, "ba-nom");
    s.check(
        "bhyve: vmmtest1 without -M -> must run in monitor mode, 4, no VM",
        "status 4; bhyve: An unprivileged user must run VMs in monitor mode; vmm/ empty",
        outcome(s, &end, "ba-nom"),
    );
    cleanup(s, "ba-nom");

    let end = run_bhyve(s, m1, &["-M", "-s", "5,passthru,1/0/0"], &hello, "ba-ppt");
    s.check(
        "bhyve: vmmtest1 -s 5,passthru,1/0/0 -> cannot open VFIO, 4, no VM",
        format!("status 4; bhyve: failed to open /dev/vfio/vfio: {}; vmm/ empty", vfio_error(s)),
        outcome(s, &end, "ba-ppt"),
    );
    cleanup(s, "ba-ppt");

    let secret = s.env.base.join("root-only.rom");
    let made = std::fs::copy(&hello, &secret).and_then(|_| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
    });
    if let Err(e) = made {
        s.check("bhyve: make a root-only bootrom", "OK", e.to_string());
    } else {
        let end = run_bhyve(s, m1, &["-M"], &secret, "ba-rom");
        s.check(
            "bhyve: vmmtest1 -M with a bootrom root:root 0600 -> OS error, 4, no VM",
            format!("status 4; bhyve: Error opening bootrom \"{}\": Permission denied; vmm/ empty", secret.display()),
            outcome(s, &end, "ba-rom"),
        );
        cleanup(s, "ba-rom");
    }

    other_users(s, &multi_rom);
}

/// One user's bhyvectl cannot touch another user's running VM; root's can.
fn other_users(s: &mut Suite, rom: &Path) {
    let m1 = Who::user(MEMBER1);
    let name = "ba-own";
    let mut t = match multi(s, m1, rom, name) {
        Ok(t) => t,
        Err(e) => {
            s.check("bhyve: vmmtest1 starts multi.rom with -M", "ready", e);
            return cleanup(s, name);
        }
    };
    t.send("z");
    let vm_arg = format!("--vm={name}");
    for op in ["--destroy", "--force-poweroff", "--get-stats"] {
        let end = s.env.run_tool(Who::user(MEMBER2), "bhyvectl", &[&vm_arg, op], RUN);
        std::thread::sleep(Duration::from_millis(100));
        let state = s.probe(Who::root(), &["read", &s.env.vm(name), "state"]);
        let alive = if t.running() { "bhyve running".to_string() } else { format!("bhyve exited ({})", t.wait(RUN)) };
        s.check(
            &format!("bhyvectl: vmmtest2 {op} on vmmtest1's running VM -> refused, guest runs on"),
            format!(
                "status 1; vm_open: {name} could not be opened: Permission denied; OK state=running; bhyve running"
            ),
            format!("{}; {}; {state}; {alive}", end.status, message(&end.stderr)),
        );
    }
    let end = s.env.run_tool(Who::root(), "bhyvectl", &[&vm_arg, "--get-stats"], RUN);
    let running =
        if end.stdout.lines().any(|l| l == "state\trunning") { "state running" } else { "no 'state\\trunning'" };
    s.check(
        "bhyvectl: root --get-stats on vmmtest1's VM -> state running",
        "status 0; state running",
        format!("{}; {running}", end.status),
    );
    let end = s.env.run_tool(Who::root(), "bhyvectl", &[&vm_arg, "--force-poweroff"], RUN);
    let st = t.wait(RUN);
    s.check(
        "bhyvectl: root --force-poweroff on vmmtest1's VM -> its bhyve -M exits 1",
        "status 0; no message; bhyve status 1; vmm/ empty",
        format!("{}; {}; bhyve {st}; {}", end.status, message(&end.stderr), ls_after(s, name)),
    );
    drop(t);
    cleanup(s, name);

    let name = "ba-own2";
    let mut t = match multi(s, m1, rom, name) {
        Ok(t) => t,
        Err(e) => {
            s.check("bhyve: vmmtest1 starts multi.rom with -M", "ready", e);
            return cleanup(s, name);
        }
    };
    t.send("z");
    let end = s.env.run_tool(Who::root(), "bhyvectl", &[&format!("--vm={name}"), "--destroy"], RUN);
    let st = t.wait(RUN);
    s.check(
        "bhyvectl: root --destroy of vmmtest1's running VM -> bhyve -M exits 4 (destroyed)",
        format!("status 0; bhyve status 4; bhyve: VM {name} was destroyed; vmm/ empty"),
        format!("{}; bhyve {st}; {}; {}", end.status, message(&t.stderr()), ls_after(s, name)),
    );
    drop(t);
    cleanup(s, name);
}

// ---------------------------------------------------------------- jails

/// SPEC "Jails": bhyve in a PID namespace with and without allow.vmm.
pub fn jail(s: &mut Suite) {
    let Some(g) = guests(s) else { return };
    let (hello, multi_rom) = (g.join("hello.rom"), g.join("multi.rom"));
    let ctl = s.env.ctl();
    for (who, label) in [(Who::root(), "root"), (Who::user(MEMBER1), "vmmtest1")] {
        let end = run_bhyve(s, who.at(Place::FreshJail), &["-M"], &hello, "bj-no");
        s.check(
            &format!("bhyve: {label} in a jail without allow.vmm, bhyve -M -> EPERM on vmmctl, 4"),
            format!("status 4; bhyve: open {ctl}: Operation not permitted; vmm/ empty"),
            outcome(s, &end, "bj-no"),
        );
        cleanup(s, "bj-no");
    }
    let (a, b) = match (s.env.jail(), s.env.jail()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return s.check("bhyve: start two PID namespaces", "OK", e),
    };
    s.check("bhyve: grant allow.vmm to jail A", "OK", s.env.jail_cmd("allow", a.pid, None));
    s.check("bhyve: grant allow.vmm to jail B", "OK", s.env.jail_cmd("allow", b.pid, None));
    let in_a = Place::Jail(a.pid);
    for (who, label) in [(Who::root(), "root"), (Who::user(MEMBER1), "vmmtest1")] {
        let end = run_bhyve(s, who.at(in_a), &["-M"], &hello, "bj-hello");
        let obs =
            format!("{}; {}; {}; {}", end.status, message(&end.stderr), console(&end.stdout), ls_after(s, "bj-hello"));
        s.check(
            &format!("bhyve: {label} in a jail with allow.vmm, bhyve -M hello.rom -> 1"),
            format!("status 1; no message; {}; vmm/ empty", console("hello from bootrom\n")),
            obs,
        );
        cleanup(s, "bj-hello");
    }
    let name = "bj-run";
    let ma = Who::user(MEMBER1).at(in_a);
    let mut t = match multi(s, ma, &multi_rom, name) {
        Ok(t) => t,
        Err(e) => {
            s.check("bhyve: vmmtest1 in jail A runs multi.rom with -M", "ready", e);
            return cleanup(s, name);
        }
    };
    s.check("bhyve: the host's ls vmm/ shows jail A's running VM", format!("vmm/ {name}"), ls(s));
    let seen = s.probe(ma, &["readdir", &s.env.vm_dir()]);
    s.check("bhyve: jail A's ls vmm/ shows its running VM", format!("vmm/ {name}"), ls_text("vmm/", &seen));
    let seen = s.probe(Who::user(MEMBER1).at(Place::Jail(b.pid)), &["readdir", &s.env.vm_dir()]);
    s.check("bhyve: jail B's ls vmm/ does not show jail A's VM", "vmm/ empty", ls_text("vmm/", &seen));
    t.send("p");
    let st = t.wait(RUN);
    s.check(
        "bhyve: jail A's guest powers off -> 1, VM gone",
        format!("status 1; no message; {}; vmm/ empty", console("ready\n")),
        format!("{st}; {}; {}; {}", message(&t.stderr()), console(&t.stdout()), ls_after(s, name)),
    );
    drop(t);
    cleanup(s, name);
    s.check("bhyve: revoke jail A (cleanup)", "OK", s.env.jail_cmd("revoke", a.pid, None));
    s.check("bhyve: revoke jail B (cleanup)", "OK", s.env.jail_cmd("revoke", b.pid, None));
    drop((a, b));
}
