//! What a hostile member tries (SPEC.md "Authority"): lending a set-uid
//! program's authority, taking root's descriptors, handing a VM its own
//! files, freezing the daemon. The probes run as the attacker; the set-uid
//! helper is a root-owned 04755 copy of this executable
//! (`conformance setid-helper ...`), made by the suite, so no sudo is needed.
//! The hand-over client here is written from vmm(4), independent of the tools.

use crate::errno;
use crate::probe::{errno_now, mount_of, open, res, transient_create, usage, wait_stdin_eof, write_fd, Fd};
use std::io::Write;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Probe operations defined here.
fn is_probe(op: &str) -> bool {
    matches!(
        op,
        "setid-write"
            | "setid-vm"
            | "handover"
            | "wedge"
            | "stuck-connect"
            | "hold-open"
            | "timed-create-destroy"
            | "reuse-loop"
            | "fill"
            | "timed-write"
            | "vm-cmd"
            | "vm-devices"
            | "handover-many"
            | "open-ns"
            | "open-many"
    )
}

/// Run probe `op` (`conformance probe OP ARGS...`, see probe.rs); the result
/// line, None if `op` is not one of these.
pub fn probe(op: &str, args: &[&str]) -> Option<String> {
    if !is_probe(op) {
        return None;
    }
    Some(match (op, args) {
        ("setid-write", [helper, path, text]) => setid_write(helper, path, text),
        ("setid-vm", [helper, ctl, name, text, hold]) => setid_vm(helper, ctl, name, text, hold),
        ("handover", [ctl, name, what, rest @ ..]) => hand_over(ctl, name, what, rest),
        ("wedge", [ctl, name, rom]) => wedge(ctl, name, rom),
        ("stuck-connect", [ctl]) => stuck_connect(ctl),
        ("hold-open", [path]) => match open(path, libc::O_RDWR) {
            Ok(fd) => {
                ready();
                wait_stdin_eof();
                drop(fd);
                "RELEASED".into()
            }
            Err(e) => res(Err(e)),
        },
        ("timed-create-destroy", [ctl, name]) => timed_create_destroy(ctl, name),
        ("reuse-loop", [ctl, name, n]) => reuse_loop(ctl, name, n.parse().unwrap_or_else(|_| usage("n"))),
        ("fill", [ctl, prefix]) => fill(ctl, prefix),
        ("timed-write", [path, text]) => match open(path, libc::O_RDWR) {
            Ok(fd) => {
                let t0 = Instant::now();
                match write_fd(&fd, text.as_bytes()) {
                    Ok(()) => format!("OK ms={}", ms(t0.elapsed())),
                    Err(e) => res(Err(e)),
                }
            }
            Err(e) => res(Err(e)),
        },
        ("vm-cmd", [ctl, name, text]) => vm_cmds(ctl, name, &[text.to_string()]),
        ("vm-devices", [ctl, name, n]) => {
            let n: usize = n.parse().unwrap_or_else(|_| usage("n"));
            let cmds: Vec<String> = (0..n).map(|i| format!("device 0:{}:{} virtio-rnd", 3 + i / 8, i % 8)).collect();
            vm_cmds(ctl, name, &cmds)
        }
        ("handover-many", [ctl, name, n]) => handover_many(ctl, name, n.parse().unwrap_or_else(|_| usage("n"))),
        ("open-ns", [path]) => {
            let ns =
                std::fs::metadata("/proc/self/ns/pid").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0);
            format!("{} ns={ns}", res(open(path, libc::O_RDWR).map(drop)))
        }
        ("open-many", [path, n]) => open_many(path, n.parse().unwrap_or_else(|_| usage("n"))),
        _ => usage(&format!("{op}: wrong arguments")),
    })
}

fn ready() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY {}", std::process::id());
    let _ = out.flush();
}

/// open(2) without O_CLOEXEC: the descriptor survives exec into the helper.
fn open_inherit(path: &str) -> Result<Fd, i32> {
    let fd = open(path, libc::O_RDWR)?;
    // SAFETY: clearing FD_CLOEXEC on a descriptor we own.
    unsafe { libc::fcntl(fd.0, libc::F_SETFD, 0) };
    Ok(fd)
}

fn exec_helper(helper: &str, args: &[String]) -> ! {
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(helper).arg("setid-helper").args(args).exec();
    println!("ERR exec-helper {e}");
    std::process::exit(0)
}

fn setid_write(helper: &str, path: &str, text: &str) -> String {
    match open_inherit(path) {
        Ok(fd) => {
            let n = fd.0;
            std::mem::forget(fd);
            exec_helper(helper, &["write".into(), n.to_string(), text.into()])
        }
        Err(e) => format!("ERR open {}", errno::name(e)),
    }
}

