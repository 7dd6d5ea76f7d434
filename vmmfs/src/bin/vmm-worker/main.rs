//! vmm-worker: one VM, in a process of its own, jailed (vmmfs(8) ISOLATION).
//!
//! Started only by the vmmfs daemon, as root, with descriptor 3 a
//! `SOCK_SEQPACKET` socket to the daemon and descriptor 4 an open /dev/kvm.
//! With `--zygote` it forks workers on the daemon's request (zygote.rs);
//! each starts in new mount, network, IPC, UTS and PID namespaces. Before it
//! reads a request it enters its jail (jail.rs) and installs its seccomp
//! filter (filters.rs); from then on it speaks the worker protocol of
//! `vmm_protocol::worker` and runs the VM with `vmm_engine`. When the daemon
//! goes away (its end of the socket closes), a worker whose VM was created
//! `adoptable` keeps running the guest and waits on the listening socket it
//! got with the create for a restarted daemon (root) to adopt it; any other
//! worker exits.

mod filters;
mod jail;
mod zygote;

use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Weak};
use vmm_engine::command::{Command, Labelled};
use vmm_engine::vm::Unnamed;
use vmm_engine::{Error, Vm};
use vmm_protocol::status::Status;
use vmm_protocol::worker::{self, ErrorKind, Event, Reply, Request, SegmentInfo, Spawn};

pub(crate) const SOCKET_FD: i32 = 3;
pub(crate) const KVM_FD: i32 = 4;
/// malloc arenas of a worker (see main).
const WORKER_ARENAS: i32 = 2;
/// Exit status when the jail cannot be entered (EX_OSERR).
const JAIL_FAILED: i32 = 71;
/// The test hook's command (only with `--test-hooks`): makes a system call
/// no filter allows, as a compromised worker would.
const FORBIDDEN_SYSCALL_HOOK: &str = "x-test-forbidden-syscall";

fn parse_args() -> Result<Option<Spawn>, String> {
    let mut a = std::env::args().skip(1);
    let (mut uid, mut gid, mut fds, mut threads, mut test_hooks) = (None, None, None, None, false);
    while let Some(k) = a.next() {
        if k == "--zygote" {
            return Ok(None);
        }
        let mut num = |what: &str| -> Result<u64, String> {
            a.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{what} needs a number"))
        };
        match k.as_str() {
            "--uid" => uid = Some(num("--uid")?),
            "--gid" => gid = Some(num("--gid")?),
            "--max-fds" => fds = Some(num("--max-fds")?),
            "--max-threads" => threads = Some(num("--max-threads")?),
            "--test-hooks" => test_hooks = true,
            _ => return Err(format!("unknown argument '{k}'")),
        }
    }
    let id = |v: Option<u64>, what: &str| -> Result<u32, String> {
        v.and_then(|v| u32::try_from(v).ok())
            .ok_or(format!("{what} missing or out of range"))
    };
    Ok(Some(Spawn {
        uid: id(uid, "--uid")?,
        gid: id(gid, "--gid")?,
        max_fds: fds.ok_or("--max-fds missing")?,
        max_threads: threads.ok_or("--max-threads missing")?,
        test_hooks,
    }))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // The daemon blocks its shutdown signals in every thread, and the mask
    // survives exec: a worker takes signals as any process does.
    // SAFETY: sigprocmask with an empty set.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    let spawn = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmm-worker: {e} (started only by vmmfs)");
            std::process::exit(64);
        }
    };
    close_from(KVM_FD + 1);
    pin_time_zone();
    // glibc sizes its malloc arenas by reading /sys/devices/system/cpu/online
    // the first time a thread needs an arena of its own, which a jailed
    // worker cannot (the filter kills it). A fixed limit skips that; few
    // arenas also keep an idle worker small.
    // SAFETY: mallopt before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, WORKER_ARENAS) };
    // SAFETY: the daemon placed these descriptors; nothing else owns them.
    let sock = unsafe { OwnedFd::from_raw_fd(SOCKET_FD) };
    match spawn {
        Some(s) => run_worker(sock, &s),
        None => {
            // Compiled here once, inherited by every worker it forks.
            if let Err(e) = filters::prepare() {
                log::error!("zygote: cannot compile the seccomp filters: {e}");
                std::process::exit(1);
            }
            // Likewise KVM's CPUID answer (the host's, for every VM).
            // SAFETY: the daemon placed /dev/kvm at KVM_FD; it stays open.
            let kvm = unsafe { BorrowedFd::borrow_raw(KVM_FD) };
            vmm_engine::vm::prefetch_supported_cpuid(kvm);
            zygote::serve(sock)
        }
    }
}

