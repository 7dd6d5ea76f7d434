//! virtio-net against socketpairs standing in for passt and a tap.

// Test code: casts of small fixed test values and test-side syscall results.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use super::queues::{tx_frame_len, Dropped};
use super::*;
use crate::devices::virtio::service::service_rx_tx;
use crate::devices::virtio::test_utils::*;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// A net device on one end of a socketpair of `kind` (stream: slirp,
/// datagram: stands in for a tap, one frame per read and write);
/// returns it with the other end.
fn net(backend: NetBackend) -> (Net, OwnedFd) {
    let kind = match backend {
        NetBackend::Slirp => libc::SOCK_STREAM,
        NetBackend::Tap => libc::SOCK_DGRAM,
    };
    let (ours, theirs) = socketpair(kind);
    let n = Net::new(NetConfig {
        backend,
        fd: Arc::new(ours),
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    });
    (n, theirs)
}

fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: sending our buffer on our socket.
    let r = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(r, data.len() as isize);
}

#[test]
fn tx_frames_reach_both_back_ends() {
    for backend in [NetBackend::Slirp, NetBackend::Tap] {
        let mut g = TestGuest::new(1 << 20);
        let (rx, mut tx) = (g.queue(16), g.queue(16));
        let buf = g.alloc(4096);
        g.write(buf, &[0; HDR]);
        g.write(buf + HDR as u64, b"frame one");
        tx.chain(
            &g,
            &[
                (buf, HDR as u32 + 5, false),
                (buf + HDR as u64 + 5, 4, false),
            ],
        );
        let (mut act, irq) = g.activate(&[&rx, &tx]);
        let (mut n, peer) = net(backend);
        let mut broken = false;
        service_rx_tx(&mut n, &mut act, &mut broken);
        assert!(!broken && !irq.needs_reset());
        let want: &[u8] = match backend {
            NetBackend::Slirp => b"\0\0\0\x09frame one",
            NetBackend::Tap => b"frame one",
        };
        assert_eq!(read_available(&peer), want, "{backend:?}");
        assert_eq!(tx.all_used(&g), [(0, 0)]);
    }
}

/// 16 descriptors aliasing one MiB: far over the largest frame, so
/// dropped before anything is copied.
#[test]
fn aliasing_tx_chain_over_max_frame_is_dropped() {
    let mut g = TestGuest::new(4 << 20);
    let (rx, mut tx) = (g.queue(16), g.queue(16));
    let buf = g.alloc(1 << 20);
    tx.chain(&g, &[(buf, 1 << 20, false); 16]);
    let (mut act, irq) = g.activate(&[&rx, &tx]);
    let (mut n, peer) = net(NetBackend::Slirp);
    let mut broken = false;
    let ((), peak) = heap_peak(|| service_rx_tx(&mut n, &mut act, &mut broken));
    assert!(peak <= 256 << 10, "{peak} bytes of heap");
    assert!(!irq.needs_reset());
    assert_eq!(tx.all_used(&g), [(0, 0)]);
    assert_eq!(n.dropped, 1);
    assert_eq!(
        tx_frame_len(16 << 20),
        Err(Dropped::TxSize { len: 16 << 20 })
    );
    assert!(read_available(&peer).is_empty());
}

/// A driver sending 1-byte frames as fast as it can to a back end that
/// takes nothing: the frames waiting for it stay bounded in number and
/// bytes, and the device still stops at once.
#[test]
fn tx_flood_into_a_stalled_back_end_is_bounded() {
    let mut g = TestGuest::new(1 << 20);
    let (rx, mut tx) = (g.queue(256), g.queue(256));
    let buf = g.alloc(4096);
    for _ in 0..256 {
        tx.chain(&g, &[(buf, HDR as u32 + 1, false)]);
    }
    let (mut act, _irq) = g.activate(&[&rx, &tx]);
    let kick = act.notify[1].clone();
    let (mut n, _peer) = net(NetBackend::Slirp);
    let (took, peak) = run_then_stop(&mut n, &mut act, Duration::from_millis(300), |stop| {
        refeed(&g, &mut tx, &kick, stop)
    });
    assert!(took < Duration::from_millis(500), "stop took {took:?}");
    assert!(
        n.out_frames.len() <= 1024,
        "{} frames held",
        n.out_frames.len()
    );
    assert!(peak <= 2 << 20, "{peak} bytes of heap");
}

