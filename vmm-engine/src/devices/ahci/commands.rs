//! Carrying out issued commands: the command header and table from guest
//! RAM, the drive's execution, and completion (PRDBC, task file, the
//! received FISes and the port's interrupt).

use super::hba::Ahci;
use super::regs::{CMD_FRE, CMD_ST, IS_DHRS, IS_PSS, IS_TFES, MAX_PRDT, SLOTS};
use super::transfer::{Outcome, Prdt, ST_ERR};

impl Ahci {
    /// Carry out every issued command of a started port, lowest slot first.
    /// Each command completes before this returns (at most 32 of them).
    pub(super) fn run_port(&mut self, i: usize) {
        if self.ports[i].cmd & CMD_ST == 0 {
            return;
        }
        for slot in 0..SLOTS {
            if self.ports[i].ci & (1 << slot) == 0 {
                continue;
            }
            self.run_command(i, slot);
            self.ports[i].ci &= !(1 << slot);
        }
    }

    fn run_command(&mut self, i: usize, slot: u32) {
        let hdr_at = self.ports[i].clb + u64::from(slot) * 32;
        let mut hdr = [0u8; 32];
        if self.mem.read(hdr_at, &mut hdr).is_err() {
            log::debug!("ahci: port {i}: command header outside RAM");
            return self.finish(i, slot, hdr_at, Outcome::abort());
        }
        let dw0 = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let prdtl = (dw0 >> 16) as usize;
        let write = dw0 & (1 << 6) != 0;
        let ctba = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes")) & !0x7f;
        // CFIS (64 bytes) and the ATAPI command (16 bytes at 0x40).
        let mut table = [0u8; 0x80];
        if self.mem.read(ctba, &mut table).is_err() {
            log::debug!("ahci: port {i}: command table outside RAM");
            return self.finish(i, slot, hdr_at, Outcome::abort());
        }
        let cfis = &table[..20];
        if cfis[0] != 0x27 || cfis[1] & 0x80 == 0 {
            // Not a Register H2D FIS with a command: nothing to do.
            return self.finish(i, slot, hdr_at, Outcome::ok(0));
        }
        let prdt = Prdt {
            mem: &self.mem,
            base: ctba + 0x80,
            entries: prdtl.min(MAX_PRDT),
        };
        let mut acmd = [0u8; 16];
        acmd.copy_from_slice(&table[0x40..0x50]);
        let port = &mut self.ports[i];
        let out = port
            .disk
            .execute(cfis, &acmd, write, &prdt, &mut port.bounce);
        self.finish(i, slot, hdr_at, out);
    }

    /// Complete a command: PRDBC, the task file, the FIS and the interrupt.
    fn finish(&mut self, i: usize, slot: u32, hdr_at: u64, out: Outcome) {
        let _ = slot;
        if self
            .mem
            // PRDBC: at most 65536 sectors of 4 KiB, well within 32 bits.
            .write(
                hdr_at + 4,
                &u32::try_from(out.bytes).unwrap_or(u32::MAX).to_le_bytes(),
            )
            .is_err()
        {
            log::debug!("ahci: port {i}: cannot update PRDBC");
        }
        let status = out.status;
        let p = &mut self.ports[i];
        p.tfd = (u32::from(out.error) << 8) | u32::from(status);
        if out.pio_in && status & ST_ERR == 0 {
            self.write_pio_setup(i, status);
        }
        self.write_d2h(i, status, out.error, false);
        let mut bits = IS_DHRS;
        if out.pio_in {
            bits |= IS_PSS;
        }
        if status & ST_ERR != 0 {
            bits |= IS_TFES;
        }
        self.port_event(i, bits);
    }

    /// A Register D2H FIS at FB + 0x40 (if FIS receive is on).
    pub(super) fn write_d2h(&mut self, i: usize, status: u8, error: u8, signature: bool) {
        let p = &self.ports[i];
        if p.cmd & CMD_FRE == 0 {
            return;
        }
        let mut fis = [0u8; 20];
        fis[0] = 0x34;
        fis[1] = 0x40; // interrupt
        fis[2] = status;
        fis[3] = error;
        if signature {
            // Sector count and LBA hold the signature.
            let sig = p.sig.to_le_bytes();
            fis[12] = sig[0];
            fis[4] = sig[1];
            fis[5] = sig[2];
            fis[6] = sig[3];
        }
        if self.mem.write(p.fb + 0x40, &fis).is_err() {
            log::debug!("ahci: port {i}: received-FIS area outside RAM");
        }
    }

    /// A PIO Setup FIS at FB + 0x20: after a PIO data-in command the host
    /// takes the ending status from it (byte 15).
    fn write_pio_setup(&mut self, i: usize, status: u8) {
        let p = &self.ports[i];
        if p.cmd & CMD_FRE == 0 {
            return;
        }
        let mut fis = [0u8; 20];
        fis[0] = 0x5f;
        fis[1] = 0x20 | 0x40; // device to host, interrupt
        fis[2] = status;
        fis[15] = status;
        if self.mem.write(p.fb + 0x20, &fis).is_err() {
            log::debug!("ahci: port {i}: received-FIS area outside RAM");
        }
    }
}
