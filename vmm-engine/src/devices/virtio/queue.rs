//! Split virtqueues: the transport's view while the driver sets a queue up,
//! and the device thread's view (rust-vmm `virtio-queue` over guest RAM) with
//! the checks device code relies on: every descriptor of a chain lies in
//! RAM, chains end (no loops, no index past the table), the available index
//! never runs more than a queue ahead.

use super::Ram;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

/// Largest chain a device accepts; longer ones are treated as broken.
pub const MAX_CHAIN: usize = 1024;

/// Driver-side settings of one queue, as written to the common configuration.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueConfig {
    pub fn new(max_size: u16) -> QueueConfig {
        QueueConfig {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Build the device-side queue; Err explains what the driver got wrong.
    pub fn build(&self, ram: &Ram, index: usize) -> Result<VirtQueue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| format!("queue {index}: {e}"))?;
        q.try_set_size(self.size)
            .map_err(|e| format!("queue {index}: size {}: {e}", self.size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|e| format!("queue {index}: descriptor table {:#x}: {e}", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|e| format!("queue {index}: available ring {:#x}: {e}", self.avail))?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|e| format!("queue {index}: used ring {:#x}: {e}", self.used))?;
        q.set_ready(true);
        if !q.is_valid(&ram.mem) {
            return Err(format!("queue {index}: rings not in guest RAM"));
        }
        Ok(VirtQueue { q, index })
    }
}

/// One buffer of a chain, already checked to lie in guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A descriptor chain taken from the available ring.
#[derive(Debug)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Desc>,
}

