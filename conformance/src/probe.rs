//! Probes: one file-system operation (or one small scenario) run as a child
//! process with its own credentials, printing exactly one result line:
//! `OK ...` or `ERR ENAME` (scenario probes print their documented summary).
//! A probe exits 0 whenever it could run; usage errors exit 2.

use crate::errno;
use crate::ioctl::{self, VmCreate, VmDestroy, CREATE_DESTROY_ON_CLOSE};
use crate::lines::{readdir_line, stat_line};
use std::ffi::CString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Usage of the probe subcommands.
pub const USAGE: &str = "\
conformance probe [--user NAME] [--ruid UID] OP ARGS...
  open PATH rdonly|wronly|rdwr        open and close
  write PATH TEXT                     open O_RDWR, one write(2)
  write-read PATH TEXT KEY            write TEXT, then pread from 0: OK KEY=VALUE
  read PATH KEY                       pread from 0: OK KEY=VALUE
  ioctl-create PATH NAME FLAGS [RESERVED_IDX]
  ioctl-destroy PATH NAME [RESERVED_IDX]
  stat PATH                           OK uid=U gid=G mode=MODE type=file|dir|other
  readdir PATH                        OK NAME,NAME,... (sorted)
  chmod PATH OCTAL | chown PATH UID GID  (-1 keeps)
  mmap-rw PATH                        write through one mapping, read through another open
  hold-create CTL NAME[,NAME..] write|ioctl
                                      create destroy-on-close, print READY, hold until stdin EOF
  create-many CTL PREFIX N            N transient creates on one descriptor: OK,OK,...,ENOMEM
  dup-fork-release CTL NAME           transient VM survives until the last dup/fork copy closes
  stale-fd CTL NAME vm|seg destroy|close
                                      ops on a descriptor of a destroyed VM
  reuse CTL NAME destroy|close        create the name again right after its VM went
  jail-inherit CTL NAME write|ioctl|destroy-write|destroy-ioctl
                                      open on the host; create (or destroy) from a new PID namespace
  exec PROG ARGS...                   become the user, then exec PROG (bhyve, bhyvectl...)
  (attack probes: see attack_probes.rs)";

fn cpath(p: &str) -> CString {
    CString::new(p).unwrap_or_else(|_| usage("path contains NUL"))
}

pub(crate) fn usage(why: &str) -> ! {
    eprintln!("conformance probe: {why}\n{USAGE}");
    std::process::exit(2)
}

pub(crate) fn res(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "OK".into(),
        Err(e) => format!("ERR {}", errno::name(e)),
    }
}

pub(crate) fn errno_now() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// A descriptor closed on drop.
pub(crate) struct Fd(pub(crate) i32);

impl Drop for Fd {
    fn drop(&mut self) {
        if self.0 >= 0 {
            // SAFETY: we own the descriptor.
            unsafe { libc::close(self.0) };
        }
    }
}

pub(crate) fn open(path: &str, flags: i32) -> Result<Fd, i32> {
    let c = cpath(path);
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(errno_now())
    } else {
        Ok(Fd(fd))
    }
}

