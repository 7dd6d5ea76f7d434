//! Split virtqueues: the transport's view while the driver sets a queue up,
//! and the device thread's view with the checks device code relies on.
//!
//! The rust-vmm `virtio-queue` crate keeps the available and used rings
//! (including "the available index never runs more than a queue ahead");
//! chains are walked here, over the crate's descriptor type, because the
//! crate follows indirect tables we never offer. What a popped [`Chain`]
//! guarantees:
//! - every descriptor with a length lies entirely in one RAM region
//!   (zero-length ones are never dereferenced, whatever their address);
//! - at most queue-size descriptors (more can only be a loop), all direct;
//! - their lengths add up to at most `u32::MAX` (the used ring's length
//!   field), so sums over a chain cannot overflow.
//!
//! Devices still see chains of up to 4 GiB whose buffers may all alias the
//! same guest page: each device bounds what it copies or allocates per
//! chain itself, before copying.

use super::host::Ram;
use crate::cast;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Bytes a chain's buffers may add up to (the used ring's length is 32 bits).
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

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

    /// Build the device-side queue; Err says which setting the driver got
    /// wrong.
    pub fn build(&self, ram: &Ram, queue: usize) -> Result<VirtQueue, SetupError> {
        let address = |ring, addr| {
            move |source| SetupError::Address {
                queue,
                ring,
                addr,
                source,
            }
        };
        let mut q = Queue::new(self.max_size).map_err(|source| SetupError::MaxSize {
            queue,
            max: self.max_size,
            source,
        })?;
        q.try_set_size(self.size)
            .map_err(|source| SetupError::Size {
                queue,
                size: self.size,
                source,
            })?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(address("descriptor table", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(address("available ring", self.avail))?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(address("used ring", self.used))?;
        q.set_ready(true);
        if !q.is_valid(&ram.mem) {
            return Err(SetupError::NotInRam { queue });
        }
        Ok(VirtQueue { q, index: queue })
    }
}

/// What the driver set up wrong in a queue it enabled (found at DRIVER_OK).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("queue {queue}: maximum size {max}: {source}")]
    MaxSize {
        queue: usize,
        max: u16,
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: size {size}: {source}")]
    Size {
        queue: usize,
        size: u16,
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: {ring} at {addr:#x}: {source}")]
    Address {
        queue: usize,
        ring: &'static str,
        addr: u64,
        source: virtio_queue::Error,
    },
    /// The rings (at their size) do not lie in guest RAM.
    #[error("queue {queue}: rings not in guest RAM")]
    NotInRam { queue: usize },
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

    /// Walk the buffers of one direction (device-writable or not) from
    /// `skip` bytes in, handing `piece` each part as (guest address, range
    /// of the caller's `len` bytes) until all are done or it refuses one;
    /// returns the bytes done.
    fn walk(
        &self,
        write: bool,
        mut skip: u64,
        len: usize,
        mut piece: impl FnMut(u64, std::ops::Range<usize>) -> bool,
    ) -> usize {
        let mut done = 0;
        for d in self.descs.iter().filter(|d| d.write == write) {
            if done == len {
                break;
            }
            let dlen = u64::from(d.len);
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let n = cast::usize_from(dlen - skip).min(len - done);
            if !piece(d.addr + skip, done..done + n) {
                break;
            }
            done += n;
            skip = 0;
        }
        done
    }

    /// Gather up to `buf.len()` readable bytes starting `skip` bytes in.
    pub fn read_at(&self, ram: &Ram, skip: u64, buf: &mut [u8]) -> usize {
        self.walk(false, skip, buf.len(), |gpa, r| ram.read(gpa, &mut buf[r]))
    }

    /// Scatter `data` into the writable buffers starting `skip` bytes in.
    pub fn write_at(&self, ram: &Ram, skip: u64, data: &[u8]) -> usize {
        self.walk(true, skip, data.len(), |gpa, r| ram.write(gpa, &data[r]))
    }
}

/// How the driver broke the queue protocol (the device then needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {queue}: {source}")]
    Ring {
        queue: usize,
        source: virtio_queue::Error,
    },
    #[error("queue {queue}: head index {head} >= size {size}")]
    HeadIndex { queue: usize, head: u16, size: u16 },
    #[error("queue {queue}: descriptor {at} links to {next}, past the table of {size}")]
    NextIndex {
        queue: usize,
        at: u16,
        next: u16,
        size: u16,
    },
    #[error("queue {queue}: chain at {head} is longer than the queue: a loop")]
    Loop { queue: usize, head: u16 },
    #[error("queue {queue}: indirect descriptor at {at} (not offered)")]
    Indirect { queue: usize, at: u16 },
    #[error("queue {queue}: descriptor table entry {at} unreadable")]
    Table { queue: usize, at: u16 },
    #[error("queue {queue}: buffer {addr:#x}+{len:#x} outside guest RAM")]
    OutsideRam { queue: usize, addr: u64, len: u32 },
    #[error("queue {queue}: chain at {head} holds more than {MAX_CHAIN_BYTES} bytes")]
    ChainBytes { queue: usize, head: u16 },
    /// A chain within the protocol but over a limit of the device, which
    /// refuses it before copying anything.
    #[error("queue {queue}: chain of {len} bytes over the device's limit of {max}")]
    OverLimit { queue: usize, len: u64, max: u64 },
}

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
        let queue = self.index;
        let size = self.q.size();
        let table = self.q.desc_table();
        let head = {
            let mut it = self
                .q
                .iter(&ram.mem)
                .map_err(|source| QueueError::Ring { queue, source })?;
            match it.next() {
                Some(chain) => chain.head_index(),
                None => return Ok(None),
            }
        };
        if head >= size {
            return Err(QueueError::HeadIndex { queue, head, size });
        }
        // Each table entry can be in a chain once: a chain longer than the
        // queue revisits one, i.e. it loops.
        let mut descs = Vec::new();
        let mut total = 0u64;
        let mut at = head;
        loop {
            if descs.len() == usize::from(size) {
                return Err(QueueError::Loop { queue, head });
            }
            let d: Descriptor = ram
                .mem
                .read_obj(GuestAddress(table + 16 * u64::from(at)))
                .map_err(|_| QueueError::Table { queue, at })?;
            if d.refers_to_indirect_table() {
                return Err(QueueError::Indirect { queue, at });
            }
            let (addr, len) = (d.addr().0, d.len());
            if len > 0 && ram.host(addr, len as usize).is_none() {
                return Err(QueueError::OutsideRam { queue, addr, len });
            }
            total += u64::from(len);
            if total > MAX_CHAIN_BYTES {
                return Err(QueueError::ChainBytes { queue, head });
            }
            descs.push(Desc {
                addr,
                len,
                write: d.is_write_only(),
            });
            if !d.has_next() {
                break;
            }
            let next = d.next();
            if next >= size {
                return Err(QueueError::NextIndex {
                    queue,
                    at,
                    next,
                    size,
                });
            }
            at = next;
        }
        Ok(Some(Chain { head, descs }))
    }

    /// Return a chain with `len` bytes written.
    pub fn push(&mut self, ram: &Ram, head: u16, len: u32) -> Result<(), QueueError> {
        let queue = self.index;
        self.q
            .add_used(&ram.mem, head, len)
            .map_err(|source| QueueError::Ring { queue, source })
    }

    /// Ask the driver not to notify (VRING_USED_F_NO_NOTIFY) while the
    /// device is busy draining the ring anyway.
    pub fn disable_notify(&mut self, ram: &Ram) {
        let _ = self.q.disable_notification(&ram.mem);
    }

    /// Ask for notifications again; true when buffers arrived meanwhile
    /// (the caller must look again, or it would sleep on a non-empty ring).
    pub fn enable_notify(&mut self, ram: &Ram) -> Result<bool, QueueError> {
        let queue = self.index;
        self.q
            .enable_notification(&ram.mem)
            .map_err(|source| QueueError::Ring { queue, source })
    }

    /// Should the driver be interrupted (it may ask not to be)?
    pub fn needs_notification(&mut self, ram: &Ram) -> bool {
        self.q.needs_notification(&ram.mem).unwrap_or(true)
    }
}

#[cfg(test)]
mod tests;