fn setid_vm(helper: &str, ctl: &str, name: &str, text: &str, hold: &str) -> String {
    let c = match open_inherit(ctl) {
        Ok(fd) => fd,
        Err(e) => return format!("ERR open-ctl {}", errno::name(e)),
    };
    if let Err(e) = transient_create(&c, name, "write") {
        return format!("ERR create {}", errno::name(e));
    }
    let vm = mount_of(ctl).join("vmm").join(name);
    let v = match open_inherit(&vm.to_string_lossy()) {
        Ok(fd) => fd,
        Err(e) => return format!("ERR open-vm {}", errno::name(e)),
    };
    let n = v.0;
    std::mem::forget((c, v));
    exec_helper(helper, &["write".into(), n.to_string(), text.into(), hold.into()])
}

/// `conformance setid-helper write FD TEXT [HOLD]` | `send SOCK HOLD`, run
/// set-uid root by a member: what a careless set-id program does with
/// descriptors it inherited. `{H}` in TEXT is the descriptor of HOLD, a file
/// only root can open.
pub fn setid_helper(args: &[String]) -> i32 {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 {
        println!("ERR NOT-SETUID");
        return 0;
    }
    let hold = |path: &str| -> Result<Fd, String> {
        open(path, libc::O_RDONLY).map_err(|e| format!("ERR hold {}", errno::name(e)))
    };
    let line = match args.as_slice() {
        ["write", fd, text, rest @ ..] => {
            let fd = Fd(fd.parse().unwrap_or(-1));
            let h = match rest.first().map(|p| hold(p)).transpose() {
                Ok(h) => h,
                Err(e) => return out(&e),
            };
            let text = match &h {
                Some(h) => text.replace("{H}", &h.0.to_string()),
                None => text.to_string(),
            };
            let r = res(write_fd(&fd, text.as_bytes()));
            // Not ours to close (it may be our stdout).
            std::mem::forget(fd);
            r
        }
        ["send", sock, path] => match hold(path) {
            Ok(h) => match send_fds(sock.parse().unwrap_or(-1), &[h.0]) {
                Ok(()) => "OK".into(),
                Err(e) => format!("ERR {}", errno::name(e)),
            },
            Err(e) => e,
        },
        _ => "ERR usage".into(),
    };
    out(&line)
}

fn out(line: &str) -> i32 {
    println!("{line}");
    0
}

// ------------------------------------------------------------ hand-over client

/// Connect to MOUNT/vmm.sock and read the nonce.
fn connect(mount: &std::path::Path) -> Result<(Fd, String), String> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let path = mount.join("vmm.sock");
    let s = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::empty(), None)
        .map_err(|e| format!("ERR socket {e}"))?;
    let addr = UnixAddr::new(&path).map_err(|e| format!("ERR addr {e}"))?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&s), &addr)
        .map_err(|e| format!("ERR connect {}", errno::name(e as i32)))?;
    let fd = Fd(std::os::fd::IntoRawFd::into_raw_fd(s));
    let greeting = recv(fd.0).map_err(|e| format!("ERR greeting {}", errno::name(e)))?;
    let nonce = greeting
        .split_once("nonce=")
        .map(|(_, n)| n.trim().to_string())
        .ok_or_else(|| format!("ERR greeting '{greeting}'"))?;
    Ok((fd, nonce))
}

fn recv(fd: RawFd) -> Result<String, i32> {
    let mut buf = [0u8; 512];
    // SAFETY: valid buffer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    // Negative: the call failed.
    let n = usize::try_from(n).map_err(|_| errno_now())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Send `fds` labelled by their numbers; Err(errno) from the daemon's answer.
fn send_fds(sock: RawFd, fds: &[RawFd]) -> Result<(), i32> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let text = format!("fds {}", fds.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(" "));
    sendmsg::<()>(
        sock,
        &[std::io::IoSlice::new(text.as_bytes())],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| e as i32)?;
    let ack = recv(sock)?;
    if ack == "ok" {
        return Ok(());
    }
    Err(ack.split(' ').nth(1).and_then(|n| n.parse().ok()).unwrap_or(libc::EPROTO))
}

/// A transient VM `name`, its vm/NAME handle and an attached hand-over connection.
struct Session {
    ctl: Fd,
    vm: Fd,
    sock: Fd,
}

fn session(ctl: &str, name: &str) -> Result<Session, String> {
    let c = open_inherit(ctl).map_err(|e| format!("ERR open-ctl {}", errno::name(e)))?;
    transient_create(&c, name, "write").map_err(|e| format!("ERR create {}", errno::name(e)))?;
    let mount = mount_of(ctl);
    let v = open(&mount.join("vmm").join(name).to_string_lossy(), libc::O_RDWR)
        .map_err(|e| format!("ERR open-vm {}", errno::name(e)))?;
    let (sock, nonce) = connect(&mount)?;
    write_fd(&v, format!("attach {nonce}").as_bytes()).map_err(|e| format!("ERR attach {}", errno::name(e)))?;
    Ok(Session { ctl: c, vm: v, sock })
}

