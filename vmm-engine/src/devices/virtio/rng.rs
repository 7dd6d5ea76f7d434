//! virtio-rnd (entropy device): fills the driver's writable buffers with
//! bytes from getrandom(2).

use super::{Activation, EpollHelper, QueueError, VirtioDevice, TYPE_RNG};
use crate::cast;

/// Bytes served per request at most, from one buffer of this size (a guest
/// asking for gigabytes, e.g. with aliasing buffers, gets a short answer,
/// which the protocol allows; Linux asks for at most a page at a time).
pub(super) const MAX_REQUEST: usize = 64 << 10;

/// Entropy requests in flight at most.
const QUEUE_SIZE: u16 = 64;

#[derive(Default)]
pub struct Rng;

fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writing at most buf.len()-done bytes into buf.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        done += cast::count(r); // r > 0 here
    }
    true
}

impl Rng {
    /// One service round: the requests waiting, a ring's worth at most.
    pub(super) fn serve(act: &mut Activation) -> Result<(), QueueError> {
        let mut buf = vec![0u8; MAX_REQUEST];
        act.serve_queue(0, |ram, c| {
            let want = cast::usize_from(c.writable_len().min(MAX_REQUEST as u64));
            if getrandom(&mut buf[..want]) {
                // At most want <= MAX_REQUEST bytes.
                u32::try_from(c.write_at(ram, 0, &buf[..want])).unwrap_or(u32::MAX)
            } else {
                0
            }
        })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn run(&mut self, act: &mut Activation, ep: &mut EpollHelper) {
        super::service::run_queue(act, ep, Self::serve);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use std::time::Duration;

    /// 16 writable descriptors aliasing the same 4 MiB: the device fills
    /// at most MAX_REQUEST bytes, from a buffer of that size.
    #[test]
    fn aliasing_chain_gets_at_most_max_request() {
        let mut g = TestGuest::new(8 << 20);
        let mut q = g.queue(64);
        let buf = g.alloc(4 << 20);
        q.chain(&g, &[(buf, 4 << 20, true); 16]);
        let (mut act, irq) = g.activate(&[&q]);
        let (r, peak) = heap_peak(|| Rng::serve(&mut act));
        r.unwrap();
        assert!(peak <= 2 * MAX_REQUEST, "{peak} bytes of heap");
        assert_eq!(q.all_used(&g), [(0, u32::try_from(MAX_REQUEST).unwrap())]);
        assert!(!irq.needs_reset());
        assert_eq!(irq.queue_count(0), 1);
    }

    /// A driver that refills the ring as fast as the device empties it
    /// must not keep the device thread from stopping (reset and VM destroy
    /// wait for it).
    #[test]
    fn stops_while_the_driver_keeps_feeding() {
        let mut g = TestGuest::new(1 << 20);
        // A full ring of requests big enough that the driver refills faster
        // than the device empties it.
        let mut q = g.queue(64);
        let buf = g.alloc(64 << 10);
        for _ in 0..64 {
            q.chain(&g, &[(buf, 64 << 10, true)]);
        }
        let (mut act, _irq) = g.activate(&[&q]);
        let kick = act.notify[0].clone();
        let (took, _) = run_then_stop(&mut Rng, &mut act, Duration::from_millis(100), |stop| {
            refeed(&g, &mut q, &kick, stop)
        });
        assert!(took < Duration::from_millis(500), "stop took {took:?}");
    }
}
