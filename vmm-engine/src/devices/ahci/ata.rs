//! The drive behind an AHCI port, over a file or block device: its ATA
//! commands (IDENTIFY, reads and writes, flushes); a CD/DVD drive's ATAPI
//! packets are in `atapi`.
//!
//! Commands come from the guest's FIS and ATAPI packet: LBAs and counts are
//! checked against the medium before any I/O, transfers are bounded by the
//! command (at most 65536 sectors), and data goes through the caller's
//! fixed buffer. Unknown commands end with ABORT (ATA) or ILLEGAL REQUEST
//! (ATAPI), as a drive would answer.

use super::transfer::{Outcome, PortConfig, Prdt, ERR_IDNF};
use crate::cast;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Sense data of the last ATAPI command (REQUEST SENSE reports it).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sense {
    pub(super) key: u8,
    pub(super) asc: u8,
}

pub struct Disk {
    pub(super) file: Arc<OwnedFd>,
    pub cd: bool,
    pub(super) ro: bool,
    /// Logical, physical sector size.
    pub(super) sector: (u32, u32),
    /// Medium size in logical sectors.
    pub(super) sectors: u64,
    pub(super) serial: String,
    pub(super) nmrr: u16,
    pub(super) sense: Sense,
}

fn file_size(fd: &OwnedFd) -> u64 {
    // SAFETY: lseek on a descriptor we own; SEEK_END gives the size of a
    // file or a block device alike. Reads use pread, so the offset left
    // behind does not matter.
    let n = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    // A failed lseek (-1) gives 0, as before.
    u64::try_from(n).unwrap_or(0)
}

/// An ATA string: space padded, the two bytes of each word swapped.
fn ata_string(words: &mut [u16], s: &str) {
    let mut b: Vec<u8> = s.bytes().take(words.len() * 2).collect();
    b.resize(words.len() * 2, b' ');
    for (i, w) in words.iter_mut().enumerate() {
        *w = (u16::from(b[2 * i]) << 8) | u16::from(b[2 * i + 1]);
    }
}

impl Disk {
    pub fn new(cfg: PortConfig) -> Disk {
        let size = file_size(&cfg.file);
        Disk {
            sectors: size / u64::from(cfg.sector_size.0),
            file: cfg.file,
            cd: cfg.cd,
            ro: cfg.ro || cfg.cd,
            sector: cfg.sector_size,
            serial: cfg.serial,
            nmrr: cfg.nmrr,
            sense: Sense::default(),
        }
    }

    /// Run the command in `cfis` (a Register H2D FIS); `acmd` is the ATAPI
    /// packet, `write` the header's direction bit.
    pub fn execute(
        &mut self,
        cfis: &[u8],
        acmd: &[u8; 16],
        write: bool,
        prdt: &Prdt,
        bounce: &mut [u8],
    ) -> Outcome {
        let cmd = cfis[2];
        let lba48 = u64::from(cfis[4])
            | (u64::from(cfis[5]) << 8)
            | (u64::from(cfis[6]) << 16)
            | (u64::from(cfis[8]) << 24)
            | (u64::from(cfis[9]) << 32)
            | (u64::from(cfis[10]) << 40);
        let lba28 = (lba48 & 0xff_ffff) | (u64::from(cfis[7] & 0x0f) << 24);
        let count48 = match u32::from(cfis[12]) | (u32::from(cfis[13]) << 8) {
            0 => 65536,
            n => n,
        };
        let count28 = match cfis[12] {
            0 => 256,
            n => u32::from(n),
        };
        if self.cd {
            return match cmd {
                0xa0 => self.packet(acmd, prdt, bounce),
                0xa1 => self.identify(prdt, true),
                // A packet device aborts IDENTIFY DEVICE: the host then
                // reads its signature and asks for IDENTIFY PACKET DEVICE.
                0xec => Outcome::abort(),
                0x08 | 0xef | 0xe5 | 0xe0..=0xe3 => Outcome::ok(0),
                _ => Outcome::abort(),
            };
        }
        match cmd {
            0xec => self.identify(prdt, false),
            // READ/WRITE DMA EXT, READ/WRITE SECTOR(S) EXT (PIO, the data
            // goes through the PRDT all the same).
            0x25 | 0x24 => self.rw(lba48, count48, false, prdt, bounce),
            0x35 | 0x34 => self.rw(lba48, count48, true, prdt, bounce),
            // READ/WRITE DMA, READ/WRITE SECTOR(S) (28-bit).
            0xc8 | 0x20 => self.rw(lba28, count28, false, prdt, bounce),
            0xca | 0x30 => self.rw(lba28, count28, true, prdt, bounce),
            // FLUSH CACHE (EXT).
            0xe7 | 0xea => {
                // SAFETY: fdatasync on a descriptor we own.
                if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 && !self.ro {
                    log::debug!("ahci: flush: {}", std::io::Error::last_os_error());
                }
                Outcome::ok(0)
            }
            // SET FEATURES, SET MULTIPLE MODE, INITIALIZE DEVICE PARAMETERS,
            // READ VERIFY (EXT), power management: nothing to change here.
            0xef | 0xc6 | 0x91 | 0x40 | 0x42 | 0xe0..=0xe3 | 0xe5 | 0xe6 => Outcome::ok(0),
            _ => {
                let _ = write;
                Outcome::abort()
            }
        }
    }

