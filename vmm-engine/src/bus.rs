//! Address buses: port I/O and MMIO ranges mapped to devices, each device
//! behind its own lock (the shape of Cloud Hypervisor's vm-device bus and
//! Firecracker's vstate bus). A bus is filled before the run and only read
//! during it, so a lookup takes no lock; a device that blocks (a UART on a
//! full pipe) stalls only the accesses to that device.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A device on a bus. `base` is the start of the range the access hit,
/// `offset` the access's distance from it; `data` is the access (its
/// length is the access size, as the guest made it).
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between a bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a range was not inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("empty or wrapping range at {0:#x}")]
    BadRange(u64),
    #[error("range at {base:#x} (+{len:#x}) overlaps the one at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// Ranges (base -> length, device), none overlapping.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Map [base, base+len) to `dev`; a device may hold several ranges.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(base))?;
        let overlap = |other: u64| BusError::Overlap { base, len, other };
        if let Some((&b, e)) = self.ranges.range(..=base).next_back() {
            if b + e.len > base {
                return Err(overlap(b));
            }
        }
        if let Some((&b, _)) = self.ranges.range(base..end).next() {
            return Err(overlap(b));
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    /// The device whose range holds `addr`, with that range's base.
    pub fn get(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((base, &e.dev))
    }

    /// Read at `addr`; false when no device holds it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.get(addr) {
            Some((base, dev)) => {
                dev.lock().read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Write at `addr`; false when no device holds it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.get(addr) {
            Some((base, dev)) => {
                dev.lock().write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Little-endian value of a 1- to 4-byte access (more bytes are ignored).
pub fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0, |v, (i, b)| v | u32::from(*b) << (8 * i))
}

/// Fill a read access with `v`, little-endian; bytes past 4 read ones.
pub fn put_le(data: &mut [u8], v: u32) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = if i < 4 { v.to_le_bytes()[i] } else { 0xff };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Remembers the last access; reads give the offset.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(crate::cast::low_u8(offset));
            self.last = Some((base, offset, Vec::new()));
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x3f8, 8).unwrap();
        for (base, len) in [
            (0x3f8, 8),
            (0x3f0, 9),
            (0x3ff, 1),
            (0x3fa, 2),
            (0x3f0, 0x20),
        ] {
            assert!(
                matches!(
                    bus.insert(probe(), base, len),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len}"
            );
        }
        assert_eq!(bus.insert(probe(), 0x10, 0), Err(BusError::BadRange(0x10)));
        assert_eq!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::BadRange(u64::MAX))
        );
        // Adjacent on both sides is fine.
        bus.insert(probe(), 0x3f0, 8).unwrap();
        bus.insert(probe(), 0x400, 1).unwrap();
    }

    #[test]
    fn lookup_finds_the_range_holding_the_address() {
        let mut bus = Bus::new();
        let (a, b) = (probe(), probe());
        bus.insert(a.clone(), 0xcf8, 8).unwrap();
        bus.insert(b.clone(), 0x70, 2).unwrap();
        // One device on two ranges.
        bus.insert(a.clone(), 0x1000, 4).unwrap();
        assert!(bus.get(0xcf7).is_none());
        assert!(bus.get(0xd00).is_none());
        assert!(bus.get(0x72).is_none());
        assert!(bus.get(0).is_none());
        assert_eq!(bus.get(0xcff).map(|(base, _)| base), Some(0xcf8));
        let mut d = [0u8; 2];
        assert!(bus.read(0xcfd, &mut d));
        assert_eq!(d, [5, 5]);
        assert!(bus.write(0x71, &[0xab]));
        assert_eq!(b.lock().last, Some((0x70, 1, vec![0xab])));
        assert!(bus.write(0x1002, &[1, 2]));
        assert_eq!(a.lock().last, Some((0x1000, 2, vec![1, 2])));
        assert!(!bus.write(0x2000, &[1]));
        assert!(!bus.read(0x2000, &mut d));
    }

    #[test]
    fn a_busy_device_does_not_block_another() {
        let mut bus = Bus::new();
        let (slow, other) = (probe(), probe());
        bus.insert(slow.clone(), 0x3f8, 8).unwrap();
        bus.insert(other.clone(), 0xcf8, 8).unwrap();
        let bus = Arc::new(bus);
        // The UART's lock is held (as by a vCPU blocked in its write).
        let held = slow.lock();
        let (tx, rx) = mpsc::channel();
        let b = bus.clone();
        let t = std::thread::spawn(move || {
            let mut d = [0u8; 4];
            b.read(0xcfc, &mut d);
            tx.send(d).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok([4; 4]));
        t.join().unwrap();
        // While an access to the held device waits for it.
        let (tx, rx) = mpsc::channel();
        let b = bus.clone();
        let t = std::thread::spawn(move || {
            b.write(0x3f8, b"x");
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(held);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(()));
        t.join().unwrap();
        assert_eq!(slow.lock().last, Some((0x3f8, 0, vec![b'x'])));
    }

    #[test]
    fn access_values_are_little_endian() {
        assert_eq!(le_value(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        assert_eq!(le_value(&[0xfe]), 0xfe);
        let mut d = [0u8; 6];
        put_le(&mut d, 0x1234_5678);
        assert_eq!(d, [0x78, 0x56, 0x34, 0x12, 0xff, 0xff]);
    }
}
