//! The daemon <-> VM worker protocol.
//!
//! Each VM runs in a worker process of its own (vmmfs(8) ISOLATION). The
//! daemon and the worker talk over a `SOCK_SEQPACKET` socketpair: one message
//! is one [`Request`] or [`Event`] as text, descriptors ride along with
//! SCM_RIGHTS in the order the text names them.
//!
//! - daemon -> worker: [`Request`]s, one at a time: the worker answers each
//!   with a [`Reply`] before the daemon sends the next.
//! - worker -> daemon: [`Event::Ready`] once its jail is set up, then
//!   [`Event::Status`] whenever the VM changes (from any of its threads),
//!   [`Event::Segments`] when its memory segments change (the memfds ride
//!   along: the daemon serves `vmm.io` from them without mapping them), and a
//!   [`Event::Reply`] per request.
//!
//! When the daemon dies, a worker whose VM was created `adoptable` keeps it
//! and accepts a connection from the next daemon on its listening socket;
//! the new connection starts with [`Event::Ready`], then the status and the
//! segments, as a new worker's would.
//!
//! The daemon trusts nothing a worker says beyond its own VM: every message
//! is parsed strictly, and a malformed one ends the worker.

use crate::command::Command;
use crate::status::Status;
use crate::{ParseError, Result};
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Largest message either side sends.
pub const MAX_MESSAGE: usize = 8192;
/// Most descriptors in one message: a command names at most 2; a VM has a
/// few memory segments.
pub const MAX_FDS: usize = 8;
/// Longest segment name.
pub const MAX_SEGMENT_NAME: usize = 32;

/// A segment name: 1 to MAX_SEGMENT_NAME of [a-z0-9_] (`vmm.io/VM.NAME`).
pub fn valid_segment_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SEGMENT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// What the daemon asks of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `create NAME [adoptable]`: make the VM (the worker's first request).
    /// With `adoptable`, a listening `SOCK_SEQPACKET` socket rides along:
    /// when the daemon's connection ends, the worker keeps its VM and waits
    /// on that socket for a restarted daemon to adopt it.
    Create { name: String, adoptable: bool },
    /// `exec LABELS COMMAND`: run a `vmm/NAME` command. `labels` are the
    /// client's descriptor labels the command names (`-` for none), in the
    /// order the descriptors are attached.
    Exec { labels: Vec<i32>, command: Command },
    /// `detach`: the client that ran the guest went away.
    Detach,
}

/// Why a request failed: the engine's error, as the client will see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    State,
    Destroyed,
    Unsupported,
    NoMemory,
    /// An OS call failed: the message says what, the errno says how.
    Os,
}

impl ErrorKind {
    fn name(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::State => "state",
            ErrorKind::Destroyed => "destroyed",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::NoMemory => "nomem",
            ErrorKind::Os => "os",
        }
    }

    fn parse(s: &str) -> Result<ErrorKind> {
        Ok(match s {
            "invalid" => ErrorKind::Invalid,
            "state" => ErrorKind::State,
            "destroyed" => ErrorKind::Destroyed,
            "unsupported" => ErrorKind::Unsupported,
            "nomem" => ErrorKind::NoMemory,
            "os" => ErrorKind::Os,
            _ => return Err(ParseError(format!("unknown error kind '{s}'"))),
        })
    }
}

/// The answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ok`
    Ok,
    /// `error ERRNO KIND MESSAGE` (MESSAGE: one line, may be empty).
    Error {
        errno: i32,
        kind: ErrorKind,
        message: String,
    },
}

/// A memory segment a worker shares; its memfd rides along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub name: String,
    pub size: u64,
}

