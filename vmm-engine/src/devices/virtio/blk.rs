//! virtio-blk on a descriptor handed over by the client (file or block
//! device). Requests are served synchronously on the device thread with
//! preadv/pwritev straight into guest pages (no bounce buffer).
//!
//! Guest mistakes in a request (bad sector, odd length, writes to a
//! read-only disk, missing header) end that request with IOERR; host I/O
//! errors too. Only queue-protocol violations mark the device broken.

use super::queue::{Chain, Desc, QueueError};
use super::{Activation, EpollHelper, Ram, VirtioDevice, TYPE_BLOCK};
use crate::cast;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
/// Discard segments per request we advertise and accept: the segment list
/// (16 bytes each) is checked against it before one is read, and Linux
/// sends one segment per request unless told more.
const DISCARD_SEG_MAX: u32 = 32;
/// Sectors per discard segment (2 GiB): each segment is one fallocate(2),
/// which punches a hole of that size in milliseconds.
const DISCARD_SECTORS_MAX: u32 = 1 << 22;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (seg_max): a full queue less the
/// header and the status descriptor.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment we advertise (size_max, when the driver takes
/// VIRTIO_BLK_F_SIZE_MAX): with SEG_MAX it keeps a conforming driver's
/// requests within MAX_REQUEST_BYTES.
const SIZE_MAX: u32 = 256 << 10;
/// Data bytes of one read or write at most (63.5 MiB). Requests go
/// straight into guest pages, so this bounds time, not memory: a chain of
/// buffers aliasing one page could otherwise keep the device thread (and a
/// reset or VM destruction waiting for it) busy reading gigabytes. Larger
/// requests are IOERR before any I/O.
pub(super) const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bytes of the request header (type, reserved, sector).
const HDR: u64 = 16;
const HDR_LEN: usize = cast::usize_from(HDR);
/// Bytes of the GET_ID answer.
const ID_BYTES: usize = 20;

/// Options of `device S virtio-blk fd=N[,ro][,sectorsize=L[/P]]`.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    pub file: Arc<OwnedFd>,
    pub ro: bool,
    /// Logical sector size when given (512..=32768, a power of two).
    pub sector_size: Option<u32>,
    /// Offer DISCARD (punches holes in the file); bhyve's `nodelete` clears it.
    pub discard: bool,
}

pub struct Blk {
    cfg: BlkConfig,
    /// Size in bytes, rounded down to 512.
    size: u64,
    id: [u8; ID_BYTES],
}

impl Blk {
    pub fn new(cfg: BlkConfig) -> std::io::Result<Blk> {
        let fd = cfg.file.as_raw_fd();
        // SAFETY: lseek on a descriptor we own; works for files and block devices.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat into a zeroed stat we own.
        unsafe { libc::fstat(fd, &mut st) };
        let mut id = [0u8; ID_BYTES];
        let s = format!("vmmfs-{:x}-{:x}", st.st_dev, st.st_ino);
        let n = s.len().min(ID_BYTES);
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        Ok(Blk {
            size: end.unsigned_abs() & !511, // end >= 0, checked above
            cfg,
            id,
        })
    }
}

fn iovecs(ram: &Ram, descs: &[&Desc]) -> Option<Vec<libc::iovec>> {
    let mut v = Vec::with_capacity(descs.len());
    for d in descs {
        if d.len == 0 {
            continue;
        }
        let p = ram.host(d.addr, d.len as usize)?;
        v.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: d.len as usize,
        });
    }
    Some(v)
}

