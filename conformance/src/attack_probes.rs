//! The attacker's side of attack.rs's groups: the probe operations a
//! hostile member runs (`conformance probe OP ...`, handed to probe.rs by
//! main) and the set-uid helper (`conformance setid-helper ...`), a
//! root-owned 04755 copy of this executable that the suite makes. The
//! hand-over client here is written from vmm(4), independent of the tools.

use crate::errno;
use crate::probe::{errno_now, mount_of, open, ready_and_hold, res, transient_create, usage, write_fd, Fd};
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
                let released = ready_and_hold("");
                drop(fd);
                released
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
    let released = ready_and_hold("");
    drop((out_r, in_w, s));
    released
}

fn stuck_connect(ctl: &str) -> String {
    // Connected, never attached, never reading: the daemon must not care.
    let c = connect(&mount_of(ctl));
    let how = if c.is_ok() { "connected" } else { "refused" };
    let released = ready_and_hold(how);
    drop(c);
    released
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
    let released = ready_and_hold(&format!("{made} {end}"));
    drop(fd);
    released
}
