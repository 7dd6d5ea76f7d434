//! Driving virtio back ends without KVM, for unit and property tests.
//!
//! - [`TestGuest`]: guest RAM in a private anonymous mapping (pages never
//!   written read as the shared zero page, so a test can describe buffers of
//!   hundreds of MiB without the host paying for them), viewed through the
//!   same [`Ram`] the device threads use.
//! - [`DriverQueue`]: the driver's side of a split virtqueue in that RAM:
//!   write descriptors, publish chains, read the used ring.
//! - [`IrqRecorder`]: a [`VirtioInterrupt`] that counts what the device
//!   signalled.
//! - [`heap_peak`]: the most heap one closure held at once on this thread
//!   (a counting global allocator), to show a request path stays within
//!   its bound whatever the guest wrote.

// Test code: casts of small fixed test values and test-side syscall results.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use super::queue::QueueConfig;
use super::{Activation, Ram, VirtioInterrupt};
use crate::memory::Region;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_ring as ring;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Descriptor flags (virtio 1.x 2.7.5).
pub const NEXT: u16 = crate::cast::const_u16(ring::VRING_DESC_F_NEXT as u64);
pub const WRITE: u16 = crate::cast::const_u16(ring::VRING_DESC_F_WRITE as u64);
pub const INDIRECT: u16 = crate::cast::const_u16(ring::VRING_DESC_F_INDIRECT as u64);

/// Guest RAM at guest-physical 0 in an anonymous mapping, unmapped on drop.
///
/// Declare it before anything holding its [`Ram`] (an [`Activation`]): locals
/// drop in reverse order, so the mapping then outlives every user.
pub struct TestGuest {
    host: *mut libc::c_void,
    len: usize,
    pub ram: Arc<Ram>,
    heap: u64,
}

impl TestGuest {
    /// `len` bytes of RAM; allocations start at 64 KiB (below is free for
    /// tests that want fixed addresses).
    pub fn new(len: usize) -> TestGuest {
        // SAFETY: a fresh private anonymous mapping, unmapped in Drop.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED, "test guest RAM");
        let ram = Arc::new(
            Ram::new(&[Region {
                gpa: 0,
                len: len as u64,
                host: host as usize,
            }])
            .expect("RAM view"),
        );
        TestGuest {
            host,
            len,
            ram,
            heap: 0x10000,
        }
    }

    /// `len` bytes of RAM, 4 KiB aligned.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.heap;
        self.heap = (at + len + 0xfff) & !0xfff;
        assert!(self.heap <= self.len as u64, "test guest RAM exhausted");
        at
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.ram
            .mem
            .write_slice(data, GuestAddress(gpa))
            .expect("guest write");
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.ram
            .mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("guest read");
        v
    }

    /// Rings for a queue of `size` entries.
    pub fn queue(&mut self, size: u16) -> DriverQueue {
        let n = u64::from(size);
        DriverQueue {
            size,
            desc: self.alloc(16 * n),
            avail: self.alloc(6 + 2 * n),
            used: self.alloc(6 + 8 * n),
            next_free: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Activate a device on `queues` (all enabled), as DRIVER_OK does.
    pub fn activate(&self, queues: &[&DriverQueue]) -> (Activation, Arc<IrqRecorder>) {
        let irq = Arc::new(IrqRecorder::new(queues.len()));
        let built = queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.config().build(&self.ram, i).expect("queue set-up"))
            .collect();
        let act = Activation {
            ram: self.ram.clone(),
            queues: built,
            notify: (0..queues.len())
                .map(|_| Arc::new(super::eventfd().expect("eventfd")))
                .collect(),
            irq: irq.clone(),
            stop: Arc::new(super::eventfd().expect("eventfd")),
            stopping: Arc::new(AtomicBool::new(false)),
            features: 0,
        };
        (act, irq)
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(); see the type's note on order.
        unsafe { libc::munmap(self.host, self.len) };
    }
}