    /// Read or write `count` logical sectors at `lba` through the PRDT.
    fn rw(&mut self, lba: u64, count: u32, write: bool, prdt: &Prdt, bounce: &mut [u8]) -> Outcome {
        if write && self.ro {
            return Outcome::abort();
        }
        let ss = u64::from(self.sector.0);
        if lba
            .checked_add(u64::from(count))
            .is_none_or(|end| end > self.sectors)
        {
            return Outcome::error(ERR_IDNF);
        }
        let len = cast::usize_from(u64::from(count) * ss);
        match self.transfer(lba * ss, len, write, prdt, bounce) {
            Some(n) if n == len => Outcome::ok(n),
            _ => Outcome::abort(),
        }
    }

    /// Move `len` bytes between the medium at byte `pos` and the guest's
    /// buffers; None on an I/O error or a buffer outside RAM, else the
    /// bytes moved (less than `len` when the PRDT is short).
    pub(super) fn transfer(
        &self,
        pos: u64,
        len: usize,
        write: bool,
        prdt: &Prdt,
        bounce: &mut [u8],
    ) -> Option<usize> {
        let fd = self.file.as_raw_fd();
        let mut failed = false;
        let done = prdt.walk(len, &mut |addr, off, n| {
            let mut k = 0;
            while k < n {
                let step = (n - k).min(bounce.len());
                let buf = &mut bounce[..step];
                let at = pos + (off + k) as u64;
                let ok = if write {
                    prdt.mem.read(addr + k as u64, buf).is_ok() && pwrite_all(fd, buf, at)
                } else {
                    pread_all(fd, buf, at) && prdt.mem.write(addr + k as u64, buf).is_ok()
                };
                if !ok {
                    failed = true;
                    return false;
                }
                k += step;
            }
            true
        });
        (!failed).then_some(done)
    }

    /// Copy `data` (at most one sector of answer) to the guest's buffers.
    pub(super) fn give(prdt: &Prdt, data: &[u8]) -> Option<usize> {
        let mut failed = false;
        let done = prdt.walk(data.len(), &mut |addr, off, n| {
            if prdt.mem.write(addr, &data[off..off + n]).is_err() {
                failed = true;
                return false;
            }
            true
        });
        (!failed).then_some(done)
    }