/// What a worker tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `ready`: jailed, waiting for [`Request::Create`].
    Ready,
    /// `reply ...`: see [`Reply`].
    Reply(Reply),
    /// `status` and the status lines ([`Status`]'s Display).
    Status(Status),
    /// `segments [NAME=SIZE ...]`: the VM's segments now, guest RAM first,
    /// one memfd each, in order.
    Segments(Vec<SegmentInfo>),
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Create { name, adoptable } => {
                write!(
                    f,
                    "create {name}{}",
                    if *adoptable { " adoptable" } else { "" }
                )
            }
            Request::Exec { labels, command } => {
                if labels.is_empty() {
                    write!(f, "exec - {command}")
                } else {
                    let l: Vec<String> = labels.iter().map(i32::to_string).collect();
                    write!(f, "exec {} {command}", l.join(","))
                }
            }
            Request::Detach => write!(f, "detach"),
        }
    }
}

impl Request {
    /// Descriptors that must ride with this request.
    pub fn fds(&self) -> usize {
        match self {
            Request::Exec { labels, .. } => labels.len(),
            Request::Create {
                adoptable: true, ..
            } => 1,
            _ => 0,
        }
    }

    pub fn parse(text: &str) -> Result<Request> {
        let bad = |why: &str| ParseError(format!("worker request: {why}"));
        let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
        match verb {
            "create" => {
                let (name, adoptable) = match rest.split_once(' ') {
                    Some((name, "adoptable")) => (name, true),
                    Some(_) => return Err(bad("create NAME [adoptable]")),
                    None => (rest, false),
                };
                crate::vmmctl::validate_name(name)?;
                Ok(Request::Create {
                    name: name.into(),
                    adoptable,
                })
            }
            "detach" if rest.is_empty() => Ok(Request::Detach),
            "exec" => {
                let (labels, line) = rest
                    .split_once(' ')
                    .ok_or_else(|| bad("exec LABELS COMMAND"))?;
                let labels = if labels == "-" {
                    Vec::new()
                } else {
                    labels
                        .split(',')
                        .map(|n| match n.parse::<i32>() {
                            // Canonical decimal only: the text is one message's whole truth.
                            Ok(v) if v >= 0 && v.to_string() == n => Ok(v),
                            _ => Err(bad(&format!("bad label '{n}'"))),
                        })
                        .collect::<Result<Vec<i32>>>()?
                };
                if labels.len() > MAX_FDS {
                    return Err(bad("too many descriptors"));
                }
                Ok(Request::Exec {
                    labels,
                    command: Command::parse(line)?,
                })
            }
            _ => Err(bad(&format!("unknown request '{verb}'"))),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Ready => write!(f, "ready"),
            Event::Reply(Reply::Ok) => write!(f, "reply ok"),
            Event::Reply(Reply::Error {
                errno,
                kind,
                message,
            }) => write!(
                f,
                "reply error {errno} {} {}",
                kind.name(),
                one_line(message)
            ),
            Event::Status(s) => write!(f, "status\n{s}"),
            Event::Segments(segs) => {
                write!(f, "segments")?;
                for s in segs {
                    write!(f, " {}={}", s.name, s.size)?;
                }
                Ok(())
            }
        }
    }
}

impl Event {
    /// Descriptors that must ride with this event.
    pub fn fds(&self) -> usize {
        match self {
            Event::Segments(s) => s.len(),
            _ => 0,
        }
    }

