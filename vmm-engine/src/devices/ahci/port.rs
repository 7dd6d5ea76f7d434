//! One port's registers and its drive, and what a COMRESET puts back.

use super::ata::Disk;
use super::regs::{BOUNCE, CMD_ATAPI, CMD_POD, CMD_SUD};
use super::transfer::{PortConfig, ST_READY};

/// A port: its registers as the guest sees them, its drive and its bounce
/// buffer.
pub(super) struct Port {
    pub(super) disk: Disk,
    pub(super) clb: u64,
    pub(super) fb: u64,
    pub(super) is: u32,
    pub(super) ie: u32,
    pub(super) cmd: u32,
    pub(super) tfd: u32,
    pub(super) sig: u32,
    pub(super) ssts: u32,
    pub(super) sctl: u32,
    pub(super) serr: u32,
    pub(super) sact: u32,
    pub(super) ci: u32,
    pub(super) bounce: Vec<u8>,
}

impl Port {
    pub(super) fn new(cfg: PortConfig) -> Port {
        let cd = cfg.cd;
        let mut p = Port {
            disk: Disk::new(cfg),
            clb: 0,
            fb: 0,
            is: 0,
            ie: 0,
            cmd: CMD_SUD | CMD_POD,
            tfd: 0,
            sig: 0,
            ssts: 0,
            sctl: 0,
            serr: 0,
            sact: 0,
            ci: 0,
            bounce: vec![0; BOUNCE],
        };
        if cd {
            p.cmd |= CMD_ATAPI;
        }
        p.reset();
        p
    }

    /// Link up with the device's signature, as after a COMRESET.
    pub(super) fn reset(&mut self) {
        self.ssts = 0x123; // device present, Gen 1, active
        self.sig = if self.disk.cd {
            0xeb14_0101
        } else {
            0x0000_0101
        };
        self.tfd = u32::from(ST_READY);
        self.serr = 0;
        self.sact = 0;
        self.ci = 0;
    }
}
