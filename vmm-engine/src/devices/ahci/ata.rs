//! The devices behind AHCI ports: an ATA disk and an ATAPI CD/DVD drive
//! (MMC commands for read-only media), over a file or block device.
//!
//! Commands come from the guest's FIS and ATAPI packet: LBAs and counts are
//! checked against the medium before any I/O, transfers are bounded by the
//! command (at most 65536 sectors), and data goes through the caller's
//! fixed buffer. Unknown commands end with ABORT (ATA) or ILLEGAL REQUEST
//! (ATAPI), as a drive would answer.

use crate::cast;
use crate::memory::GuestMemory;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// ATA error register: aborted command; ID not found (LBA out of range).
const ERR_ABRT: u8 = 0x04;
const ERR_IDNF: u8 = 0x10;
/// CD sector size.
pub const CD_BLOCK: u64 = 2048;

/// ATA status: ready, seek complete; error.
pub const ST_READY: u8 = 0x50;
pub const ST_ERR: u8 = 0x01;

/// What a port has attached.
#[derive(Debug, Clone)]
pub struct PortConfig {
    pub file: Arc<OwnedFd>,
    pub cd: bool,
    pub ro: bool,
    /// Logical and physical sector size of a disk (512 unless `sectorsize`).
    pub sector_size: (u32, u32),
    pub serial: String,
    /// Nominal media rotation rate (IDENTIFY word 217; 1 = solid state).
    pub nmrr: u16,
}

/// A command's physical region descriptor table, read entry by entry.
pub struct Prdt<'a> {
    pub mem: &'a GuestMemory,
    pub base: u64,
    pub entries: usize,
}

impl Prdt<'_> {
    /// Entry `n`: (guest address, byte count); None outside RAM.
    fn entry(&self, n: usize) -> Option<(u64, usize)> {
        let mut e = [0u8; 16];
        self.mem.read(self.base + 16 * n as u64, &mut e).ok()?;
        let dba = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")) & !1;
        let dbc =
            (u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) & 0x3f_ffff) as usize + 1;
        Some((dba, dbc))
    }

    /// Visit the guest buffers covering `len` bytes, in order: `f(addr,
    /// offset in the transfer, bytes)`. Stops at the table's end, a bad
    /// entry, or an error from `f`; returns the bytes visited.
    pub fn walk(&self, len: usize, f: &mut dyn FnMut(u64, usize, usize) -> bool) -> usize {
        let mut done = 0;
        for n in 0..self.entries {
            if done >= len {
                break;
            }
            let Some((addr, count)) = self.entry(n) else {
                break;
            };
            let take = count.min(len - done);
            if !f(addr, done, take) {
                break;
            }
            done += take;
        }
        done
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub error: u8,
    /// Bytes moved (PRDBC).
    pub bytes: usize,
    /// A PIO data-in command (IDENTIFY): a PIO Setup FIS goes first.
    pub pio_in: bool,
}

impl Outcome {
    pub fn ok(bytes: usize) -> Outcome {
        Outcome {
            status: ST_READY,
            error: 0,
            bytes,
            pio_in: false,
        }
    }
    pub fn abort() -> Outcome {
        Outcome::error(ERR_ABRT)
    }
    fn error(error: u8) -> Outcome {
        Outcome {
            status: ST_READY | ST_ERR,
            error,
            bytes: 0,
            pio_in: false,
        }
    }
}

/// Sense data of the last ATAPI command (REQUEST SENSE reports it).
#[derive(Debug, Clone, Copy, Default)]
struct Sense {
    key: u8,
    asc: u8,
}

const SENSE_ILLEGAL_REQUEST: u8 = 0x05;
const ASC_INVALID_OPCODE: u8 = 0x20;
const ASC_LBA_OUT_OF_RANGE: u8 = 0x21;
const ASC_INVALID_FIELD: u8 = 0x24;
const SENSE_MEDIUM_ERROR: u8 = 0x03;
const ASC_READ_ERROR: u8 = 0x11;