    pub fn parse(text: &str) -> Result<Event> {
        let bad = |why: &str| ParseError(format!("worker event: {why}"));
        if let Some(lines) = text.strip_prefix("status\n") {
            return Ok(Event::Status(Status::parse(lines)?));
        }
        if text.contains('\n') {
            return Err(bad("one line expected"));
        }
        let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
        match (verb, rest) {
            ("ready", "") => Ok(Event::Ready),
            ("reply", "ok") => Ok(Event::Reply(Reply::Ok)),
            ("reply", r) => {
                let r = r
                    .strip_prefix("error ")
                    .ok_or_else(|| bad("reply ok|error"))?;
                let mut it = r.splitn(3, ' ');
                let errno = it
                    .next()
                    .and_then(|e| e.parse::<i32>().ok())
                    .filter(|e| (1..4096).contains(e))
                    .ok_or_else(|| bad("bad errno"))?;
                let kind = ErrorKind::parse(it.next().unwrap_or(""))?;
                let message = it.next().unwrap_or("").to_string();
                Ok(Event::Reply(Reply::Error {
                    errno,
                    kind,
                    message,
                }))
            }
            ("segments", r) => {
                let mut segs = Vec::new();
                for item in r.split(' ').filter(|s| !s.is_empty()) {
                    let (name, size) = item
                        .split_once('=')
                        .ok_or_else(|| bad("segment NAME=SIZE"))?;
                    if !valid_segment_name(name) {
                        return Err(bad(&format!("bad segment name '{name}'")));
                    }
                    let size = size
                        .parse::<u64>()
                        .ok()
                        .filter(|_| size.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| bad("bad segment size"))?;
                    if segs.iter().any(|s: &SegmentInfo| s.name == name) {
                        return Err(bad("segment named twice"));
                    }
                    segs.push(SegmentInfo {
                        name: name.into(),
                        size,
                    });
                }
                if segs.len() > MAX_FDS {
                    return Err(bad("too many segments"));
                }
                Ok(Event::Segments(segs))
            }
            _ => Err(bad(&format!("unknown event '{verb}'"))),
        }
    }
}

/// The daemon asks its zygote (a pre-started, not yet jailed `vmm-worker`)
/// for a new worker: `spawn UID GID MAX_FDS MAX_THREADS HOOKS`, with the
/// worker's end of its socketpair attached. Forking a process that has
/// already loaded and initialised is much cheaper than starting a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawn {
    pub uid: u32,
    pub gid: u32,
    pub max_fds: u64,
    pub max_threads: u64,
    /// Honour the test hook (`set x-test-forbidden-syscall=1`).
    pub test_hooks: bool,
}

impl fmt::Display for Spawn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spawn {} {} {} {} {}",
            self.uid,
            self.gid,
            self.max_fds,
            self.max_threads,
            u8::from(self.test_hooks)
        )
    }
}

impl Spawn {
    pub fn parse(text: &str) -> Result<Spawn> {
        let bad = || ParseError(format!("zygote request: '{text}'"));
        let f: Vec<&str> = text.split(' ').collect();
        let num = |s: &str| -> Result<u64> {
            s.parse::<u64>()
                .ok()
                .filter(|n| n.to_string() == s)
                .ok_or_else(bad)
        };
        let id = |s: &str| -> Result<u32> {
            u32::try_from(num(s)?)
                .ok()
                .filter(|&n| n != 0 && n != u32::MAX)
                .ok_or_else(bad)
        };
        match f.as_slice() {
            ["spawn", uid, gid, fds, threads, hooks] => Ok(Spawn {
                uid: id(uid)?,
                gid: id(gid)?,
                max_fds: num(fds)?,
                max_threads: num(threads)?,
                test_hooks: match *hooks {
                    "0" => false,
                    "1" => true,
                    _ => return Err(bad()),
                },
            }),
            _ => Err(bad()),
        }
    }
}

/// The zygote's answer: `spawned PID` with the new worker's pidfd attached
/// (the worker is the daemon's child: it was cloned with CLONE_PARENT), or
/// `failed ERRNO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spawned {
    Pid(u32),
    Failed(i32),
}

impl fmt::Display for Spawned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spawned::Pid(p) => write!(f, "spawned {p}"),
            Spawned::Failed(e) => write!(f, "failed {e}"),
        }
    }
}

impl Spawned {
    pub fn parse(text: &str) -> Result<Spawned> {
        let bad = || ParseError(format!("zygote answer: '{text}'"));
        let (verb, n) = text.split_once(' ').ok_or_else(bad)?;
        let n: u32 = n
            .parse()
            .ok()
            .filter(|v: &u32| v.to_string() == n)
            .ok_or_else(bad)?;
        match verb {
            "spawned" if n > 1 => Ok(Spawned::Pid(n)),
            "failed" if (1..4096).contains(&n) => {
                Ok(Spawned::Failed(i32::try_from(n).map_err(|_| bad())?))
            }
            _ => Err(bad()),
        }
    }
}