/// glibc reads /etc/localtime whenever a guest's RTC asks for local time,
/// which a jailed worker can neither see nor open (the filter would kill it).
/// So, while the host's files are still there and before any thread exists,
/// TZ is set to the zone's rule: the POSIX TZ string that ends a TZif
/// (version 2 or later) file; UTC if there is none. A TZ from the daemon's
/// environment wins.
fn pin_time_zone() {
    if std::env::var_os("TZ").is_none() {
        let rule = std::fs::read("/etc/localtime")
            .ok()
            .and_then(|d| tzif_rule(&d))
            .unwrap_or_else(|| "UTC0".into());
        std::env::set_var("TZ", rule);
    }
    // SAFETY: tzset parses TZ; no other thread exists yet.
    unsafe { tzset() };
}

extern "C" {
    fn tzset();
}

/// The POSIX TZ string in the footer ("\nRULE\n") of a TZif v2+ file.
fn tzif_rule(data: &[u8]) -> Option<String> {
    if !data.starts_with(b"TZif") || data.get(4).is_none_or(|v| *v < b'2') {
        return None;
    }
    let body = data.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|&b| b == b'\n')? + 1;
    let rule = std::str::from_utf8(&body[start..]).ok()?;
    (!rule.is_empty() && rule.is_ascii()).then(|| rule.to_string())
}

/// Close every descriptor from `first` on: nothing of the daemon's but the
/// socket and /dev/kvm may stay (not /dev/fuse, not a client's file).
pub(crate) fn close_from(first: i32) {
    // SAFETY: close_range on descriptors this process does not use.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
}

/// Jail this process as `spawn` says and serve the daemon on `sock`
/// (descriptor 3; descriptor 4 is /dev/kvm). Never returns.
pub(crate) fn run_worker(sock: OwnedFd, spawn: &Spawn) -> ! {
    // SAFETY: the daemon (or the zygote) placed /dev/kvm here.
    let kvm = unsafe { OwnedFd::from_raw_fd(KVM_FD) };
    let cfg = jail::Config {
        uid: spawn.uid,
        gid: spawn.gid,
        max_fds: spawn.max_fds,
        max_threads: spawn.max_threads,
    };
    if let Err(e) = jail::enter(&cfg) {
        log::error!("cannot enter the jail: {e}");
        std::process::exit(JAIL_FAILED);
    }
    vmm_engine::vm::use_kvm_fd(kvm);
    if let Err(e) = filters::install() {
        log::error!("cannot install the seccomp filter: {e}");
        std::process::exit(JAIL_FAILED);
    }
    // The KVM VM and its default RAM are made now, while this worker is a
    // spare, so that the create it waits for costs neither; its irqchip and
    // PIT follow on a thread of their own, for the first run. One that
    // cannot be made now is tried again at the create, which then reports
    // why.
    let unnamed = Unnamed::new()
        .inspect_err(|e| log::warn!("a spare worker could not make its VM yet: {e}"))
        .ok()
        .map(|mut u| {
            if let Err(e) = u.start_irqchip() {
                log::warn!("a spare worker could not start its irqchip yet: {e}");
            }
            u
        });
    if worker::send(sock.as_fd(), &Event::Ready.to_string(), &[]).is_err() {
        std::process::exit(0);
    }
    serve(sock, spawn.test_hooks, unnamed);
    std::process::exit(0)
}

/// Sends the VM's status to the daemon (whichever connection is current).
/// One at a time: a status computed earlier must not overtake a later one
/// on the socket.
struct Reporter {
    sock: Mutex<Arc<OwnedFd>>,
}

impl Reporter {
    fn current(&self) -> Arc<OwnedFd> {
        self.sock.lock().clone()
    }

    fn status(&self, vm: &Vm) {
        let sock = self.sock.lock();
        let text = vm.status();
        // The engine's text starts with its name line; the daemon adds its own.
        let lines = text.split_once('\n').map_or("", |(_, rest)| rest);
        match Status::parse(lines) {
            Ok(s) => {
                let _ = worker::send(sock.as_fd(), &Event::Status(s).to_string(), &[]);
            }
            Err(e) => log::error!("engine status does not parse: {e}"),
        }
    }
}