impl Chain {
    /// Total bytes of the device-readable part.
    pub fn readable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| !d.write)
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// Total bytes of the device-writable part.
    pub fn writable_len(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.write)
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// Gather up to `buf.len()` readable bytes starting `skip` bytes in.
    pub fn read_at(&self, ram: &Ram, mut skip: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        for d in self.descs.iter().filter(|d| !d.write) {
            if done == buf.len() {
                break;
            }
            let len = u64::from(d.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = ((len - skip) as usize).min(buf.len() - done);
            if !ram.read(d.addr + skip, &mut buf[done..done + n]) {
                break;
            }
            done += n;
            skip = 0;
        }
        done
    }

    /// Scatter `data` into the writable buffers starting `skip` bytes in.
    pub fn write_at(&self, ram: &Ram, mut skip: u64, data: &[u8]) -> usize {
        let mut done = 0;
        for d in self.descs.iter().filter(|d| d.write) {
            if done == data.len() {
                break;
            }
            let len = u64::from(d.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = ((len - skip) as usize).min(data.len() - done);
            if !ram.write(d.addr + skip, &data[done..done + n]) {
                break;
            }
            done += n;
            skip = 0;
        }
        done
    }
}

/// The driver broke the queue protocol.
#[derive(Debug)]
pub struct QueueError(pub String);

/// A live queue on the device thread.
pub struct VirtQueue {
    q: Queue,
    pub index: usize,
}

impl VirtQueue {
    pub fn size(&self) -> u16 {
        self.q.size()
    }

    /// Next available chain, if any.
    pub fn pop(&mut self, ram: &Ram) -> Result<Option<Chain>, QueueError> {
        let idx = self.index;
        let size = self.q.size();
        let mut it = self
            .q
            .iter(&ram.mem)
            .map_err(|e| QueueError(format!("queue {idx}: {e}")))?;
        let Some(chain) = it.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        if head >= size {
            return Err(QueueError(format!(
                "queue {idx}: head index {head} >= size {size}"
            )));
        }
        let mut descs = Vec::new();
        let mut last_next = false;
        for d in chain {
            if descs.len() >= MAX_CHAIN {
                return Err(QueueError(format!("queue {idx}: chain too long")));
            }
            let (addr, len) = (d.addr().0, d.len());
            if len > 0 && ram.host(addr, len as usize).is_none() {
                return Err(QueueError(format!(
                    "queue {idx}: buffer {addr:#x}+{len:#x} outside guest RAM"
                )));
            }
            last_next = d.has_next();
            descs.push(Desc {
                addr,
                len,
                write: d.is_write_only(),
            });
        }
        // The crate stops at queue-size descriptors or an index past the
        // table; a chain that still says "next" then was a loop or bad link.
        if descs.is_empty() || last_next {
            return Err(QueueError(format!(
                "queue {idx}: descriptor chain at {head} is unterminated (loop or bad index)"
            )));
        }
        Ok(Some(Chain { head, descs }))
    }

    /// Return a chain with `len` bytes written.
    pub fn push(&mut self, ram: &Ram, head: u16, len: u32) -> Result<(), QueueError> {
        let idx = self.index;
        self.q
            .add_used(&ram.mem, head, len)
            .map_err(|e| QueueError(format!("queue {idx}: used ring: {e}")))
    }

    /// Ask the driver not to notify (VRING_USED_F_NO_NOTIFY) while the
    /// device is busy draining the ring anyway.
    pub fn disable_notify(&mut self, ram: &Ram) {
        let _ = self.q.disable_notification(&ram.mem);
    }

    /// Ask for notifications again; true when buffers arrived meanwhile
    /// (the caller must look again, or it would sleep on a non-empty ring).
    pub fn enable_notify(&mut self, ram: &Ram) -> Result<bool, QueueError> {
        let idx = self.index;
        self.q
            .enable_notification(&ram.mem)
            .map_err(|e| QueueError(format!("queue {idx}: {e}")))
    }

    /// Should the driver be interrupted (it may ask not to be)?
    pub fn needs_notification(&mut self, ram: &Ram) -> bool {
        self.q.needs_notification(&ram.mem).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;

    fn setup(size: u16) -> (TestGuest, DriverQueue, u64) {
        let mut g = TestGuest::new(1 << 20);
        let q = g.queue(size);
        let buf = g.alloc(4096);
        (g, q, buf)
    }

    fn pop_one(g: &TestGuest, q: &DriverQueue) -> Result<Option<Chain>, QueueError> {
        let mut vq = q.config().build(&g.ram, 0).unwrap();
        vq.pop(&g.ram)
    }

    /// Indirect descriptors were never offered: a chain using one breaks
    /// the protocol (and would reach past the queue size: up to 65535
    /// descriptors in one table).
    #[test]
    fn indirect_descriptor_is_a_protocol_error() {
        let (g, mut q, buf) = setup(16);
        let table = buf + 1024;
        for i in 0..4u16 {
            let d = RawDesc {
                addr: buf,
                len: 8,
                flags: if i < 3 { NEXT } else { 0 },
                next: i + 1,
            };
            d.write_to(&g, table + 16 * u64::from(i));
        }
        q.set_desc(
            &g,
            0,
            RawDesc {
                addr: table,
                len: 64,
                flags: INDIRECT,
                next: 0,
            },
        );
        q.publish(&g, 0);
        assert!(pop_one(&g, &q).is_err(), "indirect table followed");
    }

    #[test]
    fn loops_bad_links_and_bad_heads_are_protocol_errors() {
        // A loop through every descriptor: longer than the queue.
        let (g, mut q, buf) = setup(4);
        for i in 0..4u16 {
            let d = RawDesc {
                addr: buf,
                len: 8,
                flags: NEXT,
                next: (i + 1) % 4,
            };
            q.set_desc(&g, i, d);
        }
        q.publish(&g, 0);
        assert!(pop_one(&g, &q).is_err(), "loop");
        // Next index past the table.
        let (g, mut q, buf) = setup(4);
        let d = RawDesc {
            addr: buf,
            len: 8,
            flags: NEXT,
            next: 4,
        };
        q.set_desc(&g, 0, d);
        q.publish(&g, 0);
        assert!(pop_one(&g, &q).is_err(), "next past table");
        // Head past the table.
        let (g, mut q, _) = setup(4);
        q.publish(&g, 9);
        assert!(pop_one(&g, &q).is_err(), "head past table");
        // Available index more than a queue ahead.
        let (g, q, _) = setup(4);
        q.set_avail_idx(&g, 5);
        assert!(pop_one(&g, &q).is_err(), "avail index jump");
    }

    #[test]
    fn buffers_must_lie_in_ram_whatever_the_arithmetic() {
        let ram = 1u64 << 20;
        for (addr, len) in [
            (ram - 8, 9),
            (ram, 1),
            (u64::MAX - 3, 8),
            (u64::MAX, u32::MAX),
            (0x7fff_0000_0000, 64),
        ] {
            let (g, mut q, _) = setup(4);
            q.chain(&g, &[(addr, len, true)]);
            assert!(pop_one(&g, &q).is_err(), "{addr:#x}+{len:#x}");
        }
    }

    /// Zero-length descriptors are never dereferenced, so their address
    /// does not matter; a chain of exactly queue-size descriptors is legal.
    #[test]
    fn zero_length_and_full_size_chains_are_accepted() {
        let (g, mut q, buf) = setup(4);
        q.chain(
            &g,
            &[
                (u64::MAX, 0, false),
                (buf, 8, false),
                (0x7fff_0000_0000, 0, true),
                (buf, 8, true),
            ],
        );
        let c = pop_one(&g, &q).unwrap().unwrap();
        assert_eq!(c.descs.len(), 4);
        assert_eq!((c.readable_len(), c.writable_len()), (8, 8));
    }

    /// The used ring's length field is 32 bits: a chain whose buffers add
    /// up to more (aliasing makes that cheap) is refused.
    #[test]
    fn chain_total_over_u32_is_a_protocol_error() {
        let mut g = TestGuest::new(1 << 30);
        let mut q = g.queue(4);
        let buf = g.alloc(1 << 29);
        q.chain(&g, &[(buf, 1 << 29, false); 4]);
        assert!(pop_one(&g, &q).is_ok(), "2 GiB in all is fine");
        let mut q = g.queue(16);
        q.chain(&g, &[(buf, 1 << 29, false); 9]);
        assert!(pop_one(&g, &q).is_err(), "4.5 GiB in one chain");
    }
}