/// Send `text` with `fds` as one message. EPIPE/ECONNRESET mean the other
/// side is gone.
pub fn send(sock: BorrowedFd<'_>, text: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    if text.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: text.as_ptr() as *mut libc::c_void,
        iov_len: text.len(),
    };
    let mut cbuf = vec![0u64; cmsg_words(raw.len())];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        let bytes = fd_bytes(raw.len());
        msg.msg_control = cbuf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        // SAFETY: the control buffer holds one header and `bytes` of data.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    loop {
        // SAFETY: msg describes live buffers.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The SCM_RIGHTS payload size of `fds` descriptors (at least one, at most
/// MAX_FDS), as the u32 the CMSG_* macros take. Every caller passes at most
/// MAX_FDS (send checks it first), so the clamp never changes a value.
fn fd_bytes(fds: usize) -> u32 {
    #[allow(clippy::cast_possible_truncation)] // fits: at most MAX_FDS (8) × 4 bytes
    let bytes = (fds.clamp(1, MAX_FDS) * std::mem::size_of::<i32>()) as u32;
    bytes
}

fn cmsg_words(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    let bytes = unsafe { libc::CMSG_SPACE(fd_bytes(fds)) };
    (bytes as usize).div_ceil(8)
}

/// One received message: its text and the descriptors that came with it
/// (close-on-exec). `Ok(None)`: the other side closed the socket.
/// Truncated messages or descriptor lists are errors (EMSGSIZE), and the
/// descriptors that did arrive are closed.
pub fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cbuf = vec![0u64; cmsg_words(MAX_FDS)];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.len() * 8;
        // SAFETY: msg describes live buffers.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into cbuf.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const i32;
                    let len = (*c).cmsg_len - (data as usize - c as usize);
                    for i in 0..len / std::mem::size_of::<i32>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        // n >= 0 here (checked above), so unsigned_abs is n itself.
        let text = String::from_utf8(buf[..n.unsigned_abs()].to_vec())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EBADMSG))?;
        return Ok(Some((text, fds)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Exit, State};
    use proptest::prelude::*;
    use std::os::fd::AsFd;

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just("run"),
            Just("memory 64M"),
            Just("com1 3 4"),
            Just("device 3 virtio-blk fd=7,ro"),
            Just("cmdline console=ttyS0 quiet"),
            Just("set a=b"),
        ]
        .prop_map(|l| Command::parse(l).unwrap())
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            ("[a-z0-9_-]{1,20}", any::<bool>())
                .prop_map(|(name, adoptable)| Request::Create { name, adoptable }),
            Just(Request::Detach),
            (
                proptest::collection::vec(0..100_000i32, 0..MAX_FDS),
                command()
            )
                .prop_map(|(labels, command)| Request::Exec { labels, command }),
        ]
    }

    fn event() -> impl Strategy<Value = Event> {
        let kind = prop_oneof![
            Just(ErrorKind::Invalid),
            Just(ErrorKind::State),
            Just(ErrorKind::Destroyed),
            Just(ErrorKind::Unsupported),
            Just(ErrorKind::NoMemory),
            Just(ErrorKind::Os),
        ];
        prop_oneof![
            Just(Event::Ready),
            Just(Event::Reply(Reply::Ok)),
            (1..4096i32, kind, "[ -~]{0,60}").prop_map(|(errno, kind, message)| {
                Event::Reply(Reply::Error {
                    errno,
                    kind,
                    message,
                })
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(memory, exits)| Event::Status(Status {
                state: State::Exited(Exit::error("worker died")),
                cpus: 2,
                memory,
                exits,
                io_exits: 1,
                boot_time_us: Some(5),
                boot_io_exits: None,
                resident: None,
            })),
            proptest::collection::vec(("[a-z_]{1,8}", any::<u64>()), 0..3).prop_map(|v| {
                let mut segs: Vec<SegmentInfo> = Vec::new();
                for (name, size) in v {
                    if !segs.iter().any(|s| s.name == name) {
                        segs.push(SegmentInfo { name, size });
                    }
                }
                Event::Segments(segs)
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn requests_round_trip(r in request()) {
            prop_assert_eq!(Request::parse(&r.to_string()), Ok(r));
        }

        #[test]
        fn events_round_trip(e in event()) {
            prop_assert_eq!(Event::parse(&e.to_string()), Ok(e));
        }

        #[test]
        fn parsers_never_panic(text in "[ -~\\n]{0,120}") {
            let _ = Request::parse(&text);
            let _ = Event::parse(&text);
            let _ = Spawn::parse(&text);
            let _ = Spawned::parse(&text);
        }

        #[test]
        fn zygote_messages_round_trip(
            uid in 1..u32::MAX,
            gid in 1..u32::MAX,
            max_fds: u64,
            max_threads: u64,
            test_hooks: bool,
            pid in 2..u32::MAX,
            errno in 1..4096i32,
        ) {
            let s = Spawn { uid, gid, max_fds, max_threads, test_hooks };
            prop_assert_eq!(Spawn::parse(&s.to_string()), Ok(s));
            prop_assert_eq!(Spawned::parse(&Spawned::Pid(pid).to_string()), Ok(Spawned::Pid(pid)));
            prop_assert_eq!(
                Spawned::parse(&Spawned::Failed(errno).to_string()),
                Ok(Spawned::Failed(errno))
            );
        }
    }

    #[test]
    fn refusals() {
        for t in [
            "create a/b",
            "create ",
            "detach now",
            "exec 1,,2 run",
            "exec -1 run",
            "exec +1 run",
            "exec - frobnicate",
            "exec 1,2,3,4,5,6,7,8,9 run",
            "shutdown",
        ] {
            assert!(Request::parse(t).is_err(), "{t}");
        }
        for t in [
            "spawn 0 1 1 1 0",
            "spawn 1 4294967295 1 1 0",
            "spawn 1 1 1 1 2",
            "spawn 1 1 01 1 0",
            "spawn 1 1 1 1",
        ] {
            assert!(Spawn::parse(t).is_err(), "{t}");
        }
        for t in [
            "spawned 0",
            "spawned 1",
            "failed 0",
            "spawned +5",
            "spawned",
        ] {
            assert!(Spawned::parse(t).is_err(), "{t}");
        }
        for t in [
            "ready now",
            "reply maybe",
            "reply error 0 os x",
            "reply error 22 weird x",
            "segments sysmem",
            "segments SYS=1",
            "segments a=1 a=2",
            "segments a=-1",
            "status\nname=x\n",
            "ready\nready",
        ] {
            assert!(Event::parse(t).is_err(), "{t}");
        }
        let e = Event::Reply(Reply::Error {
            errno: 22,
            kind: ErrorKind::Invalid,
            message: "two\nlines".into(),
        });
        assert_eq!(e.to_string(), "reply error 22 invalid two lines");
    }

    #[test]
    fn descriptors_travel_with_the_text() {
        let mut sv = [0i32; 2];
        // SAFETY: socketpair writes two descriptors.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let f = std::fs::File::open("/dev/null").unwrap();
        send(a.as_fd(), "segments a=1", &[f.as_fd()]).unwrap();
        let (text, fds) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(text, "segments a=1");
        assert_eq!(fds.len(), 1);
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC,
            "received close-on-exec"
        );
        let too_many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| f.as_fd()).collect();
        assert!(send(a.as_fd(), "x", &too_many).is_err());
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none(), "EOF");
    }
}
