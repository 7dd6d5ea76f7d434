//! virtio-blk requests as the driver lays them out (a header, data
//! buffers, a status byte), checked against the disk and the limits
//! before any I/O. Each refusal is a [`RequestError`] naming its rule.

use super::super::queue::{Chain, Desc};
use super::super::Ram;
use crate::cast;

use virtio_bindings::virtio_blk as blk;

pub const T_IN: u32 = blk::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = blk::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = blk::VIRTIO_BLK_T_DISCARD;

/// The status byte a request ends with.
pub const S_OK: u8 = cast::const_u8(blk::VIRTIO_BLK_S_OK as u64);
pub const S_IOERR: u8 = cast::const_u8(blk::VIRTIO_BLK_S_IOERR as u64);
pub const S_UNSUPP: u8 = cast::const_u8(blk::VIRTIO_BLK_S_UNSUPP as u64);

/// Discard segments per request we advertise and accept: the segment list
/// (16 bytes each) is checked against it before one is read, and Linux
/// sends one segment per request unless told more.
pub const DISCARD_SEG_MAX: u32 = 32;
/// Sectors per discard segment (2 GiB): each segment is one fallocate(2),
/// which punches a hole of that size in milliseconds.
pub const DISCARD_SECTORS_MAX: u32 = 1 << 22;

pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (seg_max): a full queue less the
/// header and the status descriptor.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment we advertise (size_max, when the driver takes
/// VIRTIO_BLK_F_SIZE_MAX): with SEG_MAX it keeps a conforming driver's
/// requests within MAX_REQUEST_BYTES.
pub const SIZE_MAX: u32 = 256 << 10;
/// Data bytes of one read or write at most (63.5 MiB). Requests go
/// straight into guest pages, so this bounds time, not memory: a chain of
/// buffers aliasing one page could otherwise keep the device thread (and a
/// reset or VM destruction waiting for it) busy reading gigabytes. Larger
/// requests are IOERR before any I/O.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bytes of the request header (type, reserved, sector).
pub const HDR: u64 = 16;
const HDR_LEN: usize = cast::usize_from(HDR);
/// Bytes of one discard segment (sector u64, sectors u32, flags u32).
const SEG: u64 = 16;

/// Why a request is refused (or failed): IOERR, or UNSUPP for a type we
/// do not serve. The device stays usable either way.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no device-writable status byte at the end")]
    NoStatus,
    #[error("header shorter than {HDR} bytes")]
    ShortHeader,
    #[error("a write's header is not one whole descriptor")]
    SplitHeader,
    #[error("{len}-byte request over {MAX_REQUEST_BYTES}")]
    TooLarge { len: u64 },
    #[error("sector {sector:#x} past any byte offset")]
    SectorOverflow { sector: u64 },
    #[error("{len} bytes at {off:#x}: not whole sectors of {sector_size}")]
    Unaligned {
        off: u64,
        len: u64,
        sector_size: u64,
    },
    #[error("{len} bytes at {off:#x}: past the disk's end at {size:#x}")]
    PastEnd { off: u64, len: u64, size: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("data buffer outside guest RAM")]
    OutsideRam,
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error("discard list of {bytes} bytes: not 1 to {DISCARD_SEG_MAX} segments")]
    DiscardList { bytes: u64 },
    #[error("discard segment {index}: flags {flags:#x}")]
    DiscardFlags { index: u64, flags: u32 },
    #[error("discard segment of {sectors} sectors over {DISCARD_SECTORS_MAX}")]
    DiscardTooLarge { sectors: u32 },
    #[error("I/O at {off:#x}: {source}")]
    Io { off: u64, source: std::io::Error },
}

impl RequestError {
    /// The status byte the driver gets.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// The disk as requests are checked against it.
pub struct Disk {
    /// Bytes, a multiple of 512.
    pub size: u64,
    /// Logical sector size: offsets must be multiples of it.
    pub sector_size: u64,
    pub ro: bool,
}

impl Disk {
    /// Byte offset of `sector`, with `len` bytes from there in whole
    /// 512-byte units, aligned to the sector size and inside the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let off = sector
            .checked_mul(512)
            .ok_or(RequestError::SectorOverflow { sector })?;
        if !len.is_multiple_of(512) || !off.is_multiple_of(self.sector_size) {
            return Err(RequestError::Unaligned {
                off,
                len,
                sector_size: self.sector_size,
            });
        }
        if off.saturating_add(len) > self.size {
            return Err(RequestError::PastEnd {
                off,
                len,
                size: self.size,
            });
        }
        Ok(off)
    }
}

