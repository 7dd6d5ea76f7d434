//! The common configuration structure: feature negotiation, queue
//! set-up, device status (DRIVER_OK activates, 0 resets).

use super::super::irq::NO_VECTOR;
use super::super::{F_VERSION_1, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET};
use super::header::COMMON_BYTES;
use super::VirtioPci;
use crate::cast;

impl VirtioPci {
    pub(super) fn common_snapshot(&self) -> [u8; COMMON_BYTES] {
        let mut b = [0u8; COMMON_BYTES];
        let mut put = |off: usize, v: u64, n: usize| {
            b[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
        };
        let half = |x: u64, sel: u32| match sel {
            0 => x & 0xffff_ffff,
            1 => x >> 32,
            _ => 0,
        };
        put(0x00, u64::from(self.dfsel), 4);
        put(0x04, half(self.offered, self.dfsel), 4);
        put(0x08, u64::from(self.gfsel), 4);
        put(0x0c, half(self.driver_features, self.gfsel), 4);
        put(0x10, u64::from(self.irq.config_vector()), 2);
        put(0x12, self.queues.len() as u64, 2);
        let mut status = self.status;
        if self.irq.broken() {
            status |= S_NEEDS_RESET;
        }
        put(0x14, u64::from(status), 1);
        put(0x15, 0, 1);
        put(0x16, u64::from(self.queue_sel), 2);
        let q = usize::from(self.queue_sel);
        if let Some(c) = self.queues.get(q) {
            put(0x18, u64::from(c.size), 2);
            put(0x1a, u64::from(self.irq.queue_vector(q)), 2);
            put(0x1c, u64::from(c.enabled), 2);
            put(0x1e, q as u64, 2);
            put(0x20, c.desc, 8);
            put(0x28, c.avail, 8);
            put(0x30, c.used, 8);
        }
        b
    }

    pub(super) fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut v = 0u64;
        for (i, x) in data.iter().enumerate().take(8) {
            v |= u64::from(*x) << (8 * i);
        }
        let live = self.status & S_DRIVER_OK != 0;
        let q = usize::from(self.queue_sel);
        let vectors = self.irq.vectors() as u64;
        let vector = |v: u64| {
            if v < vectors {
                u16::try_from(v).unwrap_or(NO_VECTOR)
            } else {
                NO_VECTOR
            }
        };
        let set_half = |x: &mut u64, v: u64, high: bool| {
            let v = v & 0xffff_ffff;
            *x = if high {
                (*x & 0xffff_ffff) | (v << 32)
            } else {
                (*x & !0xffff_ffff) | v
            };
        };
        match (off, data.len()) {
            (0x00, 4) => self.dfsel = cast::low_u32(v),
            (0x08, 4) => self.gfsel = cast::low_u32(v),
            (0x0c, 4) if self.status & S_FEATURES_OK == 0 => match self.gfsel {
                0 => set_half(&mut self.driver_features, v, false),
                1 => set_half(&mut self.driver_features, v, true),
                _ => {}
            },
            (0x10, 2) => self.irq.set_config_vector(vector(v)),
            (0x14, 1) => self.status_write(cast::low_u8(v)),
            (0x16, 2) => self.queue_sel = cast::low_u16(v),
            _ if live || q >= self.queues.len() => {
                log::debug!("{}: ignored common write {off:#x}", self.name);
            }
            (0x18, 2) => self.queues[q].size = cast::low_u16(v),
            (0x1a, 2) => self.irq.set_queue_vector(q, vector(v)),
            (0x1c, 2) => self.queues[q].enabled |= v == 1,
            (0x20..=0x37, 4 | 8) if off.is_multiple_of(4) => {
                let c = &mut self.queues[q];
                let field = match (off - 0x20) / 8 {
                    0 => &mut c.desc,
                    1 => &mut c.avail,
                    _ => &mut c.used,
                };
                if data.len() == 8 {
                    *field = v;
                } else {
                    set_half(field, v, off % 8 == 4);
                }
            }
            _ => log::debug!(
                "{}: ignored common write {off:#x} size {}",
                self.name,
                data.len()
            ),
        }
    }

    fn status_write(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v | old; // bits are only ever set until a reset
        if new & S_FEATURES_OK != 0 && old & S_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.offered == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                log::debug!(
                    "{}: refused features {:#x} (offered {:#x})",
                    self.name,
                    self.driver_features,
                    self.offered
                );
                new &= !S_FEATURES_OK;
            }
        }
        self.status = new;
        if new & S_DRIVER_OK != 0 && old & S_DRIVER_OK == 0 {
            if let Err(why) = self.activate() {
                log::warn!("{}: cannot start: {why}", self.name);
                self.irq.needs_reset();
            }
        }
    }
}
