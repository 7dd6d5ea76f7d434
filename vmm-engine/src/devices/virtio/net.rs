//! virtio-net with two back ends on a descriptor handed over by the client:
//! - `slirp`: a Unix stream socket connected to passt, frames in QEMU's
//!   stream framing (4-byte big-endian length, then the Ethernet frame);
//! - `tap`: an opened tap device (IFF_TAP | IFF_NO_PI), one frame per
//!   read/write.
//!
//! Queue 0 receives (host to guest), queue 1 transmits. No offloads: every
//! frame carries the 12-byte virtio 1.x header, zeroed on receive. The back
//! end is never allowed to block the device thread: writes wait in a bounded
//! buffer for POLLOUT, and a frame that finds no receive buffer waits (and
//! stops further reads) until the driver posts one.

use super::queue::Chain;
use super::service::wanted;
use super::{probe, Activation, EpollHelper, QueueError, Ram, VirtioDevice, TYPE_NET};
use crate::cast;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use vmm_sys_util::epoll::EventSet;

/// The option length of a `timeval` for setsockopt.
const TIMEVAL_LEN: libc::socklen_t = cast::const_u32(std::mem::size_of::<libc::timeval>() as u64);
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;

/// Bytes of the virtio-net header in front of every frame.
const HDR: usize = 12;
/// MTU advertised for slirp (passt's largest).
pub const SLIRP_MTU: u16 = 65520;
/// Largest frame accepted in either direction (the largest IP packet plus
/// the Ethernet header). A transmit chain longer than header plus this is
/// dropped before anything is copied (as a NIC drops a giant frame); a
/// slirp length word over it ends the stream.
const MAX_FRAME: usize = 65535 + 14;
/// Bytes waiting for the back end before transmit stops taking chains.
const OUT_LIMIT: usize = 1 << 20;
/// Frames waiting for the back end at most: each costs an allocation, and
/// a flood of 1-byte frames would otherwise queue 200k of them under
/// OUT_LIMIT. Two rings' worth keeps a full ring of small frames moving.
const OUT_MAX_FRAMES: usize = 2 * QUEUE_SIZE as usize;
/// Bytes asked of the slirp socket per read: the stream buffer never holds
/// more than one incomplete frame plus this.
const STREAM_READ: usize = 64 << 10;
const QUEUE_SIZE: u16 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetBackend {
    Slirp,
    Tap,
}

/// Options of `device S virtio-net slirp|tap,fd=N[,mac=xx:xx:xx:xx:xx:xx]`.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub backend: NetBackend,
    pub fd: Arc<OwnedFd>,
    pub mac: [u8; 6],
}

/// Parse `xx:xx:xx:xx:xx:xx`; multicast addresses are refused.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    (m[0] & 1 == 0 && m != [0; 6]).then_some(m)
}

/// A stable MAC for a VM and slot: bhyve's OUI 58:9c:fc plus a hash.
pub fn default_mac(vm: &str, slot: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in vm.bytes().chain([0]).chain(slot.bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let h = h.to_be_bytes();
    [0x58, 0x9c, 0xfc, h[1], h[2], h[3]]
}

pub struct Net {
    cfg: NetConfig,
    /// Frames for the back end (slirp: with their length word).
    out_frames: VecDeque<Vec<u8>>,
    /// Bytes in `out_frames`.
    out_bytes: usize,
    /// slirp: stream bytes read; those before `stream_at` are split off
    /// already (dropped in one move before the next read, not per frame).
    stream: Vec<u8>,
    stream_at: usize,
    /// A frame waiting for a receive buffer.
    pending: Option<Vec<u8>>,
    /// The back end hung up or failed: no more reads.
    dead: bool,
    pub dropped: u64,
}

impl Net {
    pub fn new(cfg: NetConfig) -> Net {
        Net {
            cfg,
            out_frames: VecDeque::new(),
            out_bytes: 0,
            stream: Vec::new(),
            stream_at: 0,
            pending: None,
            dead: false,
            dropped: 0,
        }
    }

    fn out_len(&self) -> usize {
        self.out_bytes
    }

    /// Read from the back end into `pending` (one frame at most).
    fn fill_pending(&mut self) {
        if self.pending.is_some() || self.dead {
            return;
        }
        let fd = self.cfg.fd.as_raw_fd();
        match self.cfg.backend {
            NetBackend::Slirp => loop {
                let s = &self.stream[self.stream_at..];
                if let Some(word) = s.first_chunk::<4>() {
                    let len = u32::from_be_bytes(*word) as usize;
                    if len > MAX_FRAME {
                        log::warn!("virtio-net: slirp sent a {len}-byte frame; stream dropped");
                        self.dead = true;
                        return;
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
                        fd,
                        self.stream[have..].as_mut_ptr().cast(),
                        STREAM_READ,
                        libc::MSG_DONTWAIT,
                    )
                };
                self.stream.truncate(have + cast::count(r)); // a failure adds nothing
                if r == 0 {
                    log::debug!("virtio-net: slirp back end closed");
                    self.dead = true;
                    return;
                }
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EAGAIN)
                        && e.raw_os_error() != Some(libc::EINTR)
                    {
                        log::debug!("virtio-net: slirp read: {e}");
                        self.dead = true;
                    }
                    return;
                }
            },
            NetBackend::Tap => {
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
                    self.dead = true;
                } else {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EAGAIN)
                        && e.raw_os_error() != Some(libc::EINTR)
                    {
                        log::debug!("virtio-net: tap read: {e}");
                        self.dead = true;
                    }
                }
            }
        }
    }

    fn deliver(ram: &Ram, c: &Chain, frame: &[u8]) -> Option<u32> {
        if c.writable_len() < (HDR + frame.len()) as u64 {
            return None;
        }
        let mut hdr = [0u8; HDR];
        hdr[10] = 1; // num_buffers
        let a = c.write_at(ram, 0, &hdr);
        let b = c.write_at(ram, HDR as u64, frame);
        // At most HDR + frame.len() <= HDR + MAX_FRAME bytes.
        u32::try_from(a + b).ok()
    }
}

