//! virtio-console (one port, no MULTIPORT) on descriptors handed over by the
//! client: `device S virtio-console fd=IN:OUT` (or `fd=N` for one
//! descriptor used both ways, e.g. a socket). Queue 0 carries input to the
//! guest, queue 1 its output.
//!
//! The descriptors are shared with the client, so they are never switched
//! to non-blocking: output waits for POLLOUT and writes at most a page at a
//! time (what POLLOUT guarantees for pipes), input reads only after POLLIN.

use super::service::wanted;
use super::{probe, Activation, EpollHelper, QueueError, VirtioDevice, TYPE_CONSOLE};
use crate::cast;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use vmm_sys_util::epoll::EventSet;

const QUEUE_SIZE: u16 = 64;
/// Bytes of one transmit chain at most. Linux's hvc driver hands the port
/// at most a page per buffer, FreeBSD's vtcon 128 bytes; a longer chain
/// (aliasing buffers make one of gigabytes cost the guest nothing) is
/// refused before anything is copied, and the device needs a reset.
pub const TX_CHAIN_MAX: u64 = 64 << 10;
/// Output waiting for the back end before transmit stops taking chains;
/// with TX_CHAIN_MAX, at most twice this is ever held.
const OUT_LIMIT: usize = 64 << 10;
/// Bytes per read from the input and per write to the output: what POLLIN
/// and POLLOUT promise a pipe takes or gives without blocking.
const CHUNK: usize = 4096;

#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub input: Arc<OwnedFd>,
    pub output: Arc<OwnedFd>,
}

pub struct Console {
    cfg: ConsoleConfig,
    out: VecDeque<u8>,
    pending: Vec<u8>,
    in_eof: bool,
    out_dead: bool,
}

impl Console {
    pub fn new(cfg: ConsoleConfig) -> Console {
        Console {
            cfg,
            out: VecDeque::new(),
            pending: Vec::new(),
            in_eof: false,
            out_dead: false,
        }
    }
}

impl super::service::RxTx for Console {
    fn transmit(&mut self, act: &mut Activation) -> Result<bool, QueueError> {
        let ram = act.ram.clone();
        let mut any = false;
        let mut buf = vec![0u8; CHUNK * 4];
        let q = &mut act.queues[1];
        let mut budget = q.size();
        while self.out.len() < OUT_LIMIT && budget > 0 {
            budget -= 1;
            let Some(c) = q.pop(&ram)? else {
                break;
            };
            let total = c.readable_len();
            if total > TX_CHAIN_MAX {
                return Err(QueueError::OverLimit {
                    queue: 1,
                    len: total,
                    max: TX_CHAIN_MAX,
                });
            }
            let mut skip = 0u64;
            while skip < total {
                let n = c.read_at(&ram, skip, &mut buf);
                if n == 0 {
                    break;
                }
                if !self.out_dead {
                    self.out.extend(&buf[..n]);
                }
                skip += n as u64;
            }
            q.push(&ram, c.head, 0)?;
            any = true;
        }
        if budget == 0 {
            act.again(1);
        }
        Ok(any)
    }