    /// IDENTIFY (PACKET) DEVICE: 256 words.
    fn identify(&self, prdt: &Prdt, packet: bool) -> Outcome {
        let mut w = [0u16; 256];
        if packet {
            // ATAPI, CD-ROM, removable, 12-byte packets.
            w[0] = 0x85c0;
        } else {
            w[0] = 0x0040; // fixed disk
            let chs = self.sectors.min(16383 * 16 * 63);
            w[1] = (chs / (16 * 63)).max(1) as u16;
            w[3] = 16;
            w[6] = 63;
        }
        ata_string(&mut w[10..20], &self.serial);
        ata_string(&mut w[23..27], "001");
        ata_string(
            &mut w[27..47],
            if packet {
                "BHYVE SATA DVD ROM"
            } else {
                "BHYVE SATA DISK"
            },
        );
        w[47] = 0x8000 | 16; // READ/WRITE MULTIPLE: 16 sectors
        w[49] = (1 << 9) | (1 << 8); // LBA, DMA
        w[50] = 0x4000;
        w[53] = 0x0006; // words 64-70 and 88 are valid
        w[59] = 0x0100 | 16;
        let lba28 = self.sectors.min(0x0fff_ffff);
        w[60] = cast::low_u16(lba28);
        w[61] = cast::low_u16(lba28 >> 16);
        w[63] = 0x0007; // multiword DMA 0-2
        w[64] = 0x0003; // PIO 3-4
        w[65..69].copy_from_slice(&[120, 120, 120, 120]);
        w[76] = (1 << 2) | (1 << 1); // SATA Gen 1 and 2
        w[80] = 0x01f0; // ATA/ATAPI-4 to ATA8-ACS
        w[81] = 0x0028;
        if !packet {
            w[82] = (1 << 14) | (1 << 5); // NOP, write cache
            w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10); // FLUSH (EXT), 48-bit
            w[84] = 1 << 14;
            w[85] = w[82];
            w[86] = (1 << 13) | (1 << 12) | (1 << 10);
            w[87] = 1 << 14;
            for (i, word) in w[100..104].iter_mut().enumerate() {
                *word = cast::low_u16(self.sectors >> (16 * i));
            }
            let (l, p) = self.sector;
            let mut w106 = 0x4000u16;
            if l > 512 {
                w106 |= 1 << 12;
                let words = l / 2;
                w[117] = cast::low_u16(u64::from(words));
                w[118] = cast::low_u16(u64::from(words) >> 16);
            }
            // trailing_zeros of a u32 is at most 32.
            let ratio = cast::low_u16(u64::from((p / l).trailing_zeros()));
            if ratio > 0 {
                w106 |= (1 << 13) | ratio;
            }
            w[106] = w106;
            w[217] = self.nmrr;
        }
        w[88] = 0x207f; // UDMA 0-6 supported, 5 selected
        w[93] = 0;
        let mut b = [0u8; 512];
        for (i, word) in w.iter().enumerate() {
            b[2 * i..2 * i + 2].copy_from_slice(&word.to_le_bytes());
        }
        // Integrity word: signature A5, checksum making the bytes sum to 0.
        b[510] = 0xa5;
        let sum = b[..511].iter().fold(0u8, |a, x| a.wrapping_add(*x));
        b[511] = 0u8.wrapping_sub(sum);
        match Self::give(prdt, &b) {
            Some(n) => Outcome {
                pio_in: true,
                ..Outcome::ok(n)
            },
            None => Outcome::abort(),
        }
    }
}

/// Run `op(done, at)` (a pread or pwrite of the rest from `done`) until
/// `len` bytes are through; EINTR retries. `Err(done)` at end of file,
/// `Err(usize::MAX)` on an error.
fn until_done(
    len: usize,
    mut at: u64,
    mut op: impl FnMut(usize, u64) -> isize,
) -> Result<(), usize> {
    let mut done = 0;
    while done < len {
        match op(done, at) {
            n if n > 0 => {
                let n = cast::count(n);
                done += n;
                at += n as u64;
            }
            0 => return Err(done),
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
            _ => return Err(usize::MAX),
        }
    }
    Ok(())
}

fn pread_all(fd: i32, buf: &mut [u8], at: u64) -> bool {
    let len = buf.len();
    let p = buf.as_mut_ptr();
    // SAFETY: each call reads into the unfilled rest of buf.
    match until_done(len, at, |done, at| unsafe {
        libc::pread(fd, p.add(done).cast(), len - done, cast::off_t(at))
    }) {
        Ok(()) => true,
        // Past the end of a medium that shrank: zeros.
        Err(done) if done < len => {
            buf[done..].fill(0);
            true
        }
        Err(_) => false,
    }
}

fn pwrite_all(fd: i32, buf: &[u8], at: u64) -> bool {
    let len = buf.len();
    let p = buf.as_ptr();
    // SAFETY: each call writes from the unwritten rest of buf.
    until_done(len, at, |done, at| unsafe {
        libc::pwrite(fd, p.add(done).cast(), len - done, cast::off_t(at))
    })
    .is_ok()
}