pub struct Disk {
    file: Arc<OwnedFd>,
    pub cd: bool,
    ro: bool,
    /// Logical, physical sector size.
    sector: (u32, u32),
    /// Medium size in logical sectors.
    sectors: u64,
    serial: String,
    nmrr: u16,
    sense: Sense,
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
    fn transfer(
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
    fn give(prdt: &Prdt, data: &[u8]) -> Option<usize> {
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

    fn check_condition(&mut self, key: u8, asc: u8) -> Outcome {
        self.sense = Sense { key, asc };
        Outcome {
            status: ST_READY | ST_ERR,
            error: key << 4,
            bytes: 0,
            pio_in: false,
        }
    }

    /// Answer a data-in packet command with `data`, cut to the CDB's
    /// allocation length.
    fn answer(&mut self, prdt: &Prdt, data: &[u8], alloc: usize) -> Outcome {
        self.sense = Sense::default();
        match Self::give(prdt, &data[..data.len().min(alloc)]) {
            Some(n) => Outcome::ok(n),
            None => Outcome::abort(),
        }
    }

    /// An ATAPI (MMC) packet command.
    fn packet(&mut self, cdb: &[u8; 16], prdt: &Prdt, bounce: &mut [u8]) -> Outcome {
        match cdb[0] {
            // TEST UNIT READY, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL.
            0x00 | 0x1b | 0x1e => {
                self.sense = Sense::default();
                Outcome::ok(0)
            }
            0x03 => self.request_sense(cdb, prdt),
            0x12 => self.inquiry(cdb, prdt),
            // READ CAPACITY(10): last block, block size.
            0x25 => {
                let mut d = [0u8; 8];
                let last = u32::try_from(self.sectors.saturating_sub(1)).unwrap_or(u32::MAX);
                d[0..4].copy_from_slice(&last.to_be_bytes());
                d[4..8].copy_from_slice(&const { cast::const_u32(CD_BLOCK) }.to_be_bytes());
                self.answer(prdt, &d, 8)
            }
            0x28 | 0xa8 => self.atapi_read(cdb, prdt, bounce),
            0x43 => self.read_toc(cdb, prdt),
            // GET CONFIGURATION: the header only, current profile DVD-ROM.
            0x46 => {
                let d = [0, 0, 0, 4, 0, 0, 0, 0x10];
                self.answer(prdt, &d, be16(cdb, 7))
            }
            // GET EVENT STATUS NOTIFICATION (polled): media class, no
            // change, medium present.
            0x4a => {
                if cdb[1] & 1 == 0 {
                    return self.check_condition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD);
                }
                let d = [0, 6, 4, 0x10, 0, 2, 0, 0];
                self.answer(prdt, &d, be16(cdb, 7))
            }
            0x5a => self.mode_sense(cdb, prdt),
            _ => self.check_condition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_OPCODE),
        }
    }

    /// REQUEST SENSE: fixed format; the sense is cleared once read.
    fn request_sense(&mut self, cdb: &[u8; 16], prdt: &Prdt) -> Outcome {
        let s = self.sense;
        let mut d = [0u8; 18];
        d[0] = 0x70;
        d[2] = s.key;
        d[7] = 10;
        d[12] = s.asc;
        let out = self.answer(prdt, &d, usize::from(cdb[4]));
        self.sense = Sense::default();
        out
    }

