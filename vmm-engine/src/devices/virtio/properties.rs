//! Property tests of the request paths (blk, net, console, rng) against
//! the in-memory guest: rings of well-formed chains with random buffers,
//! then random damage (descriptors overwritten with anything, heads past
//! the table, the available index thrown ahead). Whatever the driver
//! wrote, one service round
//! - returns (no panic, no hang: well under a second),
//! - holds at most the device's fixed bound of heap,
//! - either marks the device broken, or returns chains with used lengths
//!   no larger than the device's per-request limit.
//!
//! Case counts keep each property to a few seconds in a debug build; set
//! PROPTEST_CASES for a longer run.

// Test code: casts of small fixed test values and test-side syscall results.
#![allow(clippy::cast_possible_truncation)]

use super::blk::{Blk, BlkConfig};
use super::console::{Console, ConsoleConfig};
use super::net::{Net, NetBackend, NetConfig};
use super::rng::Rng;
use super::service::service_rx_tx;
use super::test_utils::*;
use super::Activation;
use proptest::prelude::*;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Guest RAM of every case.
const RAM: u64 = 8 << 20;
/// Buffers start here, above the rings (which TestGuest puts in the first
/// 128 KiB): a driver may aim the device at its own rings, but then the
/// used ring read back here would hold what the device wrote as data.
const BUF_BASE: u64 = 1 << 20;
/// Buffer pages.
const PAGES: std::ops::Range<u64> = BUF_BASE / 4096..RAM / 4096;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A descriptor as a hostile driver might write it.
fn any_desc(size: u16) -> impl Strategy<Value = RawDesc> {
    let addr = prop_oneof![
        6 => PAGES.prop_map(|p| p * 4096),
        2 => BUF_BASE..RAM,
        1 => Just(RAM - 1),
        1 => RAM..u64::MAX,
    ];
    let len = prop_oneof![
        4 => 0u32..600,
        2 => 0u32..70_000,
        1 => Just(0u32),
        1 => (1u32 << 20)..(4u32 << 20),
        1 => any::<u32>(),
    ];
    let flags = prop_oneof![6 => 0u16..4, 1 => any::<u16>()];
    let next = prop_oneof![6 => 0..size, 1 => any::<u16>()];
    (addr, len, flags, next).prop_map(|(addr, len, flags, next)| RawDesc {
        addr,
        len,
        flags,
        next,
    })
}

/// What the driver puts in one queue.
#[derive(Debug, Clone)]
struct Plan {
    /// Well-formed chains: (buffer address, length, device-writable).
    chains: Vec<Vec<(u64, u32, bool)>>,
    /// Then table entries overwritten with anything.
    damage: Vec<(u16, RawDesc)>,
    /// Then heads published as they are (any index).
    raw_heads: Vec<u16>,
    /// Then the available index moved by this much.
    avail_jump: Option<u16>,
}

fn plan(size: u16) -> impl Strategy<Value = Plan> {
    let buf = (
        prop_oneof![4 => PAGES.prop_map(|p| p * 4096), 1 => BUF_BASE..RAM],
        prop_oneof![4 => 0u32..70_000, 1 => (1u32 << 20)..(4u32 << 20)],
        any::<bool>(),
    );
    let per_chain = usize::from(size).min(8);
    (
        proptest::collection::vec(proptest::collection::vec(buf, 1..=per_chain), 0..6),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => proptest::collection::vec((0..size, any_desc(size)), 1..4),
        ],
        prop_oneof![4 => Just(Vec::new()), 1 => proptest::collection::vec(any::<u16>(), 1..3)],
        prop_oneof![6 => Just(None), 1 => any::<u16>().prop_map(Some)],
    )
        .prop_map(|(chains, damage, raw_heads, avail_jump)| Plan {
            chains,
            damage,
            raw_heads,
            avail_jump,
        })
}

/// Lay `plan` out in `q`. Chains that no longer fit in the table are left
/// out (a driver cannot post more descriptors than there are).
fn apply(g: &TestGuest, q: &mut DriverQueue, plan: &Plan) {
    let mut used = 0usize;
    for c in &plan.chains {
        if used + c.len() > usize::from(q.size) {
            break;
        }
        used += c.len();
        q.chain(g, c);
    }
    for &(i, d) in &plan.damage {
        q.set_desc(g, i, d);
    }
    for &h in &plan.raw_heads {
        q.publish(g, h);
    }
    if let Some(j) = plan.avail_jump {
        let idx = u16::from_le_bytes(g.read(q.avail + 2, 2).try_into().unwrap());
        q.set_avail_idx(g, idx.wrapping_add(j));
    }
}

/// Request headers (mostly real request types) for the start of every
/// buffer page, in turn.
fn page_heads() -> impl Strategy<Value = Vec<(u32, u64)>> {
    let ty = prop_oneof![4 => prop::sample::select(vec![0u32, 1, 4, 8, 11]), 1 => any::<u32>()];
    let sector = prop_oneof![4 => 0u64..64, 1 => any::<u64>()];
    proptest::collection::vec((ty, sector), 64)
}

fn write_page_heads(g: &TestGuest, heads: &[(u32, u64)]) {
    for (p, &(ty, sector)) in PAGES.zip(heads.iter().cycle()) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        g.write(p * 4096, &h);
    }
}