/// Hand over WHAT, then (for some) send a command naming it.
fn hand_over(ctl: &str, name: &str, what: &str, rest: &[&str]) -> String {
    let s = match session(ctl, name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let send = |fd: RawFd| match send_fds(s.sock.0, &[fd]) {
        Ok(()) => "OK".to_string(),
        Err(e) => format!("ERR {}", errno::name(e)),
    };
    match (what, rest) {
        ("own-ctl", []) => send(s.ctl.0),
        ("own-vm", []) => send(s.vm.0),
        ("file", [path]) => match open(path, libc::O_RDONLY) {
            Ok(f) => send(f.0),
            Err(e) => format!("ERR open {}", errno::name(e)),
        },
        ("pipe-bootrom", []) => {
            let mut p = [0i32; 2];
            // SAFETY: valid array.
            unsafe { libc::pipe(p.as_mut_ptr()) };
            let (r, _w) = (Fd(p[0]), Fd(p[1]));
            match send_fds(s.sock.0, &[r.0]) {
                Ok(()) => res(write_fd(&s.vm, format!("bootrom {}", r.0).as_bytes())),
                Err(e) => format!("ERR send {}", errno::name(e)),
            }
        }
        ("datagram", []) => {
            let mut p = [0i32; 2];
            // SAFETY: valid array.
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, p.as_mut_ptr()) };
            let (a, _b) = (Fd(p[0]), Fd(p[1]));
            send(a.0)
        }
        ("unsent", []) => res(write_fd(&s.vm, b"bootrom 77")),
        ("setid", [helper, hold]) => {
            // SAFETY: the socket (and the handle it is attached to) must
            // survive exec into the helper.
            unsafe {
                libc::fcntl(s.sock.0, libc::F_SETFD, 0);
                libc::fcntl(s.vm.0, libc::F_SETFD, 0);
            }
            let sock = s.sock.0;
            std::mem::forget(s);
            exec_helper(helper, &["send".into(), sock.to_string(), hold.to_string()])
        }
        _ => usage("handover CTL NAME own-ctl|own-vm|file PATH|pipe-bootrom|datagram|unsent|setid HELPER HOLD"),
    }
}

/// Create transient `name`, then run `cmds` on it: `OK N then ERRNO` when
/// command N+1 fails after N succeeded (plain `ERRNO` for the first), `OK`.
fn vm_cmds(ctl: &str, name: &str, cmds: &[String]) -> String {
    let c = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return format!("ERR open-ctl {}", errno::name(e)),
    };
    if let Err(e) = transient_create(&c, name, "write") {
        return format!("ERR create {}", errno::name(e));
    }
    let v = match open(&mount_of(ctl).join("vmm").join(name).to_string_lossy(), libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return format!("ERR open-vm {}", errno::name(e)),
    };
    for (i, cmd) in cmds.iter().enumerate() {
        if let Err(e) = write_fd(&v, cmd.as_bytes()) {
            return if i == 0 { format!("ERR {}", errno::name(e)) } else { format!("OK {i} then {}", errno::name(e)) };
        }
    }
    "OK".into()
}

/// Hand over `n` descriptors one by one: `OK N then ERRNO`, or `OK N`.
fn handover_many(ctl: &str, name: &str, n: usize) -> String {
    let s = match session(ctl, name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut files = Vec::new();
    for i in 0..n {
        let f = match open("/dev/null", libc::O_RDWR) {
            Ok(f) => f,
            Err(e) => return format!("ERR open {}", errno::name(e)),
        };
        if let Err(e) = send_fds(s.sock.0, &[f.0]) {
            return format!("OK {i} then {}", errno::name(e));
        }
        files.push(f);
    }
    format!("OK {n}")
}

/// Open `path` up to `n` times, holding every descriptor: `OK N then ERRNO`.
fn open_many(path: &str, n: usize) -> String {
    // Room for n descriptors in this process.
    let lim = libc::rlimit { rlim_cur: n as u64 + 64, rlim_max: n as u64 + 64 };
    // SAFETY: setrlimit reads `lim`; raising the soft limit up to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes `cur`.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
        cur.rlim_cur = cur.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &cur) };
    }
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        match open(path, libc::O_RDWR) {
            Ok(fd) => held.push(fd),
            Err(e) => return format!("OK {i} then {}", errno::name(e)),
        }
    }
    format!("OK {n}")
}