pub(crate) fn write_fd(fd: &Fd, data: &[u8]) -> Result<(), i32> {
    // SAFETY: valid buffer.
    let n = unsafe { libc::write(fd.0, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        Err(errno_now())
    } else {
        Ok(())
    }
}

pub(crate) fn pread_fd(fd: &Fd, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    // SAFETY: valid buffer.
    let n = unsafe { libc::pread(fd.0, buf.as_mut_ptr().cast(), len, 0) };
    // Negative: the call failed.
    let n = usize::try_from(n).map_err(|_| errno_now())?;
    buf.truncate(n);
    Ok(buf)
}

fn access_mode(s: &str) -> i32 {
    match s {
        "rdonly" => libc::O_RDONLY,
        "wronly" => libc::O_WRONLY,
        "rdwr" => libc::O_RDWR,
        _ => usage("mode must be rdonly, wronly or rdwr"),
    }
}

fn key_of(status: &[u8], key: &str) -> String {
    let text = String::from_utf8_lossy(status);
    match text.lines().find(|l| l.split_once('=').is_some_and(|(k, _)| k == key)) {
        Some(l) => format!("OK {l}"),
        None => format!("ERR NOKEY({key})"),
    }
}

pub(crate) fn mount_of(ctl: &str) -> PathBuf {
    Path::new(ctl).parent().unwrap_or(Path::new("/")).to_path_buf()
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Wait up to `limit` for `p` to disappear.
fn gone_within(p: &Path, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if !exists(p) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn create_line(name: &str, transient: bool) -> Vec<u8> {
    let mut s = format!("create {name}");
    if transient {
        s += " destroy-on-close";
    }
    s.into_bytes()
}

fn ioctl_create(fd: &Fd, name: &str, flags: u32, reserved: Option<usize>) -> Result<(), i32> {
    let mut arg = VmCreate::new(name.as_bytes(), flags, reserved).unwrap_or_else(|e| usage(&e));
    // SAFETY: VmCreate is the structure of VMMCTL_VM_CREATE.
    unsafe { ioctl::ioctl(fd.0, ioctl::VMMCTL_VM_CREATE, &mut arg) }
}

fn ioctl_destroy(fd: &Fd, name: &str, reserved: Option<usize>) -> Result<(), i32> {
    let mut arg = VmDestroy::new(name.as_bytes(), reserved).unwrap_or_else(|e| usage(&e));
    // SAFETY: VmDestroy is the structure of VMMCTL_VM_DESTROY.
    unsafe { ioctl::ioctl(fd.0, ioctl::VMMCTL_VM_DESTROY, &mut arg) }
}

pub(crate) fn transient_create(fd: &Fd, name: &str, via: &str) -> Result<(), i32> {
    match via {
        "write" => write_fd(fd, &create_line(name, true)),
        "ioctl" => ioctl_create(fd, name, CREATE_DESTROY_ON_CLOSE, None),
        _ => usage("via must be write or ioctl"),
    }
}

/// A number, decimal or `0x` hex, of type `T`; a usage error if it is none
/// or does not fit.
fn parse_num<T: TryFrom<u64>>(s: &str) -> T {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.ok().and_then(|n| T::try_from(n).ok()).unwrap_or_else(|| usage(&format!("bad number '{s}'")))
}

/// Take on another user's identity: supplementary groups, gid, uid.
fn become_user(name: &str, ruid: Option<u32>) -> Result<(), String> {
    let user = nix::unistd::User::from_name(name)
        .map_err(|e| format!("getpwnam {name}: {e}"))?
        .ok_or(format!("no user {name}"))?;
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    // SAFETY: plain credential syscalls in a single-threaded process.
    unsafe {
        if libc::initgroups(cname.as_ptr(), gid) != 0 {
            return Err(format!("initgroups: {}", errno::last()));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(format!("setresgid: {}", errno::last()));
        }
        if libc::setresuid(ruid.unwrap_or(uid), uid, uid) != 0 {
            return Err(format!("setresuid: {}", errno::last()));
        }
    }
    Ok(())
}

/// Probe operations defined outside this file (attack.rs's): the result
/// line of `op ARGS`, None for an operation they do not define.
pub type MoreOps = fn(op: &str, args: &[&str]) -> Option<String>;

/// Entry point of `conformance probe ...`, with the operations of this file
/// and `more`; returns the process exit code.
pub fn main(args: &[String], more: MoreOps) -> i32 {
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut user = None;
    let mut ruid = None;
    while let Some(first) = args.first().copied() {
        match first {
            "--user" if args.len() > 1 => {
                user = Some(args[1]);
                args.drain(..2);
            }
            "--ruid" if args.len() > 1 => {
                ruid = Some(parse_num(args[1]));
                args.drain(..2);
            }
            _ => break,
        }
    }
    if let Some(u) = user {
        if let Err(e) = become_user(u, ruid) {
            eprintln!("conformance probe: cannot become {u}: {e}");
            return 3;
        }
    } else if ruid.is_some() {
        usage("--ruid needs --user");
    }
    let line = run(&args, more);
    // The runner may have stopped listening (a holder's reader reads one line).
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    0
}

fn run(args: &[&str], more: MoreOps) -> String {
    match args {
        ["open", path, mode] => res(open(path, access_mode(mode)).map(drop)),
        ["write", path, text] => res(open(path, libc::O_RDWR).and_then(|fd| write_fd(&fd, text.as_bytes()))),
        ["write-read", path, text, key] => match open(path, libc::O_RDWR) {
            Ok(fd) => match write_fd(&fd, text.as_bytes()).and_then(|()| pread_fd(&fd, 65536)) {
                Ok(status) => key_of(&status, key),
                Err(e) => res(Err(e)),
            },
            Err(e) => res(Err(e)),
        },
        ["read", path, key] => match open(path, libc::O_RDWR).and_then(|fd| pread_fd(&fd, 65536)) {
            Ok(status) => key_of(&status, key),
            Err(e) => res(Err(e)),
        },
        ["ioctl-create", path, name, flags, rest @ ..] => {
            let reserved = rest.first().map(|s| parse_num(s));
            let flags = parse_num(flags);
            res(open(path, libc::O_RDWR).and_then(|fd| ioctl_create(&fd, name, flags, reserved)))
        }
        ["ioctl-destroy", path, name, rest @ ..] => {
            let reserved = rest.first().map(|s| parse_num(s));
            res(open(path, libc::O_RDWR).and_then(|fd| ioctl_destroy(&fd, name, reserved)))
        }
        ["stat", path] => stat_line(Path::new(path)),
        ["readdir", path] => readdir_line(Path::new(path)),
        ["chmod", path, mode] => {
            let mode = u32::from_str_radix(mode, 8).unwrap_or_else(|_| usage("mode is octal"));
            let c = cpath(path);
            // SAFETY: valid C string.
            res(if unsafe { libc::chmod(c.as_ptr(), mode) } == 0 { Ok(()) } else { Err(errno_now()) })
        }
        ["chown", path, uid, gid] => {
            let id = |s: &str| {
                if s == "-1" {
                    u32::MAX
                } else {
                    parse_num(s)
                }
            };
            let c = cpath(path);
            // SAFETY: valid C string.
            let r = unsafe { libc::chown(c.as_ptr(), id(uid), id(gid)) };
            res(if r == 0 { Ok(()) } else { Err(errno_now()) })
        }
        ["mmap-rw", path] => mmap_rw(path),
        ["hold-create", ctl, names, via] => hold_create(ctl, names, via),
        ["create-many", ctl, prefix, n] => create_many(ctl, prefix, parse_num(n)),
        ["dup-fork-release", ctl, name] => dup_fork_release(ctl, name),
        ["stale-fd", ctl, name, which, how] => stale_fd(ctl, name, which, how),
        ["reuse", ctl, name, how] => reuse(ctl, name, how),
        ["jail-inherit", ctl, name, via] => jail_inherit(ctl, name, via),
        ["exec", prog, rest @ ..] => {
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new(prog).args(rest).exec();
            eprintln!("conformance probe: exec {prog}: {e}");
            std::process::exit(127)
        }
        [op, rest @ ..] => more(op, rest).unwrap_or_else(|| usage("unknown probe or wrong arguments")),
        [] => usage("no probe"),
    }
}

const MAP_LEN: usize = 4096;

/// Map `fd` shared; Err(errno).
fn map(fd: &Fd) -> Result<*mut u8, i32> {
    // SAFETY: a fresh shared mapping of a file we opened.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), MAP_LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.0, 0)
    };
    if p == libc::MAP_FAILED {
        Err(errno_now())
    } else {
        Ok(p.cast())
    }
}

fn mmap_rw(path: &str) -> String {
    // The low byte of the pid: differs between runs.
    let pattern = std::process::id().to_le_bytes()[0] | 0x81;
    let write = || -> Result<(), i32> {
        let fd = open(path, libc::O_RDWR)?;
        let p = map(&fd)?;
        // SAFETY: within the MAP_LEN mapping.
        unsafe {
            std::ptr::write_volatile(p.add(123), pattern);
            libc::munmap(p.cast(), MAP_LEN);
        }
        Ok(())
    };
    if let Err(e) = write() {
        return res(Err(e));
    }
    let read = || -> Result<u8, i32> {
        let fd = open(path, libc::O_RDWR)?;
        let p = map(&fd)?;
        // SAFETY: within the MAP_LEN mapping.
        let v = unsafe { std::ptr::read_volatile(p.add(123)) };
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(p.cast(), MAP_LEN) };
        Ok(v)
    };
    match read() {
        Ok(v) if v == pattern => "OK".into(),
        Ok(v) => format!("ERR MISMATCH(wrote {pattern:#x}, read {v:#x})"),
        Err(e) => res(Err(e)),
    }
}

fn hold_create(ctl: &str, names: &str, via: &str) -> String {
    let fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return res(Err(e)),
    };
    for name in names.split(',') {
        if let Err(e) = transient_create(&fd, name, via) {
            return res(Err(e));
        }
    }
    let released = ready_and_hold("");
    drop(fd);
    released
}

