//! A CD/DVD drive's ATAPI packet commands (MMC, read-only media): sense
//! data, INQUIRY, capacity, reads, the TOC and mode pages.

use super::ata::{Disk, Sense};
use super::transfer::{Outcome, Prdt, CD_BLOCK, ST_ERR, ST_READY};
use crate::cast;

const SENSE_ILLEGAL_REQUEST: u8 = 0x05;
const ASC_INVALID_OPCODE: u8 = 0x20;
const ASC_LBA_OUT_OF_RANGE: u8 = 0x21;
const ASC_INVALID_FIELD: u8 = 0x24;
const SENSE_MEDIUM_ERROR: u8 = 0x03;
const ASC_READ_ERROR: u8 = 0x11;

impl Disk {
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
    pub(super) fn packet(&mut self, cdb: &[u8; 16], prdt: &Prdt, bounce: &mut [u8]) -> Outcome {
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

/// A big-endian 16-bit field of a CDB, as a length.
fn be16(cdb: &[u8; 16], o: usize) -> usize {
    usize::from(u16::from_be_bytes([cdb[o], cdb[o + 1]]))
}

/// A big-endian 32-bit field of a CDB.
fn be32(cdb: &[u8; 16], o: usize) -> u32 {
    u32::from_be_bytes([cdb[o], cdb[o + 1], cdb[o + 2], cdb[o + 3]])
}