/// Run one service round under the meter and the clock; check the
/// outcome against `bound` bytes of heap and `max_used` bytes per chain.
fn check_round(
    g: &TestGuest,
    queues: &mut [&mut DriverQueue],
    irq: &IrqRecorder,
    bound: usize,
    max_used: u32,
    round: impl FnOnce(),
) -> Result<(), TestCaseError> {
    let t = Instant::now();
    let ((), peak) = heap_peak(round);
    prop_assert!(
        t.elapsed() < Duration::from_secs(1),
        "round took {:?}",
        t.elapsed()
    );
    prop_assert!(peak <= bound, "{} bytes of heap (bound {})", peak, bound);
    if !irq.needs_reset() {
        for q in queues.iter_mut() {
            for (id, len) in q.all_used(g) {
                prop_assert!(id < u32::from(q.size), "used id {}", id);
                prop_assert!(len <= max_used, "used length {}", len);
            }
        }
    }
    Ok(())
}

fn setup(size: u16, n: usize, plans: &[Plan]) -> (TestGuest, Vec<DriverQueue>) {
    let mut g = TestGuest::new(RAM as usize);
    let mut qs: Vec<DriverQueue> = (0..n).map(|_| g.queue(size)).collect();
    for (q, p) in qs.iter_mut().zip(plans) {
        apply(&g, q, p);
    }
    (g, qs)
}

fn activate(g: &TestGuest, qs: &[DriverQueue]) -> (Activation, Arc<IrqRecorder>) {
    let refs: Vec<&DriverQueue> = qs.iter().collect();
    g.activate(&refs)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn blk_requests(p in plan(64), heads in page_heads(), ro in any::<bool>()) {
        let blk = Blk::new(BlkConfig {
            file: Arc::new(memfd_disk(16 << 20)),
            ro,
            sector_size: None,
            discard: true,
        })
        .unwrap();
        let (g, mut qs) = setup(64, 1, &[p]);
        write_page_heads(&g, &heads);
        let (mut act, irq) = activate(&g, &qs);
        // Data of one request at most, plus its status byte.
        let max = (super::blk::MAX_REQUEST_BYTES + 1) as u32;
        check_round(&g, &mut qs.iter_mut().collect::<Vec<_>>(), &irq, 64 << 10, max, || {
            if let Err(e) = blk.drain_queue(&mut act) {
                act.broken(&e);
            }
        })?;
    }

    #[test]
    fn rng_requests(p in plan(64)) {
        let (g, mut qs) = setup(64, 1, &[p]);
        let (mut act, irq) = activate(&g, &qs);
        let max = super::rng::MAX_REQUEST as u32;
        check_round(&g, &mut qs.iter_mut().collect::<Vec<_>>(), &irq, 2 * super::rng::MAX_REQUEST, max, || {
            if let Err(e) = Rng::serve(&mut act) {
                act.broken(&e);
            }
        })?;
    }

    #[test]
    fn console_requests(rx in plan(64), tx in plan(64), input in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let (g, mut qs) = setup(64, 2, &[rx, tx]);
        let (in_r, in_w) = pipe();
        let (_out_r, out_w) = pipe();
        let mut con = Console::new(ConsoleConfig { input: Arc::new(in_r), output: Arc::new(out_w) });
        if !input.is_empty() {
            // SAFETY: writing our buffer into our pipe (5000 bytes fit).
            unsafe { libc::write(in_w.as_raw_fd(), input.as_ptr().cast(), input.len()) };
        }
        let (mut act, irq) = activate(&g, &qs);
        let mut broken = false;
        // Output buffer, one chain's copy buffer, one input chunk.
        let bound = 256 << 10;
        check_round(&g, &mut qs.iter_mut().collect::<Vec<_>>(), &irq, bound, 4096, || {
            service_rx_tx(&mut con, &mut act, &mut broken)
        })?;
    }

    #[test]
    fn net_requests(
        rx in plan(256),
        tx in plan(256),
        slirp in any::<bool>(),
        frames in proptest::collection::vec((prop_oneof![4 => 0u32..2000, 1 => any::<u32>()], any::<u8>()), 0..8),
    ) {
        let (g, mut qs) = setup(256, 2, &[rx, tx]);
        let kind = if slirp { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
        let (ours, peer) = socketpair(kind);
        // What the back end sends: length words as they come (slirp), or
        // datagrams of those lengths (tap).
        for (len, fill) in frames {
            let body = vec![fill; (len as usize).min(70_000)];
            let mut msg = Vec::new();
            if slirp {
                msg.extend_from_slice(&len.to_be_bytes());
            }
            msg.extend_from_slice(&body);
            // SAFETY: sending our buffer on our socket; failures are fine.
            unsafe { libc::send(peer.as_raw_fd(), msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT) };
        }
        let mut n = Net::new(NetConfig {
            backend: if slirp { NetBackend::Slirp } else { NetBackend::Tap },
            fd: Arc::new(ours),
            mac: [0x52, 0x54, 0, 0, 0, 1],
        });
        let (mut act, irq) = activate(&g, &qs);
        let mut broken = false;
        // Queued output, one frame in flight, the slirp stream buffer.
        let bound = 3 << 20;
        let max = (12 + 65535 + 14) as u32;
        check_round(&g, &mut qs.iter_mut().collect::<Vec<_>>(), &irq, bound, max, || {
            service_rx_tx(&mut n, &mut act, &mut broken)
        })?;
    }
}