/// Tell the runner, which waits for the line, that we are ready (`READY
/// PID`, then `detail` if there is one), then hold what the caller holds
/// until the runner closes our stdin (or kills us).
pub(crate) fn ready_and_hold(detail: &str) -> String {
    {
        let mut out = std::io::stdout().lock();
        let pid = std::process::id();
        let _ = if detail.is_empty() { writeln!(out, "READY {pid}") } else { writeln!(out, "READY {pid} {detail}") };
        let _ = out.flush();
    }
    wait_stdin_eof();
    "RELEASED".into()
}

/// Block until the runner closes our stdin (or kills us).
fn wait_stdin_eof() {
    let mut sink = String::new();
    while std::io::stdin().lock().read_line(&mut sink).is_ok_and(|n| n > 0) {
        sink.clear();
    }
}

fn create_many(ctl: &str, prefix: &str, n: u64) -> String {
    let fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return res(Err(e)),
    };
    let out: Vec<String> = (1..=n)
        .map(|i| match write_fd(&fd, &create_line(&format!("{prefix}{i}"), true)) {
            Ok(()) => "OK".to_string(),
            Err(e) => errno::name(e),
        })
        .collect();
    out.join(",")
}

fn vm_node(ctl: &str, name: &str) -> PathBuf {
    mount_of(ctl).join("vmm").join(name)
}