impl super::service::RxTx for Net {
    /// Take transmit chains while the back end keeps up.
    fn transmit(&mut self, act: &mut Activation) -> Result<bool, QueueError> {
        let ram = act.ram.clone();
        let mut any = false;
        let pre = if self.cfg.backend == NetBackend::Slirp {
            4
        } else {
            0
        };
        let q = &mut act.queues[1];
        let mut budget = q.size();
        while self.out_bytes < OUT_LIMIT && self.out_frames.len() < OUT_MAX_FRAMES && budget > 0 {
            budget -= 1;
            let Some(c) = q.pop(&ram)? else {
                break;
            };
            let total = cast::usize_from(c.readable_len());
            if total > HDR && total <= HDR + MAX_FRAME {
                // One copy, straight into the buffer that goes to the back
                // end (slirp: behind its length word).
                let mut v = vec![0u8; pre + total - HDR];
                let n = c.read_at(&ram, HDR as u64, &mut v[pre..]);
                v.truncate(pre + n);
                if pre > 0 {
                    // n <= total - HDR <= MAX_FRAME.
                    v[..4].copy_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
                }
                self.out_bytes += v.len();
                self.out_frames.push_back(v);
            } else {
                self.dropped += 1;
            }
            q.push(&ram, c.head, 0)?;
            any = true;
        }
        if budget == 0 {
            act.again(1);
        }
        Ok(any)
    }