/// Many small frames in one read from passt arrive in order, each in
/// its own receive buffer.
#[test]
fn slirp_small_frames_arrive_in_order() {
    let mut g = TestGuest::new(1 << 20);
    let (mut rx, tx) = (g.queue(256), g.queue(16));
    let bufs = g.alloc(200 * 64);
    for i in 0..200u64 {
        rx.chain(&g, &[(bufs + 64 * i, 64, true)]);
    }
    let (mut act, _irq) = g.activate(&[&rx, &tx]);
    let (mut n, peer) = net(NetBackend::Slirp);
    let mut stream = Vec::new();
    for i in 0..200u32 {
        let len = 1 + i % 40;
        stream.extend_from_slice(&len.to_be_bytes());
        stream.extend((0..len).map(|k| (i + k) as u8));
    }
    send(&peer, &stream);
    let mut broken = false;
    service_rx_tx(&mut n, &mut act, &mut broken);
    let used = rx.all_used(&g);
    assert_eq!(used.len(), 200);
    for (i, (id, len)) in used.into_iter().enumerate() {
        let i = i as u32;
        let want: Vec<u8> = (0..1 + i % 40).map(|k| (i + k) as u8).collect();
        assert_eq!(len as usize, HDR + want.len(), "frame {i}");
        let got = g.read(bufs + 64 * u64::from(id) + HDR as u64, want.len());
        assert_eq!(got, want, "frame {i}");
    }
}

/// A length word over the largest frame: the stream cannot be trusted
/// any more, so the device stops reading it (nothing is allocated for it).
#[test]
fn slirp_length_word_over_max_frame_stops_reading() {
    let mut g = TestGuest::new(1 << 20);
    let (mut rx, tx) = (g.queue(16), g.queue(16));
    let buf = g.alloc(1 << 17);
    rx.chain(&g, &[(buf, 1 << 17, true)]);
    let (mut act, _irq) = g.activate(&[&rx, &tx]);
    let (mut n, peer) = net(NetBackend::Slirp);
    send(&peer, &u32::MAX.to_be_bytes());
    let mut broken = false;
    let ((), peak) = heap_peak(|| service_rx_tx(&mut n, &mut act, &mut broken));
    assert!(
        matches!(n.dead, Some(BackendGone::FrameLength { len }) if len == u32::MAX as usize),
        "{:?}",
        n.dead
    );
    assert!(peak <= 256 << 10, "{peak} bytes of heap");
    assert!(rx.all_used(&g).is_empty());
}

/// A frame larger than the receive buffer is dropped, not cut.
#[test]
fn rx_frame_larger_than_the_buffer_is_dropped() {
    let mut g = TestGuest::new(1 << 20);
    let (mut rx, tx) = (g.queue(16), g.queue(16));
    let buf = g.alloc(4096);
    rx.chain(&g, &[(buf, HDR as u32 + 10, true)]);
    rx.chain(&g, &[(buf, HDR as u32 + 100, true)]);
    let (mut act, _irq) = g.activate(&[&rx, &tx]);
    let (mut n, peer) = net(NetBackend::Tap);
    send(&peer, &[7u8; 11]);
    send(&peer, &[8u8; 10]);
    let mut broken = false;
    service_rx_tx(&mut n, &mut act, &mut broken);
    assert_eq!(rx.all_used(&g), [(0, 0), (1, HDR as u32 + 10)]);
    assert_eq!(n.dropped, 1);
    // The rule that dropped it.
    rx.chain(&g, &[(buf, HDR as u32 + 10, true)]);
    let mut vq = rx.config().build(&g.ram, 0).unwrap();
    let (_, _) = (vq.pop(&g.ram).unwrap(), vq.pop(&g.ram).unwrap());
    let c = vq.pop(&g.ram).unwrap().expect("the third chain");
    assert_eq!(
        super::queues::deliver(&g.ram, &c, &[7u8; 11]),
        Err(Dropped::RxRoom {
            frame: 11,
            room: HDR as u64 + 10
        })
    );
    assert_eq!(g.read(buf + HDR as u64, 10), [8u8; 10]);
}

#[test]
fn macs() {
    assert_eq!(
        parse_mac("00:a0:98:00:00:01"),
        Some([0, 0xa0, 0x98, 0, 0, 1])
    );
    assert_eq!(parse_mac("01:00:00:00:00:00"), None);
    assert_eq!(parse_mac("00:00:00:00:00"), None);
    assert_eq!(parse_mac("00:00:00:00:00:zz"), None);
    let a = default_mac("vm1", "3");
    assert_eq!(a, default_mac("vm1", "3"));
    assert_ne!(a, default_mac("vm2", "3"));
    assert_eq!(&a[..3], &[0x58, 0x9c, 0xfc]);
}

/// Transmit chains carry a frame after the header, of at most MAX_FRAME.
#[test]
fn tx_frame_sizes() {
    let hdr = HDR as u64;
    assert_eq!(tx_frame_len(hdr), Err(Dropped::TxSize { len: hdr }));
    assert_eq!(tx_frame_len(hdr + 1), Ok(1));
    assert_eq!(tx_frame_len(hdr + MAX_FRAME as u64), Ok(MAX_FRAME));
    let over = hdr + MAX_FRAME as u64 + 1;
    assert_eq!(tx_frame_len(over), Err(Dropped::TxSize { len: over }));
}