fn seg_node(ctl: &str, name: &str) -> PathBuf {
    mount_of(ctl).join("vmm.io").join(format!("{name}.sysmem"))
}

fn dup_fork_release(ctl: &str, name: &str) -> String {
    let node = vm_node(ctl, name);
    let fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return res(Err(e)),
    };
    if let Err(e) = transient_create(&fd, name, "write") {
        return res(Err(e));
    }
    // SAFETY: dup of our descriptor.
    let dup = Fd(unsafe { libc::dup(fd.0) });
    if dup.0 < 0 {
        return format!("ERR dup {}", errno::last());
    }
    let mut pipe = [0i32; 2];
    // SAFETY: valid array.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return format!("ERR pipe {}", errno::last());
    }
    // SAFETY: the probe is single-threaded; the child only calls read and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return format!("ERR fork {}", errno::last());
    }
    if pid == 0 {
        // Child: keeps its copies of both descriptors until the pipe closes.
        // SAFETY: async-signal-safe calls only.
        unsafe {
            libc::close(pipe[1]);
            let mut b = 0u8;
            while libc::read(pipe[0], (&mut b as *mut u8).cast(), 1) > 0 {}
            libc::_exit(0);
        }
    }
    // SAFETY: closing our read end.
    unsafe { libc::close(pipe[0]) };
    let settle = Duration::from_millis(300);
    drop(fd);
    std::thread::sleep(settle);
    let mut verdict = None;
    if !exists(&node) {
        verdict = Some("ERR destroyed-after-first-close-with-dup-open".to_string());
    }
    drop(dup);
    std::thread::sleep(settle);
    if verdict.is_none() && !exists(&node) {
        verdict = Some("ERR destroyed-while-fork-copy-open".to_string());
    }
    // SAFETY: closing the write end lets the child exit; then reap it.
    unsafe {
        libc::close(pipe[1]);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
    if verdict.is_none() && !gone_within(&node, Duration::from_secs(1)) {
        verdict = Some("ERR not-destroyed-1s-after-last-copy-closed".to_string());
    }
    verdict.unwrap_or_else(|| "OK".into())
}