/// A guest that prints 'y' forever to a console pipe nobody reads: its
/// serial device blocks on a full pipe. Holds everything until stdin closes.
fn wedge(ctl: &str, name: &str, rom: &str) -> String {
    let s = match session(ctl, name) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let rom = match open(rom, libc::O_RDONLY) {
        Ok(f) => f,
        Err(e) => return format!("ERR rom {}", errno::name(e)),
    };
    let mut i = [0i32; 2];
    let mut o = [0i32; 2];
    // SAFETY: valid arrays.
    unsafe {
        libc::pipe2(i.as_mut_ptr(), libc::O_CLOEXEC);
        libc::pipe2(o.as_mut_ptr(), libc::O_CLOEXEC);
    }
    let (in_r, in_w, out_r, out_w) = (Fd(i[0]), Fd(i[1]), Fd(o[0]), Fd(o[1]));
    if let Err(e) = send_fds(s.sock.0, &[rom.0, in_r.0, out_w.0]) {
        return format!("ERR send {}", errno::name(e));
    }
    for cmd in [format!("bootrom {}", rom.0), format!("com1 {} {}", in_r.0, out_w.0), "run".into()] {
        if let Err(e) = write_fd(&s.vm, cmd.as_bytes()) {
            return format!("ERR {cmd}: {}", errno::name(e));
        }
    }
    drop((rom, in_r, out_w));
    // "ready\n" comes first; then ask for endless output.
    let _ = write_fd(&in_w, b"y");
    ready();
    wait_stdin_eof();
    drop((out_r, in_w, s));
    "RELEASED".into()
}

fn stuck_connect(ctl: &str) -> String {
    // Connected, never attached, never reading: the daemon must not care.
    let c = connect(&mount_of(ctl));
    let mut out = std::io::stdout().lock();
    let how = if c.is_ok() { "connected" } else { "refused" };
    let _ = writeln!(out, "READY {} {how}", std::process::id());
    let _ = out.flush();
    drop(out);
    wait_stdin_eof();
    drop(c);
    "RELEASED".into()
}

fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

/// `OK create=MS destroy=MS`: one create and one destroy on a fresh vmmctl.
fn timed_create_destroy(ctl: &str, name: &str) -> String {
    let fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return res(Err(e)),
    };
    let t0 = Instant::now();
    if let Err(e) = write_fd(&fd, format!("create {name}").as_bytes()) {
        return format!("ERR create {}", errno::name(e));
    }
    let t1 = Instant::now();
    if let Err(e) = write_fd(&fd, format!("destroy {name}").as_bytes()) {
        return format!("ERR destroy {}", errno::name(e));
    }
    format!("OK create={} destroy={}", ms(t1 - t0), ms(t1.elapsed()))
}

/// N times: a child creates `name` destroy-on-close and exits (the kernel
/// closes its descriptor); as soon as it is reaped, the next child creates
/// the same name. `OK n=N eexist=E other=O`.
fn reuse_loop(ctl: &str, name: &str, n: u32) -> String {
    let line = format!("create {name} destroy-on-close");
    let (mut eexist, mut other) = (0, 0);
    for _ in 0..n {
        // SAFETY: single-threaded probe; the child only opens, writes and exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return format!("ERR fork {}", errno::name(errno_now()));
        }
        if pid == 0 {
            let code = match open(ctl, libc::O_RDWR) {
                Ok(fd) => match write_fd(&fd, line.as_bytes()) {
                    Ok(()) => {
                        std::mem::forget(fd);
                        0
                    }
                    Err(e) if e == libc::EEXIST => 1,
                    Err(_) => 2,
                },
                Err(_) => 3,
            };
            // SAFETY: leave without running destructors (the exit closes the descriptor).
            unsafe { libc::_exit(code) };
        }
        let mut st = 0;
        // SAFETY: reap our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        match libc::WEXITSTATUS(st) {
            0 => {}
            1 => eexist += 1,
            _ => other += 1,
        }
    }
    format!("OK n={n} eexist={eexist} other={other}")
}

/// Use up the caller's quota: transient VMs until ENOMEM, held until stdin closes.
fn fill(ctl: &str, prefix: &str) -> String {
    let fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return res(Err(e)),
    };
    let mut made = 0;
    let end = loop {
        match transient_create(&fd, &format!("{prefix}{made}"), "write") {
            Ok(()) => made += 1,
            Err(e) => break errno::name(e),
        }
        if made > 10_000 {
            break "NO-LIMIT".into();
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY {} {made} {end}", std::process::id());
    let _ = out.flush();
    drop(out);
    wait_stdin_eof();
    drop(fd);
    "RELEASED".into()
}

// ================================================================ the groups

use crate::harness::{Holder, Place, Who, MAX_VMS, MEMBER1, MEMBER2};
use crate::suite::Suite;

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
