//! The bhyve groups: `bhyve` and `bhyvectl` (bhyve-compat) run as the real
//! users, on the host and in jails, against the mount under test
//! (`VMM_DEV_DIR`), booting the engine's test guests (vmm-engine/guests):
//! SPEC.md "bhyve exit status", "Monitor mode", "Resources used by bhyve",
//! "Jails". Each row reports the exit status, the message and what root's
//! `ls vmm/` shows afterwards.

use crate::harness::{children_of, exited_within, progress, Place, Tool, ToolEnd, Who, MEMBER1, MEMBER2, OUTSIDER};
use crate::suite::Suite;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a bhyve run may take.
const RUN: Duration = Duration::from_secs(30);
/// Longest until a guest prints its prompt.
const READY: Duration = Duration::from_secs(20);
/// SPEC.md: a VM whose last vmmctl descriptor closed is gone within 1 s.
const GONE: Duration = Duration::from_secs(1);

/// The test guests: `--guests DIR`, or hello.rom and multi.rom built once
/// into the (world-searchable) temporary directory.
pub(crate) fn guests(s: &mut Suite) -> Option<PathBuf> {
    let ok = |d: &Path| d.join("hello.rom").is_file() && d.join("multi.rom").is_file();
    if let Some(g) = s.env.guests.clone() {
        if ok(&g) {
            return Some(g);
        }
        s.check("bhyve: test guests in --guests DIR", "hello.rom, multi.rom", format!("missing in {}", g.display()));
        return None;
    }
    use std::os::unix::fs::PermissionsExt;
    let out = s.env.base.join("guests");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm-engine/guests");
    let built = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let st = Command::new("make")
                .arg("-s")
                .arg("-C")
                .arg(&src)
                .arg(format!("OUT={}", out.display()))
                .arg(out.join("hello.rom"))
                .arg(out.join("multi.rom"))
                .stdin(Stdio::null())
                .status()
                .map_err(|e| format!("make: {e}"))?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("make -C {} failed ({st})", src.display()))
            }
        });
    for rom in ["hello.rom", "multi.rom"] {
        let _ = std::fs::set_permissions(out.join(rom), std::fs::Permissions::from_mode(0o644));
    }
    match built {
        Ok(()) if ok(&out) => {
            s.env.guests = Some(out.clone());
            Some(out)
        }
        Ok(()) => {
            s.check("bhyve: build the test guests", "OK", "make succeeded but the ROMs are missing");
            None
        }
        Err(e) => {
            s.check("bhyve: build the test guests (or pass --guests DIR)", "OK", e);
            None
        }
    }
}

/// `bhyve [-M] [EXTRA...] -m 32M -l com1,stdio -l bootrom,ROM NAME`.
pub(crate) fn bhyve_args(extra: &[&str], rom: &Path, name: &str) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    v.extend(["-m", "32M", "-l", "com1,stdio", "-l"].map(String::from));
    v.push(format!("bootrom,{}", rom.display()));
    v.push(name.to_string());
    v
}

pub(crate) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub(crate) fn run_bhyve(s: &Suite, who: Who, extra: &[&str], rom: &Path, name: &str) -> ToolEnd {
    s.env.run_tool(who, "bhyve", &strs(&bhyve_args(extra, rom, name)), RUN)
}

/// bhyve -M with multi.rom, started and at its `ready` prompt.
fn multi(s: &Suite, who: Who, rom: &Path, name: &str) -> Result<Tool, String> {
    let mut t = s.env.tool(who, "bhyve", &strs(&bhyve_args(&["-M"], rom, name)))?;
    if t.wait_output("ready", 1, READY) {
        Ok(t)
    } else {
        let st = t.wait(Duration::from_secs(1));
        Err(format!("no 'ready' on the console ({st}); stderr: {}", message(&t.stderr())))
    }
}

/// A tool's stderr on one line: `no message`, or its lines joined by ` / `.
pub(crate) fn message(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        "no message".into()
    } else {
        lines.join(" / ")
    }
}

/// A readdir probe line as `ls` shows it: `vmm/ empty`, `vmm/ a,b` or the errno.
fn ls_text(dir: &str, readdir: &str) -> String {
    match readdir.strip_prefix("OK") {
        Some(rest) if rest.trim().is_empty() => format!("{dir} empty"),
        Some(rest) => format!("{dir} {}", rest.trim()),
        None => format!("{dir} {readdir}"),
    }
}