/// The daemon's connection ended. Without a listening socket (a spare, or
/// a VM that is not adoptable) the worker ends. Otherwise the guest keeps
/// running and the worker waits, for as long as it takes, for a restarted
/// daemon: a connection from root (only root can reach the socket, which is
/// in the daemon's state directory; the peer's uid is checked all the same).
/// The new daemon gets `ready`, the status and the memory segments.
fn await_daemon(listener: Option<&OwnedFd>, reporter: &Reporter, vm: &Vm, sent: &mut Sent) {
    let Some(listener) = listener else {
        std::process::exit(0)
    };
    log::warn!("the daemon went away: the VM keeps running; waiting for a daemon to adopt it");
    loop {
        // SAFETY: accept4 on our listening socket; no address is asked for.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                log::error!("waiting for the daemon: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            continue;
        }
        // SAFETY: a fresh descriptor.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        match peer_uid(&conn) {
            Some(0) => {}
            other => {
                log::error!("refusing a connection from uid {other:?}: only the daemon may adopt");
                continue;
            }
        }
        if worker::send(conn.as_fd(), &Event::Ready.to_string(), &[]).is_err() {
            continue;
        }
        *reporter.sock.lock() = Arc::new(conn);
        log::info!("adopted by a new daemon");
        reporter.status(vm);
        *sent = Sent::default();
        send_segments(reporter.current().as_fd(), vm, sent);
        return;
    }
}