    fn flush(&mut self) {
        let fd = self.cfg.output.as_raw_fd();
        while !self.out.is_empty() && !self.out_dead {
            if probe(fd, libc::POLLOUT) & libc::POLLOUT == 0 {
                return;
            }
            let (a, _) = self.out.as_slices();
            let n = a.len().min(CHUNK);
            // SAFETY: writing from a live slice.
            let r = unsafe { libc::write(fd, a.as_ptr().cast(), n) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                    return;
                }
                log::debug!("virtio-console: output: {e}");
                self.out_dead = true;
                self.out.clear();
                return;
            }
            self.out.drain(..cast::count(r)); // r >= 0 here
        }
    }

    fn backend_interest(&self, broken: bool) -> [(RawFd, EventSet); 2] {
        let want_in = !broken && !self.in_eof && self.pending.is_empty();
        let want_out = !self.out.is_empty() && !self.out_dead;
        [
            (self.cfg.input.as_raw_fd(), wanted(EventSet::IN, want_in)),
            (self.cfg.output.as_raw_fd(), wanted(EventSet::OUT, want_out)),
        ]
    }

    fn receive(&mut self, act: &mut Activation) -> Result<bool, QueueError> {
        let ram = act.ram.clone();
        let fd = self.cfg.input.as_raw_fd();
        if self.pending.is_empty()
            && !self.in_eof
            && probe(fd, libc::POLLIN) & (libc::POLLIN | libc::POLLHUP) != 0
        {
            let mut b = vec![0u8; CHUNK];
            // SAFETY: reading into our own buffer after POLLIN.
            let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
            if r > 0 {
                b.truncate(cast::count(r));
                self.pending = b;
            } else if r == 0 {
                self.in_eof = true;
            } else {
                let e = std::io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                    self.in_eof = true;
                }
            }
        }
        let mut any = false;
        let q = &mut act.queues[0];
        let mut budget = q.size();
        while !self.pending.is_empty() && budget > 0 {
            budget -= 1;
            let Some(c) = q.pop(&ram)? else {
                break;
            };
            let n = c.write_at(&ram, 0, &self.pending);
            self.pending.drain(..n);
            // n <= pending.len() <= CHUNK.
            q.push(&ram, c.head, u32::try_from(n).unwrap_or(u32::MAX))?;
            any = true;
        }
        if budget == 0 {
            act.again(0);
        }
        Ok(any)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config(&self) -> Vec<u8> {
        // cols, rows, max_nr_ports, emerg_wr: only meaningful with features
        // we do not offer.
        vec![0u8; 12]
    }

    fn run(&mut self, act: &mut Activation, ep: &mut EpollHelper) {
        super::service::run_rx_tx(self, act, ep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::service::{service_rx_tx, RxTx};
    use crate::devices::virtio::test_utils::*;

    /// Heap one round of the console may hold, whatever the guest queued:
    /// the output buffer and one chain's worth of copy buffer, with room.
    const HEAP_BOUND: usize = 256 << 10;

    /// A console on pipes; returns it with the input's write end and the
    /// output's read end.
    fn console() -> (Console, OwnedFd, OwnedFd) {
        let (in_r, in_w) = pipe();
        let (out_r, out_w) = pipe();
        let con = Console::new(ConsoleConfig {
            input: Arc::new(in_r),
            output: Arc::new(out_w),
        });
        (con, in_w, out_r)
    }

    /// The chain that got the daemon OOM-killed (20 descriptors of 200 MiB
    /// aliasing the same RAM), scaled to 16 x 4 MiB: the host must refuse it
    /// before copying, not after 64 MiB landed in its heap.
    #[test]
    fn aliasing_tx_chain_is_refused_before_any_copy() {
        let mut g = TestGuest::new(8 << 20);
        let (rx, mut tx) = (g.queue(64), g.queue(64));
        let buf = g.alloc(4 << 20);
        tx.chain(&g, &[(buf, 4 << 20, false); 16]);
        let (mut act, irq) = g.activate(&[&rx, &tx]);
        let (mut con, _in_w, out_r) = console();
        let mut broken = false;
        let ((), peak) = heap_peak(|| service_rx_tx(&mut con, &mut act, &mut broken));
        assert!(peak <= HEAP_BOUND, "one chain cost {peak} bytes of heap");
        assert!(irq.needs_reset() && broken, "oversized chain accepted");
        assert!(read_available(&out_r).is_empty());
        assert!(tx.all_used(&g).is_empty());
        // The rule that fired.
        let (mut act, _irq) = g.activate(&[&rx, &tx]);
        assert!(matches!(
            con.transmit(&mut act),
            Err(QueueError::OverLimit {
                queue: 1,
                len: 0x400_0000,
                max: TX_CHAIN_MAX
            })
        ));
    }

    /// Back ends epoll cannot watch (regular files) are always ready, as
    /// poll(2) has them: output is written and input read on the event
    /// loop without waiting for an event that never comes.
    #[test]
    fn regular_file_back_ends_are_served() {
        let mut g = TestGuest::new(1 << 20);
        let (mut rx, mut tx) = (g.queue(64), g.queue(64));
        let (a, b) = (g.alloc(4096), g.alloc(3 * 4096));
        g.write(a, b"to a file\n");
        tx.chain(&g, &[(a, 10, false)]);
        // More input than one read takes: the rest must follow without
        // another notify.
        for k in 0..3 {
            rx.chain(&g, &[(b + k * 4096, 4096, true)]);
        }
        let typed: Vec<u8> = (0..10_000u32).map(|i| cast::low_u8(u64::from(i))).collect();
        let (mut act, _irq) = g.activate(&[&rx, &tx]);
        let memfd = |name| crate::memory::memfd(name, 0).unwrap();
        let (input, output) = (memfd("in"), memfd("out"));
        // SAFETY: writing our bytes at offset 0 of the input memfd.
        let w = unsafe { libc::pwrite(input.as_raw_fd(), typed.as_ptr().cast(), typed.len(), 0) };
        assert_eq!(w, 10_000);
        let mut con = Console::new(ConsoleConfig {
            input: Arc::new(input),
            output: Arc::new(output.try_clone().unwrap()),
        });
        let (took, _) = run_then_stop(
            &mut con,
            &mut act,
            std::time::Duration::from_millis(100),
            |_| {},
        );
        assert!(
            took < std::time::Duration::from_millis(500),
            "stop took {took:?}"
        );
        let mut got = [0u8; 16];
        // SAFETY: reading into our buffer from the output memfd.
        let n = unsafe { libc::pread(output.as_raw_fd(), got.as_mut_ptr().cast(), 16, 0) };
        assert_eq!(&got[..usize::try_from(n).unwrap()], b"to a file\n");
        assert_eq!(rx.all_used(&g), [(0, 4096), (1, 4096), (2, 1808)]);
        assert_eq!(g.read(b, 10_000), typed);
    }

    #[test]
    fn tx_chain_over_several_buffers_arrives_whole() {
        let mut g = TestGuest::new(1 << 20);
        let (rx, mut tx) = (g.queue(64), g.queue(64));
        let (a, b) = (g.alloc(4096), g.alloc(4096));
        g.write(a, b"hello, ");
        g.write(b, b"console\n");
        tx.chain(&g, &[(a, 7, false), (b + 4096, 0, false), (b, 8, false)]);
        let (mut act, irq) = g.activate(&[&rx, &tx]);
        let (mut con, _in_w, out_r) = console();
        let mut broken = false;
        service_rx_tx(&mut con, &mut act, &mut broken);
        assert!(!broken && !irq.needs_reset());
        assert_eq!(read_available(&out_r), b"hello, console\n");
        assert_eq!(tx.all_used(&g).len(), 1);
        assert_eq!(irq.queue_count(1), 1);
    }

    /// Input goes into whatever receive buffers there are, zero-length
    /// ones included, without losing or repeating bytes.
    #[test]
    fn rx_fills_small_and_empty_buffers_in_order() {
        let mut g = TestGuest::new(1 << 20);
        let (mut rx, tx) = (g.queue(64), g.queue(64));
        let buf = g.alloc(4096);
        rx.chain(&g, &[(buf, 0, true)]);
        rx.chain(&g, &[(buf, 3, true)]);
        rx.chain(&g, &[(buf + 8, 64, true)]);
        let (mut act, irq) = g.activate(&[&rx, &tx]);
        let (mut con, in_w, _out_r) = console();
        assert_eq!(
            // SAFETY: `in_w` is a pipe we own; the 7 bytes come from a
            // 7-byte static literal that outlives the call.
            unsafe { libc::write(in_w.as_raw_fd(), b"abcdefg".as_ptr().cast(), 7) },
            7
        );
        let mut broken = false;
        service_rx_tx(&mut con, &mut act, &mut broken);
        assert!(!irq.needs_reset());
        let used = rx.all_used(&g);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 3, 4]);
        assert_eq!(g.read(buf, 3), b"abc");
        assert_eq!(g.read(buf + 8, 4), b"defg");
    }
}
