//! ACPI fixed hardware at bhyve's addresses: PM1a event block 0x400
//! (status, enable), PM1a control 0x404, PM timer 0x408; the SCI is IRQ 9.

use crate::events::{ExitReason, VmEvents};
use std::time::Instant;

pub const PM1A_EVT: u16 = 0x400;
pub const PM1A_CNT: u16 = 0x404;
pub const PM_TMR: u16 = 0x408;
pub const SCI_IRQ: u32 = 9;
/// SLP_TYP value for S5 in our DSDT's \_S5 package.
pub const SLP_TYP_S5: u16 = 5;

const PWRBTN: u16 = 1 << 8;
const SLP_EN: u16 = 1 << 13;
const SCI_EN: u16 = 1;
/// ACPI PM timer frequency.
const PM_TIMER_HZ: u128 = 3_579_545;

pub struct Pm {
    sts: u16,
    en: u16,
    cnt: u16,
    pub sci_level: bool,
    events: VmEvents,
}

impl Pm {
    /// A PM block whose S5 sleep requests go to `events`.
    pub fn new(events: VmEvents) -> Pm {
        // SCI_EN set: there is no SMI command port, the OS owns ACPI from boot.
        Pm {
            sts: 0,
            en: 0,
            cnt: SCI_EN,
            sci_level: false,
            events,
        }
    }

    pub fn press_power_button(&mut self) {
        self.sts |= PWRBTN;
    }

    /// Level of the SCI line.
    pub fn sci(&self) -> bool {
        self.cnt & SCI_EN != 0 && self.sts & self.en & PWRBTN != 0
    }

    /// Read `size` bytes starting at `port` inside 0x400..0x40c.
    pub fn read(&self, port: u16, size: usize, started: Instant) -> u32 {
        let tmr = ((started.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) & 0xff_ffff) as u32;
        let mut v = 0u32;
        // Byte lane k is port + k; each register's byte is its little-endian
        // byte at p - (the register's port).
        for (k, p) in (port..).take(size).enumerate() {
            let b = match p {
                0x400 | 0x401 => self.sts.to_le_bytes()[usize::from(p - 0x400)],
                0x402 | 0x403 => self.en.to_le_bytes()[usize::from(p - 0x402)],
                0x404 | 0x405 => self.cnt.to_le_bytes()[usize::from(p - 0x404)],
                0x408..=0x40b => tmr.to_le_bytes()[usize::from(p - 0x408)],
                _ => 0xff,
            };
            v |= u32::from(b) << (8 * k);
        }
        v
    }

    /// Write inside 0x400..0x408; a sleep request for S5 powers off
    /// (reported to the events handle).
    pub fn write(&mut self, port: u16, size: usize, v: u32) {
        let mut touched_cnt = false;
        for (k, p) in (port..).take(size).enumerate() {
            // Port accesses are 1, 2 or 4 bytes wide.
            let b = u16::from(v.to_le_bytes().get(k).copied().unwrap_or(0));
            match p {
                // Status bits are write-one-to-clear.
                0x400 | 0x401 => self.sts &= !(b << (8 * (p - 0x400))),
                0x402 | 0x403 => {
                    let sh = 8 * (p - 0x402);
                    self.en = (self.en & !(0xff << sh)) | (b << sh);
                }
                0x404 | 0x405 => {
                    let sh = 8 * (p - 0x404);
                    self.cnt = (self.cnt & !(0xff << sh)) | (b << sh);
                    touched_cnt = true;
                }
                _ => {}
            }
        }
        if touched_cnt && self.cnt & SLP_EN != 0 {
            // SLP_EN is write-only: it triggers and reads back as 0.
            self.cnt &= !SLP_EN;
            if (self.cnt >> 10) & 7 == SLP_TYP_S5 {
                self.events.request_stop(ExitReason::PowerOff);
                return;
            }
            log::debug!("ignored sleep request SLP_TYP={}", (self.cnt >> 10) & 7);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let events = VmEvents::new();
        let mut pm = Pm::new(events.clone());
        pm.write(0x404, 2, (5 << 10) | (1 << 13));
        assert_eq!(events.take_stop(), Some(ExitReason::PowerOff));
        pm.write(0x404, 2, (3 << 10) | (1 << 13));
        assert_eq!(events.take_stop(), None);
        // Byte writes: the high byte carries SLP_EN and SLP_TYP.
        pm.write(0x405, 1, 0x34);
        assert_eq!(events.take_stop(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn power_button_raises_sci() {
        let mut pm = Pm::new(VmEvents::new());
        pm.press_power_button();
        assert!(!pm.sci());
        pm.write(0x402, 2, 0x100);
        assert!(pm.sci());
        pm.write(0x400, 2, 0x100);
        assert!(!pm.sci());
    }
}