// SAFETY: the mapping is plain memory; all access goes through Ram.
unsafe impl Send for TestGuest {}
// SAFETY: as above.
unsafe impl Sync for TestGuest {}

/// One descriptor as the driver writes it.
#[derive(Debug, Clone, Copy)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    /// Store it at `gpa` (a queue's table or an indirect one).
    pub fn write_to(&self, g: &TestGuest, gpa: u64) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        g.write(gpa, &b);
    }
}

/// The driver's side of a split virtqueue.
#[derive(Debug, Clone)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl DriverQueue {
    /// What the driver would have written to the common configuration.
    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            max_size: self.size,
            size: self.size,
            enabled: true,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }

    /// Write descriptor table entry `i` (any index: tests write bad ones).
    pub fn set_desc(&self, g: &TestGuest, i: u16, d: RawDesc) {
        d.write_to(g, self.desc + 16 * u64::from(i));
    }

    /// Put `head` in the available ring and publish it.
    pub fn publish(&mut self, g: &TestGuest, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        g.write(self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(g, self.avail_idx);
    }

    /// Write the available index as it is (tests write bad ones).
    pub fn set_avail_idx(&self, g: &TestGuest, idx: u16) {
        g.ram
            .mem
            .store(idx, GuestAddress(self.avail + 2), Ordering::Release)
            .expect("avail idx");
    }

    /// Write `bufs` (address, length, device-writable) as one chain in the
    /// next free table entries and publish it; returns the head.
    pub fn chain(&mut self, g: &TestGuest, bufs: &[(u64, u32, bool)]) -> u16 {
        assert!(!bufs.is_empty() && bufs.len() <= usize::from(self.size));
        let head = self.next_free;
        let mut i = head;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let next = (i + 1) % self.size;
            let last = k + 1 == bufs.len();
            let flags = if write { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.set_desc(
                g,
                i,
                RawDesc {
                    addr,
                    len,
                    flags,
                    next: if last { 0 } else { next },
                },
            );
            i = next;
        }
        self.next_free = i;
        self.publish(g, head);
        head
    }

    /// The next used element (id, len), if the device returned one.
    pub fn used(&mut self, g: &TestGuest) -> Option<(u32, u32)> {
        let idx: u16 = g
            .ram
            .mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .expect("used idx");
        if idx == self.last_used {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let e = g.read(at, 8);
        self.last_used = self.last_used.wrapping_add(1);
        Some((
            u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        ))
    }

    /// Every used element the device returned so far.
    pub fn all_used(&mut self, g: &TestGuest) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| self.used(g)).collect()
    }
}

/// Counts the interrupts a device asked for.
pub struct IrqRecorder {
    queues: Vec<AtomicU32>,
    reset: AtomicBool,
}

impl IrqRecorder {
    pub fn new(queues: usize) -> IrqRecorder {
        IrqRecorder {
            queues: (0..queues).map(|_| AtomicU32::new(0)).collect(),
            reset: AtomicBool::new(false),
        }
    }

    /// Interrupts for queue `q` so far.
    pub fn queue_count(&self, q: usize) -> u32 {
        self.queues[q].load(Ordering::Acquire)
    }

    /// Did the device ask for DEVICE_NEEDS_RESET?
    pub fn needs_reset(&self) -> bool {
        self.reset.load(Ordering::Acquire)
    }
}

impl VirtioInterrupt for IrqRecorder {
    fn queue(&self, q: usize) {
        self.queues[q].fetch_add(1, Ordering::AcqRel);
    }

    fn needs_reset(&self) {
        self.reset.store(true, Ordering::Release);
    }
}