/// preadv/pwritev the whole of `iov` at `off`; short transfers continue.
fn rw_all(fd: i32, mut iov: Vec<libc::iovec>, mut off: u64, write: bool) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut i = 0;
    while i < iov.len() {
        let cnt = libc::c_int::try_from((iov.len() - i).min(1024)).unwrap_or(1024);
        // SAFETY: every iovec points into guest RAM checked by Ram::host and
        // stays valid while the device thread runs (RAM outlives the run).
        let r = unsafe {
            if write {
                libc::pwritev(fd, iov[i..].as_ptr(), cnt, cast::off_t(off))
            } else {
                libc::preadv(fd, iov[i..].as_ptr(), cnt, cast::off_t(off))
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let mut n = cast::count(r); // r > 0 here
        total += n as u64;
        off += n as u64;
        while n > 0 && i < iov.len() {
            if n >= iov[i].iov_len {
                n -= iov[i].iov_len;
                i += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                iov[i].iov_base = unsafe { iov[i].iov_base.cast::<u8>().add(n) }.cast();
                iov[i].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(total)
}

impl Blk {
    /// Serve one request; returns the bytes written into the chain.
    fn request(&self, ram: &Ram, c: &Chain) -> u32 {
        // The status byte is the last byte of the last descriptor, which must
        // be device-writable.
        let Some(last) = c.descs.last().filter(|d| d.write && d.len >= 1) else {
            log::debug!("virtio-blk: request without status byte");
            return 0;
        };
        let status_at = last.addr + u64::from(last.len) - 1;
        let mut hdr = [0u8; HDR_LEN];
        let (status, written) = if c.read_at(ram, 0, &mut hdr) < HDR_LEN {
            (S_IOERR, 0)
        } else {
            let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let mut s8 = [0u8; 8];
            s8.copy_from_slice(&hdr[8..16]);
            let sector = u64::from_le_bytes(s8);
            self.serve(ram, c, ty, sector, last)
        };
        ram.write(status_at, &[status]);
        written.saturating_add(1)
    }

    /// A read (T_IN) or write (T_OUT) of whole 512-byte units at `sector`.
    fn read_write(&self, ram: &Ram, c: &Chain, ty: u32, sector: u64, last: &Desc) -> (u8, u32) {
        let fd = self.cfg.file.as_raw_fd();
        // Data buffers: readable ones after the header (writes), writable
        // ones before the status byte (reads). The header and status must
        // be whole descriptors here, as every driver lays them out.
        let n = c.descs.len();
        let readable: Vec<&Desc> = c.descs.iter().filter(|d| !d.write).collect();
        let hdr_whole = readable.first().map(|d| u64::from(d.len)) == Some(HDR);
        let data: Vec<&Desc> = if ty == T_IN {
            let mut w: Vec<&Desc> = c.descs[..n - 1].iter().filter(|d| d.write).collect();
            if last.len > 1 {
                // Status shares the last buffer: its head is data.
                w.push(last);
            }
            w
        } else {
            if !hdr_whole {
                return (S_IOERR, 0);
            }
            readable[1..].to_vec()
        };
        let mut len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        if ty == T_IN && last.len > 1 {
            len -= 1;
        }
        if len > MAX_REQUEST_BYTES {
            log::debug!("virtio-blk: {len}-byte request over {MAX_REQUEST_BYTES}");
            return (S_IOERR, 0);
        }
        let ssz = u64::from(self.cfg.sector_size.unwrap_or(512));
        let Some(off) = sector.checked_mul(512) else {
            return (S_IOERR, 0);
        };
        if !len.is_multiple_of(512)
            || !off.is_multiple_of(ssz)
            || off.saturating_add(len) > self.size
        {
            return (S_IOERR, 0);
        }
        if ty == T_OUT && self.cfg.ro {
            return (S_IOERR, 0);
        }
        let Some(mut iov) = iovecs(ram, &data) else {
            return (S_IOERR, 0);
        };
        if ty == T_IN && last.len > 1 {
            if let Some(l) = iov.last_mut() {
                l.iov_len -= 1;
            }
        }
        match rw_all(fd, iov, off, ty == T_OUT) {
            // len <= MAX_REQUEST_BYTES (checked above), below 4 GiB.
            Ok(_) if ty == T_IN => u32::try_from(len).map_or((S_IOERR, 0), |l| (S_OK, l)),
            Ok(_) => (S_OK, 0),
            Err(e) => {
                log::debug!("virtio-blk: I/O at {off:#x}+{len:#x}: {e}");
                (S_IOERR, 0)
            }
        }
    }

    fn serve(&self, ram: &Ram, c: &Chain, ty: u32, sector: u64, last: &Desc) -> (u8, u32) {
        let fd = self.cfg.file.as_raw_fd();
        match ty {
            T_IN | T_OUT => self.read_write(ram, c, ty, sector, last),
            T_FLUSH => {
                // SAFETY: fdatasync on our descriptor.
                if unsafe { libc::fdatasync(fd) } == 0 || self.cfg.ro {
                    (S_OK, 0)
                } else {
                    (S_IOERR, 0)
                }
            }
            T_GET_ID => {
                // Into the data buffers only: the writable bytes before the
                // status byte (the last one), never the status itself.
                let room = cast::usize_from((c.writable_len() - 1).min(ID_BYTES as u64));
                let w = c.write_at(ram, 0, &self.id[..room]);
                (S_OK, u32::try_from(w).unwrap_or(0)) // w <= ID_BYTES
            }
            T_DISCARD if self.discard_on() => (self.discard(ram, c), 0),
            _ => (S_UNSUPP, 0),
        }
    }

    fn discard_on(&self) -> bool {
        self.cfg.discard && !self.cfg.ro
    }

    /// DISCARD: segments of {sector u64, sectors u32, flags u32} after the
    /// header; each becomes a hole in the file (reads then return zeros).
    fn discard(&self, ram: &Ram, c: &Chain) -> u8 {
        let body = c.readable_len().saturating_sub(HDR);
        if body == 0 || !body.is_multiple_of(16) || body / 16 > u64::from(DISCARD_SEG_MAX) {
            return S_IOERR;
        }
        for k in 0..body / 16 {
            let mut seg = [0u8; 16];
            if c.read_at(ram, HDR + 16 * k, &mut seg) != 16 {
                return S_IOERR;
            }
            let mut s8 = [0u8; 8];
            s8.copy_from_slice(&seg[..8]);
            let sector = u64::from_le_bytes(s8);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let (Some(off), Some(len)) =
                (sector.checked_mul(512), u64::from(count).checked_mul(512))
            else {
                return S_IOERR;
            };
            if flags != 0 || count > DISCARD_SECTORS_MAX || off.saturating_add(len) > self.size {
                return S_IOERR;
            }
            // SAFETY: fallocate on our descriptor with checked offsets.
            let r = unsafe {
                libc::fallocate(
                    self.cfg.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    cast::off_t(off),
                    cast::off_t(len),
                )
            };
            if r != 0 {
                log::debug!("virtio-blk: discard: {}", std::io::Error::last_os_error());
                return S_IOERR;
            }
        }
        S_OK
    }

    /// One service round: the requests waiting, a ring's worth at most.
    pub(super) fn drain_queue(&self, act: &mut Activation) -> Result<(), QueueError> {
        act.serve_queue(0, |ram, c| self.request(ram, c))
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = F_SIZE_MAX | F_SEG_MAX | F_FLUSH;
        if self.cfg.ro {
            f |= F_RO;
        }
        if self.cfg.sector_size.is_some() {
            f |= F_BLK_SIZE;
        }
        if self.discard_on() {
            f |= F_DISCARD;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&(self.size / 512).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.cfg.sector_size.unwrap_or(512).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        if self.discard_on() {
            c[36..40].copy_from_slice(&DISCARD_SECTORS_MAX.to_le_bytes());
            c[40..44].copy_from_slice(&DISCARD_SEG_MAX.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
        }
        c
    }

    fn run(&mut self, act: &mut Activation, ep: &mut EpollHelper) {
        super::service::run_queue(act, ep, |act| self.drain_queue(act));
    }
}

#[cfg(test)]
mod tests {
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
            assert_eq!(d.serve(&blk), (S_IOERR, 1), "sector {sector:#x}");
        }
        let mut d = Driver::new(1 << 20, 16);
        let seg = d.g.alloc(4096);
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&(u64::MAX / 256).to_le_bytes());
        s[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        d.g.write(seg, &s);
        d.request(T_DISCARD, 0, &[(seg, 16, false)]);
        assert_eq!(d.serve(&blk), (S_IOERR, 1));
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
}
