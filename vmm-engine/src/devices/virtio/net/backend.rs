//! The slirp and tap back ends: frames from the descriptor into `pending`
//! and from `out_frames` onto it, never blocking the device thread. A back
//! end that fails, hangs up or breaks its framing is gone
//! ([`BackendGone`]): no more reads or writes.

use super::super::probe;
use super::{BackendGone, Net, NetBackend, MAX_FRAME, STREAM_READ};
use crate::cast;
use std::os::fd::AsRawFd;

/// The option length of a `timeval` for setsockopt.
const TIMEVAL_LEN: libc::socklen_t = cast::const_u32(std::mem::size_of::<libc::timeval>() as u64);

/// The error of a failed call, unless it only means "not now" (EAGAIN,
/// EINTR).
fn failure() -> Option<std::io::Error> {
    let e = std::io::Error::last_os_error();
    (!matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))).then_some(e)
}

impl Net {
    /// Stop using the back end.
    pub(super) fn gone(&mut self, why: BackendGone) {
        match why {
            BackendGone::FrameLength { .. } => log::warn!("virtio-net: back end {why}"),
            _ => log::debug!("virtio-net: back end {why}"),
        }
        self.dead = Some(why);
    }

    /// A new activation: frames left from an earlier one belong to a reset
    /// device. A slirp socket gets its send timeout (a stuck passt holds
    /// the device thread 200 ms at most per frame).
    pub(super) fn start_backend(&mut self) {
        self.pending = None;
        self.stream.clear();
        self.stream_at = 0;
        if self.cfg.backend != NetBackend::Slirp {
            return;
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setsockopt with a timeval we own; the socket is ours alone.
        unsafe {
            libc::setsockopt(
                self.cfg.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                TIMEVAL_LEN,
            )
        };
    }

    /// Read from the back end into `pending` (one frame at most).
    pub(super) fn fill_pending(&mut self) {
        if self.pending.is_some() || self.dead.is_some() {
            return;
        }
        match self.cfg.backend {
            NetBackend::Slirp => self.read_slirp(),
            NetBackend::Tap => self.read_tap(),
        }
    }

    /// The next frame of the slirp stream, reading more of it as needed.
    fn read_slirp(&mut self) {
        loop {
            let s = &self.stream[self.stream_at..];
            if let Some(word) = s.first_chunk::<4>() {
                let len = u32::from_be_bytes(*word) as usize;
                if len > MAX_FRAME {
                    return self.gone(BackendGone::FrameLength { len });
                }
                if s.len() >= 4 + len {
                    self.pending = Some(s[4..4 + len].to_vec());
                    self.stream_at += 4 + len;
                    return;
                }
            }
            self.stream.drain(..self.stream_at);
            self.stream_at = 0;
            let have = self.stream.len();
            self.stream.resize(have + STREAM_READ, 0);
            // SAFETY: receiving into the spare tail of the buffer.
            let r = unsafe {
                libc::recv(
                    self.cfg.fd.as_raw_fd(),
                    self.stream[have..].as_mut_ptr().cast(),
                    STREAM_READ,
                    libc::MSG_DONTWAIT,
                )
            };
            self.stream.truncate(have + cast::count(r)); // a failure adds nothing
            if r == 0 {
                return self.gone(BackendGone::Closed);
            }
            if r < 0 {
                if let Some(e) = failure() {
                    self.gone(BackendGone::Read(e));
                }
                return;
            }
        }
    }

    /// One frame from the tap, if it has one now.
    fn read_tap(&mut self) {
        let fd = self.cfg.fd.as_raw_fd();
        if probe(fd, libc::POLLIN) & libc::POLLIN == 0 {
            return;
        }
        let mut b = vec![0u8; MAX_FRAME];
        // SAFETY: reading into our own buffer.
        let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
        if r > 0 {
            b.truncate(cast::count(r));
            self.pending = Some(b);
        } else if r == 0 {
            self.gone(BackendGone::Closed);
        } else if let Some(e) = failure() {
            self.gone(BackendGone::Read(e));
        }
    }

    /// Write what the back end will take. Each slirp frame (length word
    /// included) goes out in one send(2): a Unix stream then queues it as one
    /// buffer, so passt never sees a frame split across reads (older passt
    /// releases lose the stream's framing when a frame arrives in pieces).
    /// The socket has a send timeout, so a stuck passt cannot hold the
    /// device thread for long.
    pub(super) fn write_frames(&mut self) {
        let fd = self.cfg.fd.as_raw_fd();
        while let Some(f) = self.out_frames.front_mut() {
            if probe(fd, libc::POLLOUT) & libc::POLLOUT == 0 {
                return;
            }
            // SAFETY: sending/writing from a live buffer.
            let r = unsafe {
                match self.cfg.backend {
                    NetBackend::Slirp => {
                        libc::send(fd, f.as_ptr().cast(), f.len(), libc::MSG_NOSIGNAL)
                    }
                    NetBackend::Tap => libc::write(fd, f.as_ptr().cast(), f.len()),
                }
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return,
                    _ => {
                        // Drop what cannot be sent rather than spin.
                        self.out_frames.clear();
                        self.out_bytes = 0;
                        return self.gone(BackendGone::Write(e));
                    }
                }
            }
            let n = cast::count(r); // r >= 0 here
            if self.cfg.backend == NetBackend::Slirp && n < f.len() {
                // Timed out part-way: the rest must still follow.
                f.drain(..n);
                self.out_bytes -= n;
                return;
            }
            self.out_bytes -= f.len();
            self.out_frames.pop_front();
        }
    }
}