/// The descriptor holding the status byte (its last byte): the chain's
/// last, which must be device-writable.
pub fn status_desc(c: &Chain) -> Result<&Desc, RequestError> {
    c.descs
        .last()
        .filter(|d| d.write && d.len >= 1)
        .ok_or(RequestError::NoStatus)
}

/// The header's type and sector.
pub fn header(ram: &Ram, c: &Chain) -> Result<(u32, u64), RequestError> {
    let mut hdr = [0u8; HDR_LEN];
    if c.read_at(ram, 0, &mut hdr) < HDR_LEN {
        return Err(RequestError::ShortHeader);
    }
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s8 = [0u8; 8];
    s8.copy_from_slice(&hdr[8..16]);
    Ok((ty, u64::from_le_bytes(s8)))
}

/// A read or write, checked: its data buffers (the status byte left out)
/// and where on the disk.
pub struct Transfer {
    pub data: Vec<Desc>,
    pub off: u64,
    pub len: u64,
}

/// Check a read (T_IN) or write (T_OUT) of `c` at `sector`. Data buffers:
/// writable ones before the status byte (reads), readable ones after the
/// header (writes). A write's header must be a whole descriptor, as every
/// driver lays it out.
pub fn transfer(
    c: &Chain,
    ty: u32,
    sector: u64,
    status: &Desc,
    disk: &Disk,
) -> Result<Transfer, RequestError> {
    let data: Vec<Desc> = if ty == T_IN {
        let n = c.descs.len();
        let mut w: Vec<Desc> = c.descs[..n - 1]
            .iter()
            .filter(|d| d.write)
            .copied()
            .collect();
        if status.len > 1 {
            // The status shares the last buffer: its head is data.
            w.push(Desc {
                len: status.len - 1,
                ..*status
            });
        }
        w
    } else {
        let mut readable = c.descs.iter().filter(|d| !d.write);
        if readable.next().map(|d| u64::from(d.len)) != Some(HDR) {
            return Err(RequestError::SplitHeader);
        }
        readable.copied().collect()
    };
    let len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge { len });
    }
    let off = disk.range(sector, len)?;
    if ty == T_OUT && disk.ro {
        return Err(RequestError::ReadOnly);
    }
    Ok(Transfer { data, off, len })
}

/// DISCARD's segments after the header, each as (offset, bytes), all
/// checked before any is acted on.
pub fn discard_segments(
    ram: &Ram,
    c: &Chain,
    disk: &Disk,
) -> Result<Vec<(u64, u64)>, RequestError> {
    let bytes = c.readable_len().saturating_sub(HDR);
    if bytes == 0 || !bytes.is_multiple_of(SEG) || bytes / SEG > u64::from(DISCARD_SEG_MAX) {
        return Err(RequestError::DiscardList { bytes });
    }
    let mut out = Vec::new();
    for index in 0..bytes / SEG {
        let mut seg = [0u8; 16];
        if c.read_at(ram, HDR + SEG * index, &mut seg) != seg.len() {
            return Err(RequestError::DiscardList { bytes });
        }
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&seg[..8]);
        let sector = u64::from_le_bytes(s8);
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        if flags != 0 {
            return Err(RequestError::DiscardFlags { index, flags });
        }
        if sectors > DISCARD_SECTORS_MAX {
            return Err(RequestError::DiscardTooLarge { sectors });
        }
        let len = u64::from(sectors) * 512;
        let off = sector
            .checked_mul(512)
            .ok_or(RequestError::SectorOverflow { sector })?;
        if off.saturating_add(len) > disk.size {
            return Err(RequestError::PastEnd {
                off,
                len,
                size: disk.size,
            });
        }
        out.push((off, len));
    }
    Ok(out)
}
