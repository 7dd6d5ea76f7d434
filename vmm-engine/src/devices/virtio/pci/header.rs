//! The layout of a virtio function's BAR 0 and its PCI configuration
//! space (identity, interrupt pin and line, the BAR, the MSI-X and virtio
//! vendor capabilities).

use super::super::{VIRTIO_PCI_DEVICE_BASE, VIRTIO_VENDOR};
use crate::cast;
use crate::devices::pci::PciFunction;

pub const BAR_SIZE: u64 = 0x4000;
pub(super) const COMMON: u64 = 0x0000;
pub(super) const COMMON_LEN: u64 = 0x38;
pub(super) const COMMON_BYTES: usize = cast::usize_from(COMMON_LEN);
pub(super) const ISR: u64 = 0x1000;
pub(super) const DEVCFG: u64 = 0x2000;
pub(super) const NOTIFY: u64 = 0x3000;
pub(super) const NOTIFY_MULT: u64 = 4;
pub(super) const MSIX_TABLE: u64 = 0x3800;
pub(super) const MSIX_PBA: u64 = 0x3c00;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// Where a function starts out: BAR 0 address, INTx pin (0 = INTA) and
/// line, and its index among the VM's devices (INTx sharing bookkeeping).
pub struct Placement {
    pub bar_addr: u32,
    pub intx_pin: u8,
    pub intx_line: u32,
    pub source: u32,
}

fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        super::super::TYPE_NET => (0x02, 0x00),
        super::super::TYPE_BLOCK => (0x01, 0x00),
        super::super::TYPE_CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let mut c = vec![0x09, 0, 16, cfg_type, 0, 0, 0, 0];
    // Offsets and lengths of structures inside the 16 KiB BAR.
    c.extend_from_slice(&u32::try_from(offset).unwrap_or(u32::MAX).to_le_bytes());
    c.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_le_bytes());
    if let Some(m) = extra {
        c[2] = 20;
        c.extend_from_slice(&m.to_le_bytes());
    }
    c
}

/// A virtio function's PCI configuration space: identity, interrupt pin
/// and line, the BAR, and the MSI-X and virtio vendor capabilities.
pub(super) struct Header {
    pub(super) f: PciFunction,
    /// MSI-X vectors: one per queue and one for configuration changes.
    pub(super) vectors: u16,
    /// Offset of the MSI-X capability.
    pub(super) msix_cap: usize,
}

impl Header {
    pub(super) fn new(
        ty: u32,
        place: &Placement,
        nq: usize,
        config_len: usize,
    ) -> crate::error::Result<Header> {
        let (class, sub) = class_of(ty);
        let mut f = PciFunction::new(
            VIRTIO_VENDOR,
            // Virtio device ids are below 64; 0 (0x1040) is reserved.
            VIRTIO_PCI_DEVICE_BASE + u16::try_from(ty).unwrap_or(0),
            class,
            sub,
        );
        f.cfg[0x08] = 1; // revision 1: modern only
        f.cfg[0x2c..0x2e].copy_from_slice(&VIRTIO_VENDOR.to_le_bytes());
        f.cfg[0x2e..0x30].copy_from_slice(&0x1100u16.to_le_bytes());
        // 0xff: "unknown / not connected"; IOAPIC lines are below 24.
        f.cfg[0x3c] = u8::try_from(place.intx_line).unwrap_or(0xff);
        f.cfg[0x3d] = place.intx_pin + 1; // 1 = INTA#
        f.set_mem_bar(0, BAR_SIZE, place.bar_addr);
        f.cfg[4] |= 2; // memory space on
        let vectors = u16::try_from(nq + 1)
            .map_err(|_| crate::error::Error::Unsupported("too many virtqueues".into()))?;
        let mut msix = vec![0x11, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&const { cast::const_u32(MSIX_TABLE) }.to_le_bytes()); // BIR 0
        msix.extend_from_slice(&const { cast::const_u32(MSIX_PBA) }.to_le_bytes());
        let err = || crate::error::Error::Unsupported("PCI capability space full".into());
        let msix_cap = f.add_cap(&msix).ok_or_else(err)?;
        f.wmask[msix_cap + 3] = 0xc0; // MSI-X enable, function mask
        for c in [
            vendor_cap(CAP_COMMON, COMMON, COMMON_LEN, None),
            vendor_cap(CAP_ISR, ISR, 1, None),
            vendor_cap(CAP_DEVICE, DEVCFG, config_len.max(4) as u64, None),
            vendor_cap(
                CAP_NOTIFY,
                NOTIFY,
                NOTIFY_MULT * nq as u64,
                Some(const { cast::const_u32(NOTIFY_MULT) }),
            ),
        ] {
            f.add_cap(&c).ok_or_else(err)?;
        }
        Ok(Header {
            f,
            vectors,
            msix_cap,
        })
    }
}