    /// Write what the back end will take. Each slirp frame (length word
    /// included) goes out in one send(2): a Unix stream then queues it as one
    /// buffer, so passt never sees a frame split across reads (older passt
    /// releases lose the stream's framing when a frame arrives in pieces).
    /// The socket has a send timeout, so a stuck passt cannot hold the
    /// device thread for long.
    fn flush(&mut self) {
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
                        log::debug!("virtio-net: back end write: {e}");
                        // Drop what cannot be sent rather than spin.
                        self.out_frames.clear();
                        self.out_bytes = 0;
                        self.dead = true;
                        return;
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

    /// Read while a frame can be delivered; write while frames wait.
    fn backend_interest(&self, broken: bool) -> [(RawFd, EventSet); 2] {
        let fd = self.cfg.fd.as_raw_fd();
        let want_in = !self.dead && self.pending.is_none() && !broken;
        let want_out = self.out_len() > 0 && !self.dead;
        [
            (fd, wanted(EventSet::IN, want_in)),
            (fd, wanted(EventSet::OUT, want_out)),
        ]
    }

    /// A hang-up or error with nothing left to read ends the back end.
    fn backend_event(&mut self, events: EventSet) {
        log::trace!(
            "net: out {} pending {:?} dead {} events {events:?}",
            self.out_len(),
            self.pending.as_ref().map(|p| p.len()),
            self.dead
        );
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !events.contains(EventSet::IN)
        {
            self.dead = true;
        }
    }

    /// Move frames from the back end into receive buffers.
    fn receive(&mut self, act: &mut Activation) -> Result<bool, QueueError> {
        let ram = act.ram.clone();
        let mut any = false;
        let mut budget = act.queues[0].size();
        while budget > 0 {
            budget -= 1;
            self.fill_pending();
            let Some(frame) = self.pending.take() else {
                break;
            };
            let q = &mut act.queues[0];
            let Some(c) = q.pop(&ram)? else {
                self.pending = Some(frame);
                break;
            };
            let n = match Self::deliver(&ram, &c, &frame) {
                Some(n) => n,
                None => {
                    self.dropped += 1;
                    0
                }
            };
            q.push(&ram, c.head, n)?;
            any = true;
        }
        if budget == 0 {
            act.again(0);
        }
        Ok(any)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn features(&self) -> u64 {
        let mut f = F_MAC | F_STATUS;
        if self.cfg.backend == NetBackend::Slirp {
            f |= F_MTU;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[0..6].copy_from_slice(&self.cfg.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // link up
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // one queue pair
        let mtu = match self.cfg.backend {
            NetBackend::Slirp => SLIRP_MTU,
            NetBackend::Tap => 1500,
        };
        c[10..12].copy_from_slice(&mtu.to_le_bytes());
        c
    }

    fn run(&mut self, act: &mut Activation, ep: &mut EpollHelper) {
        let fd = self.cfg.fd.as_raw_fd();
        // Frames left from an earlier activation belong to a reset device.
        self.pending = None;
        self.stream.clear();
        self.stream_at = 0;
        if self.cfg.backend == NetBackend::Slirp {
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: setsockopt with a timeval we own; the socket is ours alone.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    TIMEVAL_LEN,
                )
            };
        }
        super::service::run_rx_tx(self, act, ep);
    }
}

#[cfg(test)]
mod tests {
    // Test code: casts of small fixed test values and test-side syscall results.
    #![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

    use super::*;
    use crate::devices::virtio::service::service_rx_tx;
    use crate::devices::virtio::test_utils::*;
    use std::time::Duration;

    /// A net device on one end of a socketpair of `kind` (stream: slirp,
    /// datagram: stands in for a tap, one frame per read and write);
    /// returns it with the other end.
    fn net(backend: NetBackend) -> (Net, OwnedFd) {
        let kind = match backend {
            NetBackend::Slirp => libc::SOCK_STREAM,
            NetBackend::Tap => libc::SOCK_DGRAM,
        };
        let (ours, theirs) = socketpair(kind);
        let n = Net::new(NetConfig {
            backend,
            fd: Arc::new(ours),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        });
        (n, theirs)
    }

    fn send(fd: &OwnedFd, data: &[u8]) {
        // SAFETY: sending our buffer on our socket.
        let r = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
        assert_eq!(r, data.len() as isize);
    }

    #[test]
    fn tx_frames_reach_both_back_ends() {
        for backend in [NetBackend::Slirp, NetBackend::Tap] {
            let mut g = TestGuest::new(1 << 20);
            let (rx, mut tx) = (g.queue(16), g.queue(16));
            let buf = g.alloc(4096);
            g.write(buf, &[0; HDR]);
            g.write(buf + HDR as u64, b"frame one");
            tx.chain(
                &g,
                &[
                    (buf, HDR as u32 + 5, false),
                    (buf + HDR as u64 + 5, 4, false),
                ],
            );
            let (mut act, irq) = g.activate(&[&rx, &tx]);
            let (mut n, peer) = net(backend);
            let mut broken = false;
            service_rx_tx(&mut n, &mut act, &mut broken);
            assert!(!broken && !irq.needs_reset());
            let want: &[u8] = match backend {
                NetBackend::Slirp => b"\0\0\0\x09frame one",
                NetBackend::Tap => b"frame one",
            };
            assert_eq!(read_available(&peer), want, "{backend:?}");
            assert_eq!(tx.all_used(&g), [(0, 0)]);
        }
    }

    /// 16 descriptors aliasing one MiB: far over the largest frame, so
    /// dropped before anything is copied.
    #[test]
    fn aliasing_tx_chain_over_max_frame_is_dropped() {
        let mut g = TestGuest::new(4 << 20);
        let (rx, mut tx) = (g.queue(16), g.queue(16));
        let buf = g.alloc(1 << 20);
        tx.chain(&g, &[(buf, 1 << 20, false); 16]);
        let (mut act, irq) = g.activate(&[&rx, &tx]);
        let (mut n, peer) = net(NetBackend::Slirp);
        let mut broken = false;
        let ((), peak) = heap_peak(|| service_rx_tx(&mut n, &mut act, &mut broken));
        assert!(peak <= 256 << 10, "{peak} bytes of heap");
        assert!(!irq.needs_reset());
        assert_eq!(tx.all_used(&g), [(0, 0)]);
        assert_eq!(n.dropped, 1);
        assert!(read_available(&peer).is_empty());
    }

    /// A driver sending 1-byte frames as fast as it can to a back end that
    /// takes nothing: the frames waiting for it stay bounded in number and
    /// bytes, and the device still stops at once.
    #[test]
    fn tx_flood_into_a_stalled_back_end_is_bounded() {
        let mut g = TestGuest::new(1 << 20);
        let (rx, mut tx) = (g.queue(256), g.queue(256));
        let buf = g.alloc(4096);
        for _ in 0..256 {
            tx.chain(&g, &[(buf, HDR as u32 + 1, false)]);
        }
        let (mut act, _irq) = g.activate(&[&rx, &tx]);
        let kick = act.notify[1].clone();
        let (mut n, _peer) = net(NetBackend::Slirp);
        let (took, peak) = run_then_stop(&mut n, &mut act, Duration::from_millis(300), |stop| {
            refeed(&g, &mut tx, &kick, stop)
        });
        assert!(took < Duration::from_millis(500), "stop took {took:?}");
        assert!(
            n.out_frames.len() <= 1024,
            "{} frames held",
            n.out_frames.len()
        );
        assert!(peak <= 2 << 20, "{peak} bytes of heap");
    }

    /// Many small frames in one read from passt arrive in order, each in
    /// its own receive buffer.
    #[test]
    fn slirp_small_frames_arrive_in_order() {
        let mut g = TestGuest::new(1 << 20);
        let (mut rx, tx) = (g.queue(256), g.queue(16));
        let bufs = g.alloc(200 * 64);
        for i in 0..200u64 {
            rx.chain(&g, &[(bufs + 64 * i, 64, true)]);
        }
        let (mut act, _irq) = g.activate(&[&rx, &tx]);
        let (mut n, peer) = net(NetBackend::Slirp);
        let mut stream = Vec::new();
        for i in 0..200u32 {
            let len = 1 + i % 40;
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend((0..len).map(|k| (i + k) as u8));
        }
        send(&peer, &stream);
        let mut broken = false;
        service_rx_tx(&mut n, &mut act, &mut broken);
        let used = rx.all_used(&g);
        assert_eq!(used.len(), 200);
        for (i, (id, len)) in used.into_iter().enumerate() {
            let i = i as u32;
            let want: Vec<u8> = (0..1 + i % 40).map(|k| (i + k) as u8).collect();
            assert_eq!(len as usize, HDR + want.len(), "frame {i}");
            let got = g.read(bufs + 64 * u64::from(id) + HDR as u64, want.len());
            assert_eq!(got, want, "frame {i}");
        }
    }

    /// A length word over the largest frame: the stream cannot be trusted
    /// any more, so the device stops reading it (nothing is allocated for it).
    #[test]
    fn slirp_length_word_over_max_frame_stops_reading() {
        let mut g = TestGuest::new(1 << 20);
        let (mut rx, tx) = (g.queue(16), g.queue(16));
        let buf = g.alloc(1 << 17);
        rx.chain(&g, &[(buf, 1 << 17, true)]);
        let (mut act, _irq) = g.activate(&[&rx, &tx]);
        let (mut n, peer) = net(NetBackend::Slirp);
        send(&peer, &u32::MAX.to_be_bytes());
        let mut broken = false;
        let ((), peak) = heap_peak(|| service_rx_tx(&mut n, &mut act, &mut broken));
        assert!(n.dead);
        assert!(peak <= 256 << 10, "{peak} bytes of heap");
        assert!(rx.all_used(&g).is_empty());
    }

    /// A frame larger than the receive buffer is dropped, not cut.
    #[test]
    fn rx_frame_larger_than_the_buffer_is_dropped() {
        let mut g = TestGuest::new(1 << 20);
        let (mut rx, tx) = (g.queue(16), g.queue(16));
        let buf = g.alloc(4096);
        rx.chain(&g, &[(buf, HDR as u32 + 10, true)]);
        rx.chain(&g, &[(buf, HDR as u32 + 100, true)]);
        let (mut act, _irq) = g.activate(&[&rx, &tx]);
        let (mut n, peer) = net(NetBackend::Tap);
        send(&peer, &[7u8; 11]);
        send(&peer, &[8u8; 10]);
        let mut broken = false;
        service_rx_tx(&mut n, &mut act, &mut broken);
        assert_eq!(rx.all_used(&g), [(0, 0), (1, HDR as u32 + 10)]);
        assert_eq!(n.dropped, 1);
        assert_eq!(g.read(buf + HDR as u64, 10), [8u8; 10]);
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("00:a0:98:00:00:01"),
            Some([0, 0xa0, 0x98, 0, 0, 1])
        );
        assert_eq!(parse_mac("01:00:00:00:00:00"), None);
        assert_eq!(parse_mac("00:00:00:00:00"), None);
        assert_eq!(parse_mac("00:00:00:00:00:zz"), None);
        let a = default_mac("vm1", "3");
        assert_eq!(a, default_mac("vm1", "3"));
        assert_ne!(a, default_mac("vm2", "3"));
        assert_eq!(&a[..3], &[0x58, 0x9c, 0xfc]);
    }
}
