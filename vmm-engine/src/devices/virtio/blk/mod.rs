//! virtio-blk on a descriptor handed over by the client (file or block
//! device). Requests are served synchronously on the device thread with
//! preadv/pwritev straight into guest pages (no bounce buffer).
//!
//! Guest mistakes in a request (bad sector, odd length, writes to a
//! read-only disk, missing header) end that request with IOERR; host I/O
//! errors too. Only queue-protocol violations mark the device broken.

mod io;
mod request;
#[cfg(test)]
mod tests;

use super::queue::{Chain, Desc, QueueError};
use super::{Activation, EpollHelper, Ram, VirtioDevice, TYPE_BLOCK};
use crate::cast;
use request::{
    Disk, RequestError, DISCARD_SECTORS_MAX, DISCARD_SEG_MAX, QUEUE_SIZE, SEG_MAX, SIZE_MAX, S_OK,
    T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_bindings::virtio_blk as blk;

pub use request::MAX_REQUEST_BYTES;

const F_SIZE_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SIZE_MAX;
const F_SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u64 = 1 << blk::VIRTIO_BLK_F_BLK_SIZE;
const F_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
const F_DISCARD: u64 = 1 << blk::VIRTIO_BLK_F_DISCARD;

/// Bytes of the GET_ID answer.
const ID_BYTES: usize = crate::cast::usize_from(blk::VIRTIO_BLK_ID_BYTES as u64);

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

impl Blk {
    fn disk(&self) -> Disk {
        Disk {
            size: self.size,
            sector_size: u64::from(self.cfg.sector_size.unwrap_or(512)),
            ro: self.cfg.ro,
        }
    }

    /// Serve one request; returns the bytes written into the chain.
    fn request(&self, ram: &Ram, c: &Chain) -> u32 {
        let status = match request::status_desc(c) {
            Ok(d) => d,
            Err(e) => {
                log::debug!("virtio-blk: {e}");
                return 0;
            }
        };
        let (byte, written) = match self.serve(ram, c, status) {
            Ok(n) => (S_OK, n),
            Err(e) => {
                log::debug!("virtio-blk: {e}");
                (e.status(), 0)
            }
        };
        ram.write(status.addr + u64::from(status.len) - 1, &[byte]);
        written.saturating_add(1)
    }

    /// Do what request `c` asks; Ok: the data bytes written into it.
    fn serve(&self, ram: &Ram, c: &Chain, status: &Desc) -> Result<u32, RequestError> {
        let (ty, sector) = request::header(ram, c)?;
        let fd = self.cfg.file.as_raw_fd();
        match ty {
            T_IN | T_OUT => {
                let t = request::transfer(c, ty, sector, status, &self.disk())?;
                let iov = io::iovecs(ram, &t.data).ok_or(RequestError::OutsideRam)?;
                io::rw_all(fd, iov, t.off, ty == T_OUT)
                    .map_err(|source| RequestError::Io { off: t.off, source })?;
                // len <= MAX_REQUEST_BYTES, below 4 GiB.
                let len =
                    u32::try_from(t.len).map_err(|_| RequestError::TooLarge { len: t.len })?;
                Ok(if ty == T_IN { len } else { 0 })
            }
            T_FLUSH => match io::sync(fd) {
                Err(source) if !self.cfg.ro => Err(RequestError::Io { off: 0, source }),
                _ => Ok(0),
            },
            T_GET_ID => {
                // Into the data buffers only: the writable bytes before the
                // status byte (the last one), never the status itself.
                let room = cast::usize_from((c.writable_len() - 1).min(ID_BYTES as u64));
                let w = c.write_at(ram, 0, &self.id[..room]);
                Ok(u32::try_from(w).unwrap_or(0)) // w <= ID_BYTES
            }
            T_DISCARD if self.discard_on() => {
                for (off, len) in request::discard_segments(ram, c, &self.disk())? {
                    io::punch_hole(fd, off, len)
                        .map_err(|source| RequestError::Io { off, source })?;
                }
                Ok(0)
            }
            _ => Err(RequestError::Unsupported(ty)),
        }
    }

    fn discard_on(&self) -> bool {
        self.cfg.discard && !self.cfg.ro
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
