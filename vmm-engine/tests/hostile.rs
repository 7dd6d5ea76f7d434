//! Hostile drivers against real devices on KVM, with the host's heap
//! measured: vdev.elf's hostcon and hostblk modes build the descriptor
//! chains that once made the engine copy gigabytes (see guests/vdev).
//!
//! This binary's allocator counts the process's live heap and refuses to
//! go past [`HEAP_CAP`], so a regression fails here with "memory allocation
//! failed" instead of taking the machine's memory; the tests then assert a
//! far smaller bound on the heap growth during the guest's run.
mod common;
use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Far above anything these tests need, far below the machine's memory.
const HEAP_CAP: usize = 1 << 30;
/// What a hostile run may add to the heap: a few device threads' buffers
/// (the largest fixed bound is virtio-net's 1 MiB of queued output) plus
/// the test harness, with room. The attacks below asked for 4 GiB.
const RUN_BOUND: usize = 32 << 20;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Capped;

impl Capped {
    fn take(&self, n: usize) -> bool {
        let now = LIVE.fetch_add(n, Ordering::AcqRel) + n;
        if now > HEAP_CAP {
            LIVE.fetch_sub(n, Ordering::AcqRel);
            let msg = b"hostile.rs: heap cap exceeded, refusing the allocation\n";
            // SAFETY: write(2) of a static buffer; nothing here allocates.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            return false;
        }
        PEAK.fetch_max(now, Ordering::AcqRel);
        true
    }
}

// SAFETY: forwards to the system allocator; only the counters are added.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !self.take(l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as is.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::AcqRel);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() && !self.take(new - l.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as is.
        let q = unsafe { System.realloc(p, l, new) };
        if q.is_null() {
            LIVE.fetch_sub(new.saturating_sub(l.size()), Ordering::AcqRel);
        } else if new < l.size() {
            LIVE.fetch_sub(l.size() - new, Ordering::AcqRel);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// One measured run at a time: the counters are process-wide.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Boot vdev.elf in `mode` with `devices`; returns the guest's output and
/// the most the heap grew while the guest ran.
fn run_measured(mode: &str, devices: Vec<(String, Vec<OwnedFd>)>) -> (String, usize) {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let mut t = vdev_vm_with(mode, "256M", mode, devices);
    let base = LIVE.load(Ordering::Acquire);
    PEAK.fetch_min(base, Ordering::AcqRel);
    PEAK.fetch_max(base, Ordering::AcqRel);
    t.run();
    let out = powered_off(&mut t, 120);
    let grew = PEAK.load(Ordering::Acquire).saturating_sub(base);
    eprintln!("{mode}: the heap grew by at most {grew} bytes during the run");
    t.vm.destroy();
    (out, grew)
}

#[test]
fn console_aliasing_chain_is_refused_without_copying() {
    if !kvm_or_skip() {
        return;
    }
    let (in_r, _in_w) = pipe();
    let (out_r, out_w) = pipe();
    let (out, grew) = run_measured(
        "hostcon",
        vec![("device 6 virtio-console fd={}:{}".into(), vec![in_r, out_w])],
    );
    assert_eq!(
        out,
        "vdev hostcon\nconsole aliasing chain: needs reset\nconsole works after reset\nhostcon done\n"
    );
    assert!(grew < RUN_BOUND, "the heap grew by {grew} bytes");
    // Only the message sent after the reset reached the port's output.
    let mut got = Vec::new();
    use std::io::Read;
    std::fs::File::from(out_r).read_to_end(&mut got).unwrap();
    assert_eq!(got, b"after reset\n");
}

#[test]
fn blk_aliasing_read_and_indirect_chain_are_refused() {
    if !kvm_or_skip() {
        return;
    }
    // Sparse, large enough that the 200 MiB read lies inside the disk.
    let disk = memfd_with(&[]);
    let f = std::fs::File::from(disk);
    f.set_len(256 << 20).unwrap();
    let (out, grew) = run_measured(
        "hostblk",
        vec![("device 3 virtio-blk fd={}".into(), vec![f.into()])],
    );
    assert_eq!(
        out,
        "vdev hostblk\nblk aliasing read status 1 len 1\nblk id without buffer status 0 len 1\n\
         blk indirect descriptor: needs reset\nblk works after reset\nhostblk done\n"
    );
    assert!(grew < RUN_BOUND, "the heap grew by {grew} bytes");
}
