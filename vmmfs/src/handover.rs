//! The descriptor hand-over socket (`vmm.sock`; protocol in
//! `vmm_protocol::handover`). One thread serves every connection with
//! non-blocking sockets: no client can make it wait. Connections are bounded
//! per user and in all, and expire unless attached to a handle in time.

use crate::creds::Creds;
use crate::error::{FsError, FsResult};
use crate::jails::Jails;
use crate::policy;
use crate::received::{self, Received};
use crate::sched::Closer;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, UnixCredentials};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_protocol::handover::{Ack, Fds, Greeting, Nonce, MAX_FDS_PER_MESSAGE, MAX_MESSAGE};

/// An unattached connection is closed after this long: attaching is the
/// client's next step, a few milliseconds after connecting.
const ATTACH_WITHIN: Duration = Duration::from_secs(10);
/// Connections of one user at a time (a launch needs one per VM handle).
const MAX_CONNS_PER_USER: usize = 32;
/// Connections in all (each costs the daemon a descriptor).
const MAX_CONNS: usize = 4096;

/// Where descriptors go once received and checked.
pub trait Deliver: Send + Sync + 'static {
    /// `fds` (label, descriptor) for handle `fh`. On error none is kept.
    fn deliver(&self, fh: u64, fds: Vec<(i32, Received)>) -> Result<(), (FsError, Vec<OwnedFd>)>;
}

struct Conn {
    sock: OwnedFd,
    /// Real uid of the connecting process: whose budget the connection uses.
    user: u32,
    /// Credentials of the connecting process.
    peer: Creds,
    since: Instant,
    nonce: Nonce,
    /// The handle this connection belongs to, and its opener's credentials.
    bound: Option<(u64, Creds)>,
    /// Its handle was released: the serving thread closes it (only that
    /// thread closes sockets, so none is closed while it polls them).
    dead: bool,
}

#[derive(Default)]
struct Conns {
    all: HashMap<u64, Conn>,
    by_nonce: HashMap<Nonce, u64>,
    per_user: HashMap<u32, usize>,
    next: u64,
}

impl Conns {
    fn remove(&mut self, id: u64) -> Option<Conn> {
        let c = self.all.remove(&id)?;
        self.by_nonce.remove(&c.nonce);
        if let Some(n) = self.per_user.get_mut(&c.user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&c.user);
            }
        }
        Some(c)
    }
}

/// The hand-over service.
pub struct Handover {
    conns: Mutex<Conns>,
    wake: nix::sys::eventfd::EventFd,
    jails: Arc<Jails>,
    closer: Arc<Closer>,
    /// Device number of the vmmfs mount, once known.
    own_dev: Mutex<Option<(u32, u32)>>,
    /// The daemon's descriptor limits (root's reserve).
    limits: crate::policy::Limits,
}

fn nonce() -> Nonce {
    let mut n = [0u8; 16];
    let mut got = 0;
    while got < n.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), n.len() - got, 0) };
        if let Some(k) = usize::try_from(r).ok().filter(|&k| k > 0) {
            got += k;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // The kernel's random pool never fails once booted; a nonce is
            // not a secret worth stopping the daemon for, but make it loud.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    Nonce(n)
}

fn send_text(sock: &OwnedFd, text: &str) -> bool {
    socket::send(
        sock.as_raw_fd(),
        text.as_bytes(),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )
    .is_ok_and(|n| n == text.len())
}

impl Handover {
    pub fn new(
        jails: Arc<Jails>,
        closer: Arc<Closer>,
        limits: crate::policy::Limits,
    ) -> std::io::Result<Handover> {
        Ok(Handover {
            conns: Mutex::new(Conns::default()),
            wake: nix::sys::eventfd::EventFd::from_flags(
                nix::sys::eventfd::EfdFlags::EFD_CLOEXEC
                    | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
            )?,
            jails,
            closer,
            own_dev: Mutex::new(None),
            limits,
        })
    }

    /// The vmmfs mount's device number (files on it are refused).
    pub fn set_own_dev(&self, dev: Option<(u32, u32)>) {
        *self.own_dev.lock() = dev;
    }

