//! virtio-net's queues: transmit chains become frames for the back end,
//! frames from it fill receive chains. A frame that breaks a rule is
//! dropped ([`Dropped`]), as a NIC drops it; the queues go on.

use super::super::queue::Chain;
use super::super::service::{wanted, RxTx};
use super::super::{Activation, QueueError, Ram};
use super::{BackendGone, Net, NetBackend, HDR, MAX_FRAME, OUT_LIMIT, OUT_MAX_FRAMES};
use crate::cast;
use std::os::fd::{AsRawFd, RawFd};
use vmm_sys_util::epoll::EventSet;

/// Why a frame was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// A transmit chain of no frame, or of one over the largest (checked
    /// before anything is copied).
    #[error("transmit chain of {len} bytes: no frame, or over {MAX_FRAME} after the header")]
    TxSize { len: u64 },
    /// A received frame larger than the receive chain (dropped, not cut).
    #[error("{frame}-byte frame for a {room}-byte receive buffer")]
    RxRoom { frame: usize, room: u64 },
}

/// The frame's bytes in a transmit chain of `len` readable bytes.
pub(super) fn tx_frame_len(len: u64) -> Result<usize, Dropped> {
    let total = cast::usize_from(len);
    if total > HDR && total <= HDR + MAX_FRAME {
        Ok(total - HDR)
    } else {
        Err(Dropped::TxSize { len })
    }
}

/// Write the header and `frame` into receive chain `c`; the bytes used.
pub(super) fn deliver(ram: &Ram, c: &Chain, frame: &[u8]) -> Result<u32, Dropped> {
    let room = c.writable_len();
    if room < (HDR + frame.len()) as u64 {
        return Err(Dropped::RxRoom {
            frame: frame.len(),
            room,
        });
    }
    let mut hdr = [0u8; HDR];
    hdr[10] = 1; // num_buffers
    let a = c.write_at(ram, 0, &hdr);
    let b = c.write_at(ram, HDR as u64, frame);
    // At most HDR + frame.len() <= HDR + MAX_FRAME bytes.
    Ok(u32::try_from(a + b).unwrap_or(0))
}

impl Net {
    fn drop_frame(&mut self, why: &Dropped) {
        log::trace!("virtio-net: dropped a frame: {why}");
        self.dropped += 1;
    }

    /// Take transmit chain `c` as one frame for the back end, copied once
    /// straight into the buffer that goes out (slirp: behind its length
    /// word).
    fn take_frame(&mut self, ram: &Ram, c: &Chain) {
        let len = match tx_frame_len(c.readable_len()) {
            Ok(len) => len,
            Err(why) => return self.drop_frame(&why),
        };
        let pre = if self.cfg.backend == NetBackend::Slirp {
            4
        } else {
            0
        };
        let mut v = vec![0u8; pre + len];
        let n = c.read_at(ram, HDR as u64, &mut v[pre..]);
        v.truncate(pre + n);
        if pre > 0 {
            // n <= len <= MAX_FRAME.
            v[..4].copy_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
        }
        self.out_bytes += v.len();
        self.out_frames.push_back(v);
    }
}

impl RxTx for Net {
    /// Take transmit chains while the back end keeps up.
    fn transmit(&mut self, act: &mut Activation) -> Result<bool, QueueError> {
        let ram = act.ram.clone();
        let mut any = false;
        let mut budget = act.queues[1].size();
        while self.out_bytes < OUT_LIMIT && self.out_frames.len() < OUT_MAX_FRAMES && budget > 0 {
            budget -= 1;
            let Some(c) = act.queues[1].pop(&ram)? else {
                break;
            };
            self.take_frame(&ram, &c);
            act.queues[1].push(&ram, c.head, 0)?;
            any = true;
        }
        if budget == 0 {
            act.again(1);
        }
        Ok(any)
    }

    fn flush(&mut self) {
        self.write_frames();
    }

    /// Read while a frame can be delivered; write while frames wait.
    fn backend_interest(&self, broken: bool) -> [(RawFd, EventSet); 2] {
        let fd = self.cfg.fd.as_raw_fd();
        let alive = self.dead.is_none();
        let want_in = alive && self.pending.is_none() && !broken;
        let want_out = self.out_bytes > 0 && alive;
        [
            (fd, wanted(EventSet::IN, want_in)),
            (fd, wanted(EventSet::OUT, want_out)),
        ]
    }

    /// A hang-up or error with nothing left to read ends the back end.
    fn backend_event(&mut self, events: EventSet) {
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !events.contains(EventSet::IN)
        {
            self.gone(BackendGone::HangUp);
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
            let n = deliver(&ram, &c, &frame).unwrap_or_else(|why| {
                self.drop_frame(&why);
                0
            });
            act.queues[0].push(&ram, c.head, n)?;
            any = true;
        }
        if budget == 0 {
            act.again(0);
        }
        Ok(any)
    }
}