/// What root's `ls vmm/` shows on the host.
fn ls(s: &Suite) -> String {
    ls_text("vmm/", &s.env.readdir(&s.env.vm_dir()))
}

/// Whether VM `name` left anything in vmm/ or vmm.io/ (as root on the host).
fn trace(s: &Suite, name: &str) -> Option<String> {
    let mut left = Vec::new();
    if let Some(list) = s.env.readdir(&s.env.vm_dir()).strip_prefix("OK ") {
        left.extend(list.split(',').filter(|n| *n == name).map(|n| format!("vmm/{n}")));
    }
    if let Some(list) = s.env.readdir(&s.env.io_dir()).strip_prefix("OK ") {
        let prefix = format!("{name}.");
        left.extend(list.split(',').filter(|n| n.starts_with(&prefix)).map(|n| format!("vmm.io/{n}")));
    }
    if left.is_empty() {
        None
    } else {
        Some(left.join(","))
    }
}

/// Wait up to `limit` for VM `name` to leave no trace; `no trace` or what is left.
fn no_trace_within(s: &Suite, name: &str, limit: Duration) -> String {
    let end = Instant::now() + limit;
    loop {
        match trace(s, name) {
            None => return format!("no trace within {}ms", limit.as_millis()),
            Some(left) if Instant::now() >= end => return format!("{left} left after {}ms", limit.as_millis()),
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Root's `ls vmm/` once VM `name` is gone (waiting up to 1 s for it to go).
pub(crate) fn ls_after(s: &Suite, name: &str) -> String {
    let _ = no_trace_within(s, name, GONE);
    ls(s)
}

/// `status N; MESSAGE; vmm/ ...` for a finished bhyve that ran VM `name`.
fn outcome(s: &Suite, end: &ToolEnd, name: &str) -> String {
    format!("{}; {}; {}", end.status, message(&end.stderr), ls_after(s, name))
}

/// Destroy what a failed row left, so that later rows start clean.
fn cleanup(s: &Suite, name: &str) {
    if trace(s, name).is_some() {
        s.root_destroy(name);
    }
}

/// The console text as the table shows it: `console "ready\n"`.
pub(crate) fn console(out: &str) -> String {
    format!("console {out:?}")
}

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
        std::thread::sleep(Duration::from_millis(30));
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
        std::thread::sleep(Duration::from_millis(30));
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

/// splitmix64: small, seedable, good enough to pick moments.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An index below `len` (not 0).
    pub(crate) fn index(&mut self, len: usize) -> usize {
        let n = u64::try_from(len).unwrap_or(u64::MAX);
        // Below `len`, so it fits.
        usize::try_from(self.below(n)).unwrap_or(0)
    }
}

/// `CONFORMANCE_SEED` (hex, `0x` optional) or one from the clock.
pub(crate) fn seed() -> u64 {
    if let Some(v) = std::env::var("CONFORMANCE_SEED").ok().filter(|v| !v.is_empty()) {
        if let Ok(n) = u64::from_str_radix(v.trim_start_matches("0x"), 16) {
            return n;
        }
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // The clock's low 64 bits of nanoseconds.
    let nanos = u64::try_from(t.as_nanos() % (1 << 64)).unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

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
    std::thread::sleep(Duration::from_millis(30));
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
    std::thread::sleep(Duration::from_millis(30));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(message(""), "no message");
        assert_eq!(message("bhyve: a\n\nb\n"), "bhyve: a / b");
        assert_eq!(ls_text("vmm/", "OK "), "vmm/ empty");
        assert_eq!(ls_text("vmm/", "OK"), "vmm/ empty");
        assert_eq!(ls_text("vmm/", "OK a,b"), "vmm/ a,b");
        assert_eq!(ls_text("vmm/", "EPERM"), "vmm/ EPERM");
        assert_eq!(console("a\n"), "console \"a\\n\"");
        let args = bhyve_args(&["-M"], Path::new("/g/x.rom"), "vm");
        assert_eq!(args, ["-M", "-m", "32M", "-l", "com1,stdio", "-l", "bootrom,/g/x.rom", "vm"]);
    }

    #[test]
    fn rng_is_seeded() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        let xs: Vec<u64> = (0..8).map(|_| a.below(400)).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.below(400)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 400));
        assert_ne!(Rng(1).next(), Rng(2).next());
    }
}