/// The global allocator of the engine's unit-test binary: the system
/// allocator, plus per-thread counts of live and peak bytes (tests run on
/// parallel threads; per-thread counts keep them apart).
struct Meter;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // try_with: the allocator also runs while thread-locals are torn down.
    let _ = LIVE.try_with(|live| {
        let v = live.get() + delta;
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call goes to the system allocator unchanged; the counters
// are thread-local cells that never allocate.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) };
        note(-(l.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            note(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Run `f`; also return the most heap it held at once on this thread,
/// beyond what the thread held before.
pub fn heap_peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(|p| p.get());
    (r, (peak - base).max(0) as usize)
}

/// A pipe (read end, write end), both close-on-exec.
pub fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut p = [0; 2];
    // SAFETY: plain syscall into a 2-int array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and ours.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(p[0]),
            std::os::fd::OwnedFd::from_raw_fd(p[1]),
        )
    }
}

/// A connected pair of Unix sockets of `kind` (SOCK_STREAM, SOCK_DGRAM).
pub fn socketpair(kind: i32) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut p = [0; 2];
    // SAFETY: plain syscall into a 2-int array.
    let r =
        unsafe { libc::socketpair(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0, p.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are new and ours.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(p[0]),
            std::os::fd::OwnedFd::from_raw_fd(p[1]),
        )
    }
}

/// Read what is there without blocking (empty when nothing is).
pub fn read_available(fd: &std::os::fd::OwnedFd) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut b = vec![0u8; 65536];
    while super::probe(fd.as_raw_fd(), libc::POLLIN) & libc::POLLIN != 0 {
        // SAFETY: reading into our own buffer after POLLIN.
        let r = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if r <= 0 {
            break;
        }
        out.extend_from_slice(&b[..r as usize]);
    }
    out
}

/// Run `dev` on its own thread while `feed` plays a driver on another,
/// then ask the device to stop as the transport does. Returns how long the
/// device took to stop (given up after 2 s) and the most heap the device
/// thread held. `feed` must return once its flag is set.
pub fn run_then_stop<D: super::VirtioDevice>(
    dev: &mut D,
    act: &mut Activation,
    run_for: std::time::Duration,
    feed: impl FnOnce(&AtomicBool) + Send,
) -> (std::time::Duration, usize) {
    use std::time::{Duration, Instant};
    let fed_up = AtomicBool::new(false);
    let (stopping, stop) = (act.stopping.clone(), act.stop.clone());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut ep = act.event_loop().expect("event loop");
    std::thread::scope(|s| {
        s.spawn(|| feed(&fed_up));
        s.spawn(move || {
            let ((), peak) = heap_peak(|| dev.run(act, &mut ep));
            let _ = done_tx.send(peak);
        });
        std::thread::sleep(run_for);
        let t0 = Instant::now();
        stopping.store(true, Ordering::Release);
        let _ = stop.write(1);
        let peak = done_rx.recv_timeout(Duration::from_secs(2));
        let took = t0.elapsed();
        // A device that did not stop is released by starving it.
        fed_up.store(true, Ordering::Release);
        let peak = peak.unwrap_or_else(|_| done_rx.recv().unwrap_or(0));
        (took, peak)
    })
}

/// A driver that gives every buffer back (and notifies `kick`) as soon as
/// the device used it, until `stop` is set: the device always has work.
pub fn refeed(g: &TestGuest, q: &mut DriverQueue, kick: &EventFd, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let mut any = false;
        while let Some((id, _)) = q.used(g) {
            q.publish(g, id as u16);
            any = true;
        }
        if any {
            let _ = kick.write(1);
        }
        std::hint::spin_loop();
    }
}

/// A sparse disk of `len` bytes (a memfd: hole punching works) whose first
/// 64 KiB hold byte i = i * 7.
pub fn memfd_disk(len: u64) -> std::os::fd::OwnedFd {
    use std::os::fd::AsRawFd;
    let fd = crate::memory::memfd("disk", len).expect("memfd");
    let head: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    // SAFETY: writing our buffer at offset 0 of our memfd.
    let r = unsafe { libc::pwrite(fd.as_raw_fd(), head.as_ptr().cast(), head.len(), 0) };
    assert_eq!(r, 65536);
    fd
}