fn stale_fd(ctl: &str, name: &str, which: &str, how: &str) -> String {
    let ctl_fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return res(Err(e)),
    };
    if let Err(e) = transient_create(&ctl_fd, name, "write") {
        return format!("ERR create {}", errno::name(e));
    }
    let target = match which {
        "vm" => vm_node(ctl, name),
        "seg" => seg_node(ctl, name),
        _ => usage("which must be vm or seg"),
    };
    let fd = match open(&target.to_string_lossy(), libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return format!("ERR open {}", errno::name(e)),
    };
    // A segment mapped while the VM lives, touched after it is gone.
    let mapping = match which {
        "seg" => match map(&fd) {
            Ok(p) => Some(p),
            Err(e) => return format!("ERR mmap {}", errno::name(e)),
        },
        _ => None,
    };
    match how {
        "destroy" => {
            if let Err(e) = write_fd(&ctl_fd, format!("destroy {name}").as_bytes()) {
                return format!("ERR destroy {}", errno::name(e));
            }
        }
        "close" => drop(ctl_fd),
        _ => usage("how must be destroy or close"),
    }
    if !gone_within(&vm_node(ctl, name), Duration::from_secs(1)) {
        return "ERR node-still-present-after-1s".into();
    }
    let name_of = |r: Result<(), i32>| match r {
        Ok(()) => "OK".to_string(),
        Err(e) => errno::name(e),
    };
    match which {
        "vm" => {
            let w = name_of(write_fd(&fd, b"cpus 1"));
            let r = name_of(pread_fd(&fd, 4096).map(drop));
            format!("write={w} read={r}")
        }
        _ => {
            // vmm(4) DIFFERENCES: segments pass through to the engine's memfds, so
            // instead of ENXIO the segment is emptied: reads hit end-of-file and
            // old mappings fault, and the guest's memory is gone.
            let r = match pread_fd(&fd, 1) {
                Ok(v) if v.is_empty() => "EOF".to_string(),
                Ok(_) => "DATA".to_string(),
                Err(e) => errno::name(e),
            };
            let p = mapping.expect("mapped above");
            let touched = touch_in_child(p);
            // SAFETY: our mapping.
            unsafe { libc::munmap(p.cast(), MAP_LEN) };
            format!("read={r} mapping={touched}")
        }
    }
}

/// Read one byte of a mapping in a child process: "OK", or the signal that killed it.
fn touch_in_child(p: *mut u8) -> String {
    // SAFETY: the child only reads the mapping and exits.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: p is a live mapping of MAP_LEN bytes in the child too.
            let _ = unsafe { std::ptr::read_volatile(p) };
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        -1 => format!("ERR fork {}", errno::name(errno_now())),
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFSIGNALED(status) {
                match libc::WTERMSIG(status) {
                    libc::SIGBUS => "SIGBUS".into(),
                    libc::SIGSEGV => "SIGSEGV".into(),
                    sig => format!("signal{sig}"),
                }
            } else {
                "OK".into()
            }
        }
    }
}

