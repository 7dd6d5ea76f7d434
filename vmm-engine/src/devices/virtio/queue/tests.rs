//! Chains and queue set-ups a driver got wrong, each refused by its rule.

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
    assert!(
        matches!(pop_one(&g, &q), Err(QueueError::Indirect { at: 0, .. })),
        "indirect table followed"
    );
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
    assert!(matches!(
        pop_one(&g, &q),
        Err(QueueError::Loop { head: 0, .. })
    ));
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
    assert!(matches!(
        pop_one(&g, &q),
        Err(QueueError::NextIndex { next: 4, .. })
    ));
    // Head past the table.
    let (g, mut q, _) = setup(4);
    q.publish(&g, 9);
    assert!(matches!(
        pop_one(&g, &q),
        Err(QueueError::HeadIndex { head: 9, .. })
    ));
    // Available index more than a queue ahead.
    let (g, q, _) = setup(4);
    q.set_avail_idx(&g, 5);
    assert!(matches!(pop_one(&g, &q), Err(QueueError::Ring { .. })));
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
        assert!(
            matches!(pop_one(&g, &q), Err(QueueError::OutsideRam { .. })),
            "{addr:#x}+{len:#x}"
        );
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
    assert!(
        matches!(pop_one(&g, &q), Err(QueueError::ChainBytes { head: 0, .. })),
        "4.5 GiB in one chain"
    );
}

/// What the driver set up wrong is named at DRIVER_OK.
#[test]
fn setup_errors_name_the_setting() {
    let (g, q, _) = setup(16);
    let mut c = q.config();
    c.size = 12;
    assert!(matches!(
        c.build(&g.ram, 3),
        Err(SetupError::Size {
            queue: 3,
            size: 12,
            ..
        })
    ));
    let mut c = q.config();
    c.avail = 0x1001; // the available ring is 2-byte aligned
    assert!(matches!(
        c.build(&g.ram, 0),
        Err(SetupError::Address {
            ring: "available ring",
            ..
        })
    ));
    let mut c = q.config();
    c.used = (1 << 20) - 8;
    assert!(matches!(
        c.build(&g.ram, 0),
        Err(SetupError::NotInRam { queue: 0 })
    ));
}