/// The uid of the process at the other end of `sock`.
fn peer_uid(sock: &OwnedFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len: libc::socklen_t =
        const { vmm_engine::cast::const_u32(std::mem::size_of::<libc::ucred>() as u64) };
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// How often a running guest's counters (exits, boot time) are reported:
/// the engine announces state changes, not counters, and the daemon serves
/// status without asking the worker.
const COUNTER_REPORT: std::time::Duration = std::time::Duration::from_millis(200);

/// Report the status whenever it differs from the last report, every
/// [`COUNTER_REPORT`], for as long as the VM exists.
fn report_counters(vm: &Arc<Vm>, reporter: &Arc<Reporter>) {
    let (weak, r) = (Arc::downgrade(vm), reporter.clone());
    let spawned = std::thread::Builder::new()
        .name("counters".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let mut last = String::new();
            loop {
                std::thread::sleep(COUNTER_REPORT);
                let Some(vm) = weak.upgrade() else { return };
                let now = vm.status();
                if now != last {
                    r.status(&vm);
                    last = now;
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("no counter reports: {e}");
    }
}

/// The segments last sent, by memfd identity.
#[derive(Default)]
struct Sent(Vec<(String, u64, usize)>);

fn send_segments(sock: BorrowedFd<'_>, vm: &Vm, sent: &mut Sent) {
    let segs = vm.segments();
    let now: Vec<(String, u64, usize)> = segs
        .iter()
        .map(|s| (s.name.clone(), s.size, Arc::as_ptr(&s.fd) as usize))
        .collect();
    if now == sent.0 {
        return;
    }
    let ev = Event::Segments(
        segs.iter()
            .map(|s| SegmentInfo {
                name: s.name.clone(),
                size: s.size,
            })
            .collect(),
    );
    let fds: Vec<BorrowedFd<'_>> = segs.iter().map(|s| s.fd.as_fd()).collect();
    if worker::send(sock, &ev.to_string(), &fds).is_ok() {
        sent.0 = now;
    }
}

fn reply_of(r: Result<(), Error>) -> Reply {
    let (kind, message) = match r {
        Ok(()) => return Reply::Ok,
        Err(ref e) => match e {
            Error::InvalidCommand(m) => (ErrorKind::Invalid, m.clone()),
            Error::WrongState(s) => (ErrorKind::State, s.to_string()),
            Error::Destroyed => (ErrorKind::Destroyed, String::new()),
            Error::Unsupported(m) => (ErrorKind::Unsupported, m.clone()),
            Error::NoMemory(m) => (ErrorKind::NoMemory, m.clone()),
            Error::Kvm { what, .. } => (ErrorKind::Os, format!("kvm: {what}")),
            Error::Io { what, .. } => (ErrorKind::Os, what.clone()),
        },
    };
    Reply::Error {
        errno: r.unwrap_err().errno(),
        kind,
        message,
    }
}

fn serve(sock: OwnedFd, test_hooks: bool, mut unnamed: Option<Unnamed>) {
    let reporter = Arc::new(Reporter {
        sock: Mutex::new(Arc::new(sock)),
    });
    let mut vm: Option<Arc<Vm>> = None;
    let mut listener: Option<OwnedFd> = None;
    let mut counters: Option<Arc<Vm>> = None;
    let mut sent = Sent::default();
    loop {
        let sock = reporter.current();
        let (text, fds) = match worker::recv(sock.as_fd()) {
            Ok(Some(m)) => m,
            // The daemon is gone: a VM that cannot be adopted goes with it.
            Ok(None) => {
                match &vm {
                    Some(v) => await_daemon(listener.as_ref(), &reporter, v, &mut sent),
                    None => std::process::exit(0),
                }
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                match &vm {
                    Some(v) => await_daemon(listener.as_ref(), &reporter, v, &mut sent),
                    None => std::process::exit(0),
                }
                continue;
            }
            Err(e) => {
                log::error!("receiving a request: {e}");
                std::process::exit(1);
            }
        };
        let req = match Request::parse(&text) {
            Ok(r) if r.fds() == fds.len() => r,
            _ => {
                log::error!("malformed request from the daemon");
                std::process::exit(1);
            }
        };
        let result = match (req, &vm) {
            (Request::Create { name, adoptable }, None) => match adoptable
                .then(|| listen(fds.into_iter().next()))
                .transpose()
                .and_then(|l| {
                    listener = l;
                    match unnamed.take() {
                        Some(u) => Ok(u.named(&name)),
                        None => Vm::create(&name),
                    }
                }) {
                Ok(v) => {
                    name_process(&name);
                    let v = Arc::new(v);
                    let weak: Weak<Vm> = Arc::downgrade(&v);
                    let r = reporter.clone();
                    v.set_notifier(Box::new(move || {
                        if let Some(v) = weak.upgrade() {
                            r.status(&v);
                        }
                    }));
                    reporter.status(&v);
                    // Its counter thread starts once the create is answered.
                    counters = Some(v.clone());
                    vm = Some(v);
                    Ok(())
                }
                Err(e) => Err(e),
            },
            (Request::Create { .. }, Some(_)) => Err(Error::InvalidCommand("the VM exists".into())),
            (_, None) => Err(Error::InvalidCommand("no VM yet".into())),
            (Request::Exec { labels, command }, Some(v)) => {
                if test_hooks
                    && matches!(&command, Command::Set { key, .. } if key == FORBIDDEN_SYSCALL_HOOK)
                {
                    forbidden_syscall();
                }
                let mut src = Labelled::default();
                for (label, fd) in labels.into_iter().zip(fds) {
                    src.add(label, fd);
                }
                let r = v.execute(command, &mut src);
                // What the engine did not keep is closed now.
                drop(src);
                r
            }
            (Request::Detach, Some(v)) => {
                v.detach();
                Ok(())
            }
        };
        if let Some(v) = &vm {
            send_segments(sock.as_fd(), v, &mut sent);
        }
        let reply = Event::Reply(reply_of(result));
        if worker::send(sock.as_fd(), &reply.to_string(), &[]).is_err() {
            match &vm {
                Some(v) => await_daemon(listener.as_ref(), &reporter, v, &mut sent),
                None => std::process::exit(0),
            }
        }
        if let Some(v) = counters.take() {
            report_counters(&v, &reporter);
        }
    }
}

/// Listen on the socket that came with an adoptable create.
fn listen(fd: Option<OwnedFd>) -> Result<OwnedFd, Error> {
    let fd = fd.ok_or_else(|| Error::InvalidCommand("no listening socket".into()))?;
    // SAFETY: listen on a socket we own. Listening here (not in the daemon)
    // makes this process the one SO_PEERCRED names to the daemon that
    // connects.
    if unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
        return Err(Error::Io {
            what: "listen".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

/// Show `vm:NAME` as this process's command name (ps, /proc/PID/comm), so
/// that an administrator can tell which worker runs which VM.
fn name_process(vm: &str) {
    let mut comm: Vec<u8> = format!("vm:{vm}").into_bytes();
    // The kernel keeps 15 bytes; cut at a character boundary.
    let mut n = comm.len().min(15);
    while n > 0 && std::str::from_utf8(&comm[..n]).is_err() {
        n -= 1;
    }
    comm.truncate(n);
    comm.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr(), 0, 0, 0) };
}

/// A system call no thread of a worker may make. The filter kills the
/// process; should it ever return, the worker ends itself all the same.
fn forbidden_syscall() {
    log::warn!("test hook: making a forbidden system call");
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    log::error!("the forbidden system call returned {fd}: the filter is missing");
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_zone_rules_come_from_tzif_footers() {
        let mut v2 = b"TZif2".to_vec();
        v2.extend_from_slice(&[0; 40]);
        v2.extend_from_slice(b"\nCET-1CEST,M3.5.0,M10.5.0/3\n");
        assert_eq!(
            tzif_rule(&v2).as_deref(),
            Some("CET-1CEST,M3.5.0,M10.5.0/3")
        );
        let mut v1 = v2.clone();
        v1[4] = 0;
        assert_eq!(tzif_rule(&v1), None, "version 1 has no footer");
        assert_eq!(tzif_rule(b"TZif2\n\n"), None, "empty rule");
        assert_eq!(tzif_rule(b"not a zone file\nUTC0\n"), None);
        if let Ok(d) = std::fs::read("/etc/localtime") {
            assert!(tzif_rule(&d).is_some(), "this host's zone has a rule");
        }
    }
}
