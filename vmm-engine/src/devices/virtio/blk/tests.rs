//! virtio-blk requests against a memfd disk: data, limits, refusals.

use super::request::*;
use super::*;
use crate::devices::virtio::test_utils::*;
use std::time::Duration;

fn disk(len: u64) -> Blk {
    Blk::new(BlkConfig {
        file: Arc::new(memfd_disk(len)),
        ro: false,
        sector_size: None,
        discard: true,
    })
    .unwrap()
}

/// A driver with a header page and a status page.
struct Driver {
    g: TestGuest,
    q: DriverQueue,
    hdr: u64,
    status: u64,
}

impl Driver {
    fn new(ram: usize, size: u16) -> Driver {
        let mut g = TestGuest::new(ram);
        let q = g.queue(size);
        let (hdr, status) = (g.alloc(4096), g.alloc(4096));
        Driver { g, q, hdr, status }
    }

    /// Queue a request: header, then `data`, then a 1-byte status.
    fn request(&mut self, ty: u32, sector: u64, data: &[(u64, u32, bool)]) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.g.write(self.hdr, &h);
        self.g.write(self.status, &[0xee]);
        let mut bufs = vec![(self.hdr, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((self.status, 1, true));
        self.q.chain(&self.g, &bufs);
    }

    /// Run the device over the queue; (status byte, used length) of
    /// the one request.
    fn serve(&mut self, blk: &Blk) -> (u8, u32) {
        let (mut act, irq) = self.g.activate(&[&self.q]);
        let (r, peak) = heap_peak(|| blk.drain_queue(&mut act));
        r.unwrap();
        assert!(peak <= 64 << 10, "{peak} bytes of heap for one request");
        assert!(!irq.needs_reset());
        let used = self.q.all_used(&self.g);
        assert_eq!(used.len(), 1);
        (self.g.read(self.status, 1)[0], used[0].1)
    }

    /// The one request's outcome, from the rules alone (call it before
    /// `serve`: a refused request does nothing, an accepted one its I/O).
    fn outcome(&self, blk: &Blk) -> Result<u32, RequestError> {
        let mut vq = self.q.config().build(&self.g.ram, 0).unwrap();
        let c = vq.pop(&self.g.ram).unwrap().expect("a request");
        let status = request::status_desc(&c)?;
        blk.serve(&self.g.ram, &c, status)
    }
}

#[test]
fn reads_what_the_disk_holds() {
    let blk = disk(1 << 20);
    let mut d = Driver::new(1 << 20, 16);
    let buf = d.g.alloc(4096);
    d.request(T_IN, 1, &[(buf, 512, true)]);
    assert_eq!(d.serve(&blk), (S_OK, 513));
    let want: Vec<u8> = (512..1024u32)
        .map(|i| cast::low_u8(u64::from(i * 7)))
        .collect();
    assert_eq!(d.g.read(buf, 512), want);
}

/// 200 writable descriptors aliasing one MiB: a 200 MiB read for a
/// 1 MiB buffer. Refused (IOERR) before any I/O.
#[test]
fn aliasing_request_over_the_limit_is_ioerr() {
    let blk = disk(1 << 30);
    let mut d = Driver::new(4 << 20, 256);
    let buf = d.g.alloc(1 << 20);
    d.g.write(buf, &[0x55; 512]);
    d.request(T_IN, 0, &[(buf, 1 << 20, true); 200]);
    assert!(matches!(
        d.outcome(&blk),
        Err(RequestError::TooLarge { len: 209_715_200 })
    ));
    assert_eq!(d.serve(&blk), (S_IOERR, 1));
    assert_eq!(d.g.read(buf, 512), [0x55; 512], "data was read anyway");
}

/// The same for DISCARD: the segment list is bounded before it is read.
#[test]
fn aliasing_discard_list_is_ioerr() {
    let blk = disk(1 << 30);
    let mut d = Driver::new(4 << 20, 256);
    let buf = d.g.alloc(1 << 20);
    d.request(T_DISCARD, 0, &[(buf, 1 << 20, false); 64]);
    assert!(matches!(
        d.outcome(&blk),
        Err(RequestError::DiscardList { bytes: 67_108_864 })
    ));
    assert_eq!(d.serve(&blk), (S_IOERR, 1));
}

/// GET_ID writes at most 20 bytes into the data buffers, never into
/// the status byte, and the used length counts what was written.
#[test]
fn get_id_stays_in_its_buffer() {
    let blk = disk(1 << 20);
    // No data buffer: nothing but the status.
    let mut d = Driver::new(1 << 20, 16);
    d.request(T_GET_ID, 0, &[]);
    assert_eq!(d.serve(&blk), (S_OK, 1));
    // A larger buffer: exactly 20 bytes.
    let mut d = Driver::new(1 << 20, 16);
    let buf = d.g.alloc(4096);
    d.g.write(buf, &[0xee; 64]);
    d.request(T_GET_ID, 0, &[(buf, 64, true)]);
    assert_eq!(d.serve(&blk), (S_OK, 21));
    assert_eq!(&d.g.read(buf, 6), b"vmmfs-");
    assert_eq!(d.g.read(buf + 20, 44), [0xee; 44]);
    // Status in the same buffer as the data (10 bytes: 9 of id).
    let mut d = Driver::new(1 << 20, 16);
    let buf = d.g.alloc(4096);
    d.g.write(buf, &[0xee; 16]);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&T_GET_ID.to_le_bytes());
    d.g.write(d.hdr, &h);
    d.q.chain(&d.g, &[(d.hdr, 16, false), (buf, 10, true)]);
    let (mut act, _irq) = d.g.activate(&[&d.q]);
    blk.drain_queue(&mut act).unwrap();
    assert_eq!(d.q.all_used(&d.g), [(0, 10)]);
    assert_eq!(&d.g.read(buf, 6), b"vmmfs-");
    assert_eq!(d.g.read(buf + 9, 1), [S_OK]);
}

