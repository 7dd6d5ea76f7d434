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
//!
//! [`backend`] moves frames on the descriptor, [`queues`] between the
//! guest's buffers and the back end.

mod backend;
mod queues;
#[cfg(test)]
mod tests;

use super::{Activation, EpollHelper, VirtioDevice, TYPE_NET};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use virtio_bindings::virtio_net as net;

const F_MTU: u64 = 1 << net::VIRTIO_NET_F_MTU;
const F_MAC: u64 = 1 << net::VIRTIO_NET_F_MAC;
const F_STATUS: u64 = 1 << net::VIRTIO_NET_F_STATUS;

/// Bytes of the virtio-net header in front of every frame.
pub(super) const HDR: usize = 12;
/// MTU advertised for slirp (passt's largest).
pub const SLIRP_MTU: u16 = 65520;
/// Largest frame accepted in either direction (the largest IP packet plus
/// the Ethernet header). A transmit chain longer than header plus this is
/// dropped before anything is copied (as a NIC drops a giant frame); a
/// slirp length word over it ends the stream.
pub(super) const MAX_FRAME: usize = 65535 + 14;
/// Bytes waiting for the back end before transmit stops taking chains.
pub(super) const OUT_LIMIT: usize = 1 << 20;
/// Frames waiting for the back end at most: each costs an allocation, and
/// a flood of 1-byte frames would otherwise queue 200k of them under
/// OUT_LIMIT. Two rings' worth keeps a full ring of small frames moving.
pub(super) const OUT_MAX_FRAMES: usize = 2 * QUEUE_SIZE as usize;
/// Bytes asked of the slirp socket per read: the stream buffer never holds
/// more than one incomplete frame plus this.
pub(super) const STREAM_READ: usize = 64 << 10;
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

/// Why the back end is no longer used.
#[derive(Debug, thiserror::Error)]
pub enum BackendGone {
    #[error("closed by the peer")]
    Closed,
    #[error("hung up")]
    HangUp,
    /// The slirp stream's framing cannot be trusted any more.
    #[error("slirp sent a {len}-byte frame (over {MAX_FRAME}); stream dropped")]
    FrameLength { len: usize },
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error("write: {0}")]
    Write(std::io::Error),
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
    dead: Option<BackendGone>,
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
            dead: None,
            dropped: 0,
        }
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
        self.start_backend();
        super::service::run_rx_tx(self, act, ep);
    }
}