fn reuse(ctl: &str, name: &str, how: &str) -> String {
    let fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return res(Err(e)),
    };
    if let Err(e) = transient_create(&fd, name, "write") {
        return format!("ERR first-create {}", errno::name(e));
    }
    match how {
        "destroy" => {
            if let Err(e) = write_fd(&fd, format!("destroy {name}").as_bytes()) {
                return format!("ERR destroy {}", errno::name(e));
            }
            // No retry: destroy has returned, the name must be free.
            res(transient_create(&fd, name, "write"))
        }
        "close" => {
            drop(fd);
            let fd = match open(ctl, libc::O_RDWR) {
                Ok(fd) => fd,
                Err(e) => return res(Err(e)),
            };
            // "free again within 1 s": retry EEXIST for that long.
            let end = Instant::now() + Duration::from_secs(1);
            loop {
                match transient_create(&fd, name, "write") {
                    Err(libc::EEXIST) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                    r => return res(r),
                }
            }
        }
        _ => usage("how must be destroy or close"),
    }
}

fn jail_inherit(ctl: &str, name: &str, via: &str) -> String {
    if !["write", "ioctl", "destroy-write", "destroy-ioctl"].contains(&via) {
        usage("jail-inherit: write, ioctl, destroy-write or destroy-ioctl");
    }
    let fd = match open(ctl, libc::O_RDWR) {
        Ok(fd) => fd,
        Err(e) => return format!("ERR host-open {}", errno::name(e)),
    };
    // SAFETY: unshare only affects our future children.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return format!("ERR unshare {}", errno::last());
    }
    let mut pipe = [0i32; 2];
    // SAFETY: valid array.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return format!("ERR pipe {}", errno::last());
    }
    // SAFETY: single-threaded probe; the child writes one errno and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return format!("ERR fork {}", errno::last());
    }
    if pid == 0 {
        let r = match via {
            "destroy-write" => write_fd(&fd, format!("destroy {name}").as_bytes()),
            "destroy-ioctl" => ioctl_destroy(&fd, name, None),
            _ => transient_create(&fd, name, via),
        };
        let code: i32 = match r {
            Ok(()) => 0,
            Err(e) => e,
        };
        // SAFETY: write the result and leave.
        unsafe {
            libc::write(pipe[1], (&code as *const i32).cast(), 4);
            libc::_exit(0);
        }
    }
    // SAFETY: reap the child and collect its answer.
    unsafe {
        libc::close(pipe[1]);
        let mut code = -1i32;
        let n = libc::read(pipe[0], (&mut code as *mut i32).cast(), 4);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        if n != 4 {
            return "ERR child-gave-no-answer".into();
        }
        res(if code == 0 { Ok(()) } else { Err(code) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn key_lookup() {
        assert_eq!(key_of(b"name=a\ncpus=2\n", "cpus"), "OK cpus=2");
        assert_eq!(key_of(b"name=a\n", "cpus"), "ERR NOKEY(cpus)");
        assert_eq!(key_of(b"cpusx=1\n", "cpus"), "ERR NOKEY(cpus)");
    }

    #[test]
    fn lines_and_paths() {
        assert_eq!(create_line("a", true), b"create a destroy-on-close");
        assert_eq!(create_line("a", false), b"create a");
        assert_eq!(vm_node("/m/vmmctl", "x"), Path::new("/m/vmm/x"));
        assert_eq!(seg_node("/m/vmmctl", "x"), Path::new("/m/vmm.io/x.sysmem"));
        assert_eq!(parse_num::<u64>("0x10"), 16);
        assert_eq!(parse_num::<u32>("7"), 7);
    }

    #[test]
    fn stat_and_readdir_of_a_temp_dir() {
        let dir = std::env::temp_dir().join(format!("conformance-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b"), vec![0u8; 4096]).unwrap();
        let f = dir.join("b");
        let c = CString::new(f.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o640) }, 0);
        let s = stat_line(&f);
        assert!(s.starts_with("OK uid=") && s.ends_with("mode=0640 type=file"), "{s}");
        assert!(stat_line(&dir).ends_with("type=dir"));
        assert_eq!(stat_line(&dir.join("nope")), "ERR ENOENT");
        assert_eq!(readdir_line(&dir), "OK b,sub");
        assert!(mmap_rw(&f.to_string_lossy()).starts_with("OK") || cfg!(miri));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