/// Zero-length buffers anywhere (even outside RAM) are skipped.
#[test]
fn zero_length_buffers_are_ignored() {
    let blk = disk(1 << 20);
    let mut d = Driver::new(1 << 20, 16);
    let buf = d.g.alloc(4096);
    d.request(
        T_IN,
        0,
        &[
            (0x7fff_0000_0000, 0, true),
            (buf, 512, true),
            (u64::MAX, 0, true),
        ],
    );
    assert_eq!(d.serve(&blk), (S_OK, 513));
    assert_eq!(d.g.read(buf, 3), [0, 7, 14]);
}

#[test]
fn sector_arithmetic_cannot_overflow() {
    let blk = disk(1 << 20);
    for sector in [u64::MAX, u64::MAX / 512 + 1, (1 << 20) / 512] {
        let mut d = Driver::new(1 << 20, 16);
        let buf = d.g.alloc(4096);
        d.request(T_IN, sector, &[(buf, 512, true)]);
        let rule = d.outcome(&blk);
        assert!(
            matches!(rule, Err(RequestError::SectorOverflow { .. }))
                || sector == (1 << 20) / 512 && matches!(rule, Err(RequestError::PastEnd { .. })),
            "sector {sector:#x}: {rule:?}"
        );
        assert_eq!(d.serve(&blk), (S_IOERR, 1), "sector {sector:#x}");
    }
    let mut d = Driver::new(1 << 20, 16);
    let seg = d.g.alloc(4096);
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&(u64::MAX / 256).to_le_bytes());
    s[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    d.g.write(seg, &s);
    d.request(T_DISCARD, 0, &[(seg, 16, false)]);
    assert!(matches!(
        d.outcome(&blk),
        Err(RequestError::DiscardTooLarge { sectors: u32::MAX })
    ));
    assert_eq!(d.serve(&blk), (S_IOERR, 1));
    s[8..12].copy_from_slice(&1u32.to_le_bytes());
    d.g.write(seg, &s);
    assert!(matches!(
        d.outcome(&blk),
        Err(RequestError::SectorOverflow { .. })
    ));
}

/// Each refusal names its rule, and the driver gets the status it implies.
#[test]
fn refusals_name_their_rule() {
    let ro = Blk::new(BlkConfig {
        file: Arc::new(memfd_disk(1 << 20)),
        ro: true,
        sector_size: Some(4096),
        discard: true,
    })
    .unwrap();
    let mut d = Driver::new(1 << 20, 16);
    let buf = d.g.alloc(4096);
    d.request(T_OUT, 0, &[(buf, 512, false)]);
    assert!(matches!(d.outcome(&ro), Err(RequestError::ReadOnly)));
    let mut d = Driver::new(1 << 20, 16);
    d.request(T_IN, 1, &[(buf, 4096, true)]);
    assert!(matches!(
        d.outcome(&ro),
        Err(RequestError::Unaligned {
            off: 512,
            sector_size: 4096,
            ..
        })
    ));
    let mut d = Driver::new(1 << 20, 16);
    d.request(T_IN, 0, &[(buf, 100, true)]);
    assert!(matches!(
        d.outcome(&ro),
        Err(RequestError::Unaligned { len: 100, .. })
    ));
    // Discard is not offered on a read-only disk.
    let mut d = Driver::new(1 << 20, 16);
    d.request(T_DISCARD, 0, &[(buf, 16, false)]);
    assert!(matches!(
        d.outcome(&ro),
        Err(RequestError::Unsupported(T_DISCARD))
    ));
    assert_eq!(d.serve(&ro), (S_UNSUPP, 1));
    // A write whose header is split over two descriptors.
    let blk = disk(1 << 20);
    let mut d = Driver::new(1 << 20, 16);
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&T_OUT.to_le_bytes());
    d.g.write(d.hdr, &h);
    d.q.chain(
        &d.g,
        &[
            (d.hdr, 8, false),
            (d.hdr + 8, 8, false),
            (buf, 512, false),
            (d.status, 1, true),
        ],
    );
    assert!(matches!(d.outcome(&blk), Err(RequestError::SplitHeader)));
    // No status byte: nothing to answer in.
    let mut d = Driver::new(1 << 20, 16);
    d.q.chain(&d.g, &[(d.hdr, 16, false)]);
    assert!(matches!(d.outcome(&blk), Err(RequestError::NoStatus)));
}

#[test]
fn stops_while_the_driver_keeps_feeding() {
    let mut blk = disk(1 << 20);
    // A full ring (64 requests of 3 descriptors) that the driver
    // refills faster than the device serves it.
    let mut d = Driver::new(8 << 20, 256);
    let buf = d.g.alloc(1 << 20);
    for _ in 0..64 {
        d.request(T_IN, 0, &[(buf, 1 << 20, true)]);
    }
    let (mut act, _irq) = d.g.activate(&[&d.q]);
    let kick = act.notify[0].clone();
    let (g, q) = (&d.g, &mut d.q);
    let (took, _) = run_then_stop(&mut blk, &mut act, Duration::from_millis(100), |stop| {
        refeed(g, q, &kick, stop)
    });
    assert!(took < Duration::from_millis(500), "stop took {took:?}");
}