    /// `attach NONCE` from `writer` on handle `fh`, opened by `opener`.
    pub fn attach(&self, nonce: &Nonce, fh: u64, opener: &Creds, writer_pid: u32) -> FsResult<()> {
        let mut c = self.conns.lock();
        let id = *c
            .by_nonce
            .get(nonce)
            .ok_or_else(|| FsError::Invalid("no connection waits with that nonce".into()))?;
        let conn = c.all.get_mut(&id).expect("indexed connections exist");
        policy::authority(
            opener,
            &conn.peer,
            writer_pid,
            "attach (connecting process)",
        )?;
        conn.bound = Some((fh, opener.clone()));
        c.by_nonce.remove(nonce);
        drop(c);
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Handle `fh` was released: its connection goes too.
    pub fn release(&self, fh: u64) {
        let mut c = self.conns.lock();
        let mut any = false;
        for conn in c.all.values_mut() {
            if conn.bound.as_ref().is_some_and(|(f, _)| *f == fh) {
                conn.dead = true;
                any = true;
            }
        }
        drop(c);
        if any {
            let _ = self.wake.write(1);
        }
    }

    /// Serve `listener` (a non-blocking SOCK_SEQPACKET socket) forever.
    pub fn serve(self: Arc<Self>, listener: OwnedFd, deliver: Arc<dyn Deliver>) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            self.sweep();
            let (ids, raw): (Vec<u64>, Vec<(RawFd, bool)>) = {
                let c = self.conns.lock();
                c.all
                    .iter()
                    .map(|(id, conn)| (*id, (conn.sock.as_raw_fd(), conn.bound.is_some())))
                    .unzip()
            };
            let ready: Vec<(u64, bool)> = {
                // SAFETY: only this thread closes connections' sockets, so
                // they stay open while it polls them.
                let borrowed: Vec<std::os::fd::BorrowedFd> = raw
                    .iter()
                    .map(|(fd, _)| unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) })
                    .collect();
                let mut fds = vec![
                    PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
                ];
                for (b, (_, bound)) in borrowed.iter().zip(&raw) {
                    // Unattached connections are only watched for hang-up.
                    let ev = if *bound {
                        PollFlags::POLLIN
                    } else {
                        PollFlags::empty()
                    };
                    fds.push(PollFd::new(*b, ev));
                }
                if let Err(e) = poll(&mut fds, PollTimeout::from(1000u16)) {
                    if e != nix::errno::Errno::EINTR {
                        log::error!("hand-over socket: poll: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    continue;
                }
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    let _ = self.wake.read();
                }
                if fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLIN))
                {
                    self.accept_all(&listener);
                }
                fds[2..]
                    .iter()
                    .zip(&ids)
                    .filter_map(|(p, id)| {
                        let r = p.revents()?;
                        if r.intersects(
                            PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL,
                        ) && !r.contains(PollFlags::POLLIN)
                        {
                            Some((*id, false))
                        } else if r.contains(PollFlags::POLLIN) {
                            Some((*id, true))
                        } else {
                            None
                        }
                    })
                    .collect()
            };
            for (id, readable) in ready {
                if !readable || !self.receive(id, deliver.as_ref()) {
                    self.conns.lock().remove(id);
                }
            }
        }
    }

    /// Close released connections and those not attached in time.
    fn sweep(&self) {
        let mut c = self.conns.lock();
        let old: Vec<u64> = c
            .all
            .iter()
            .filter(|(_, conn)| {
                conn.dead || (conn.bound.is_none() && conn.since.elapsed() > ATTACH_WITHIN)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            c.remove(id);
        }
    }

    fn accept_all(&self, listener: &OwnedFd) {
        loop {
            let fd = match socket::accept4(
                listener.as_raw_fd(),
                socket::SockFlag::SOCK_CLOEXEC | socket::SockFlag::SOCK_NONBLOCK,
            ) {
                // SAFETY: accept4 returned a new descriptor.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
                Err(_) => return,
            };
            self.admit(fd);
        }
    }

    fn admit(&self, sock: OwnedFd) {
        let Ok(cred) = socket::getsockopt(&sock, socket::sockopt::PeerCredentials) else {
            return;
        };
        let Ok(pid) = u32::try_from(cred.pid()) else {
            return;
        };
        let Ok(peer) = Creds::of_thread(pid, &self.jails) else {
            return;
        };
        let user = peer.ruid();
        // Each connection is a descriptor of the daemon: root's reserve stays.
        let reserve_kept =
            user == 0 || crate::policy::fds_available(crate::fds::in_use(), 1, &self.limits);
        let mut c = self.conns.lock();
        let mine = c.per_user.get(&user).copied().unwrap_or(0);
        if !reserve_kept || c.all.len() >= MAX_CONNS || (user != 0 && mine >= MAX_CONNS_PER_USER) {
            drop(c);
            log::warn!(
                "hand-over connection of uid {user} refused: {} connections ({mine} of theirs)",
                MAX_CONNS
            );
            let _ = send_text(
                &sock,
                &Ack::Error {
                    errno: libc::EMFILE,
                    message: "too many hand-over connections".into(),
                }
                .to_string(),
            );
            return;
        }
        // Credentials with every message, to check each sender.
        if socket::setsockopt(&sock, socket::sockopt::PassCred, &true).is_err() {
            return;
        }
        let n = nonce();
        if !send_text(&sock, &Greeting(n).to_string()) {
            return;
        }
        let id = c.next;
        c.next += 1;
        c.by_nonce.insert(n, id);
        *c.per_user.entry(user).or_default() += 1;
        c.all.insert(
            id,
            Conn {
                sock,
                user,
                peer,
                since: Instant::now(),
                nonce: n,
                bound: None,
                dead: false,
            },
        );
    }

    /// Read one message of connection `id`; false: drop the connection.
    fn receive(&self, id: u64, deliver: &dyn Deliver) -> bool {
        let (raw, user, bound) = {
            let c = self.conns.lock();
            let Some(conn) = c.all.get(&id) else {
                return false;
            };
            let Some(bound) = conn.bound.clone() else {
                return true;
            };
            (conn.sock.as_raw_fd(), conn.user, bound)
        };
        let mut buf = [0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE], UnixCredentials);
        let (len, flags, fds, sender) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match socket::recvmsg::<()>(
                raw,
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return true,
                Err(_) => return false,
            };
            let mut fds = Vec::new();
            let mut sender = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::ScmRights(v) => {
                            // SAFETY: the kernel installed these descriptors for us.
                            fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                        }
                        // No pid (not one that fits): no sender, refused.
                        ControlMessageOwned::ScmCredentials(uc) => {
                            sender = u32::try_from(uc.pid()).ok()
                        }
                        _ => {}
                    }
                }
            }
            (msg.bytes, msg.flags, fds, sender)
        };
        if len == 0 && fds.is_empty() {
            return false; // orderly shutdown
        }
        let ack = self.check_and_deliver(user, &buf[..len], flags, fds, sender, &bound, deliver);
        let conn_alive = {
            let c = self.conns.lock();
            c.all
                .get(&id)
                .is_some_and(|conn| send_text(&conn.sock, &ack.to_string()))
        };
        conn_alive
    }

    #[allow(clippy::too_many_arguments)]
    fn check_and_deliver(
        &self,
        user: u32,
        text: &[u8],
        flags: MsgFlags,
        fds: Vec<OwnedFd>,
        sender: Option<u32>,
        bound: &(u64, Creds),
        deliver: &dyn Deliver,
    ) -> Ack {
        let refuse = |errno: i32, message: String, fds: Vec<OwnedFd>| {
            self.closer.close(user, fds);
            Ack::Error { errno, message }
        };
        if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return refuse(
                libc::EINVAL,
                format!("a message carries at most {MAX_FDS_PER_MESSAGE} descriptors and {MAX_MESSAGE} bytes"),
                fds,
            );
        }
        if self.closer.backlog(user) >= crate::sched::MAX_CLOSE_BACKLOG {
            return refuse(
                libc::EAGAIN,
                "descriptors of yours are still being closed".into(),
                fds,
            );
        }
        let labels = match std::str::from_utf8(text)
            .map_err(|_| ())
            .and_then(|t| Fds::parse(t).map_err(|_| ()))
        {
            Ok(l) => l.0,
            Err(()) => return refuse(libc::EINVAL, "expected 'fds N...'".into(), fds),
        };
        if labels.len() != fds.len() {
            return refuse(
                libc::EINVAL,
                format!("{} labels for {} descriptors", labels.len(), fds.len()),
                fds,
            );
        }
        // The sender, not only the connecting process, must be the opener.
        let sender_creds =
            sender.and_then(|pid| Creds::of_thread(pid, &self.jails).ok().map(|c| (pid, c)));
        let Some((pid, sender_creds)) = sender_creds else {
            return refuse(libc::EPERM, "the sending process is gone".into(), fds);
        };
        let (fh, opener) = bound;
        if let Err(e) = policy::authority(opener, &sender_creds, pid, "descriptor hand-over") {
            return refuse(e.errno(), e.to_string(), fds);
        }
        let own_dev = *self.own_dev.lock();
        let mut checked = Vec::with_capacity(fds.len());
        let mut fds = fds.into_iter();
        for label in labels {
            let fd = fds.next().expect("as many descriptors as labels");
            match received::classify(&fd, own_dev) {
                Ok(kind) => checked.push((label, Received { fd, kind })),
                Err(why) => {
                    let mut all: Vec<OwnedFd> = checked
                        .into_iter()
                        .map(|(_, r): (i32, Received)| r.fd)
                        .collect();
                    all.push(fd);
                    all.extend(fds);
                    return refuse(libc::EINVAL, format!("descriptor {label}: {why}"), all);
                }
            }
        }
        match deliver.deliver(*fh, checked) {
            Ok(()) => Ack::Ok,
            Err((e, back)) => refuse(e.errno(), e.to_string(), back),
        }
    }
}