    /// INQUIRY (standard data only).
    fn inquiry(&mut self, cdb: &[u8; 16], prdt: &Prdt) -> Outcome {
        if cdb[1] & 1 != 0 {
            return self.check_condition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD);
        }
        let mut d = [0u8; 36];
        d[0] = 0x05; // CD/DVD
        d[1] = 0x80; // removable
        d[2] = 0x05;
        d[3] = 0x32;
        d[4] = 31;
        d[8..16].copy_from_slice(b"BHYVE   ");
        d[16..32].copy_from_slice(b"BHYVE DVD-ROM   ");
        d[32..36].copy_from_slice(b"001 ");
        self.answer(prdt, &d, be16(cdb, 3))
    }

    /// READ(10), READ(12) of 2048-byte blocks.
    fn atapi_read(&mut self, cdb: &[u8; 16], prdt: &Prdt, bounce: &mut [u8]) -> Outcome {
        let lba = u64::from(be32(cdb, 2));
        let n = if cdb[0] == 0x28 {
            be16(cdb, 7) as u64
        } else {
            u64::from(be32(cdb, 6))
        };
        // One command reads at most 65536 blocks (128 MiB).
        if n > 65536 || lba.checked_add(n).is_none_or(|e| e > self.sectors) {
            return self.check_condition(SENSE_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE);
        }
        let len = cast::usize_from(n * CD_BLOCK);
        match self.transfer(lba * CD_BLOCK, len, false, prdt, bounce) {
            Some(done) => {
                self.sense = Sense::default();
                Outcome::ok(done)
            }
            None => self.check_condition(SENSE_MEDIUM_ERROR, ASC_READ_ERROR),
        }
    }

    /// READ TOC/PMA/ATIP: formats 0 (TOC) and 1 (session info), one data
    /// track.
    fn read_toc(&mut self, cdb: &[u8; 16], prdt: &Prdt) -> Outcome {
        let msf = cdb[1] & 2 != 0;
        let format = cdb[2] & 0x0f;
        let addr = |lba: u64| -> [u8; 4] {
            if msf {
                let f = lba + 150;
                // The minute byte wraps past 255 minutes, as the
                // field is 8 bits (QEMU does the same).
                [
                    0,
                    cast::low_u8(f / 4500),
                    cast::low_u8((f / 75) % 60),
                    cast::low_u8(f % 75),
                ]
            } else {
                cast::low_u32(lba).to_be_bytes()
            }
        };
        let mut d = Vec::with_capacity(20);
        match format {
            0 => {
                d.extend_from_slice(&[0, 18, 1, 1]);
                d.extend_from_slice(&[0, 0x14, 1, 0]);
                d.extend_from_slice(&addr(0));
                d.extend_from_slice(&[0, 0x14, 0xaa, 0]);
                d.extend_from_slice(&addr(self.sectors));
            }
            1 => {
                d.extend_from_slice(&[0, 10, 1, 1]);
                d.extend_from_slice(&[0, 0x14, 1, 0]);
                d.extend_from_slice(&addr(0));
            }
            _ => return self.check_condition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD),
        }
        self.answer(prdt, &d, be16(cdb, 7))
    }

    /// MODE SENSE(10): page 0x2a (capabilities) or all pages.
    fn mode_sense(&mut self, cdb: &[u8; 16], prdt: &Prdt) -> Outcome {
        let page = cdb[2] & 0x3f;
        if page != 0x2a && page != 0x3f {
            return self.check_condition(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD);
        }
        let mut d = vec![0u8; 8 + 28];
        d[1] = u8::try_from(d.len() - 2).unwrap_or(u8::MAX); // 34
        let p = &mut d[8..];
        p[0] = 0x2a;
        p[1] = 26;
        p[2] = 0x3f; // reads CD-R/RW, DVD-ROM...
        p[6] = 0x29; // tray, eject, lock
        self.answer(prdt, &d, be16(cdb, 7))
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

/// A big-endian 16-bit field of a CDB, as a length.
fn be16(cdb: &[u8; 16], o: usize) -> usize {
    usize::from(u16::from_be_bytes([cdb[o], cdb[o + 1]]))
}

/// A big-endian 32-bit field of a CDB.
fn be32(cdb: &[u8; 16], o: usize) -> u32 {
    u32::from_be_bytes([cdb[o], cdb[o + 1], cdb[o + 2], cdb[o + 3]])
}
