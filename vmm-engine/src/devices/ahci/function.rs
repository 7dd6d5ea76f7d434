//! The controller as a PCI function (ids, ABAR, MSI capability) and the
//! interrupt sink that delivers through KVM.

use super::config::AhciConfig;
use super::hba::{Ahci, AhciIrq};
use super::regs::{ABAR_SIZE, MSI_CAP};
use crate::cast;
use crate::memory::GuestMemory;
use std::sync::Arc;

/// Interrupts through KVM: MSI messages, or the function's IOAPIC line.
pub struct KvmIrq {
    pub vm: Arc<kvm_ioctls::VmFd>,
    pub line: u32,
}

impl AhciIrq for KvmIrq {
    fn msi(&self, address: u64, data: u32) {
        let msi = kvm_bindings::kvm_msi {
            address_lo: cast::low_u32(address),
            address_hi: cast::high_u32(address),
            data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            log::debug!("ahci: KVM_SIGNAL_MSI: {e}");
        }
    }
    fn intx(&self, level: bool) {
        if let Err(e) = self.vm.set_irq_line(self.line, level) {
            log::debug!("ahci: KVM_IRQ_LINE {}: {e}", self.line);
        }
    }
}

/// The PCI function: Intel ICH8 AHCI ids as bhyve's, class SATA/AHCI 1.0,
/// ABAR as BAR 5 at `bar_addr`, an MSI capability (one vector, 64-bit),
/// INTx on `pin` routed to `line`.
pub fn function(
    cfg: AhciConfig,
    mem: GuestMemory,
    irq: Box<dyn AhciIrq>,
    bar_addr: u32,
    pin: u8,
    line: u32,
) -> crate::devices::pci::PciFunction {
    let mut f = crate::devices::pci::PciFunction::new(0x8086, 0x2821, 0x01, 0x06);
    f.cfg[0x09] = 0x01; // programming interface: AHCI 1.0
    f.cfg[0x3c] = u8::try_from(line).unwrap_or(0xff); // lines < 24; 0xff: none
    f.cfg[0x3d] = pin + 1;
    f.set_mem_bar(5, ABAR_SIZE, bar_addr);
    // The only capability: MSI, at the start of the list.
    let mut body = [0u8; 14];
    body[0] = 0x05;
    body[2] = 1 << 7; // 64-bit address, one message
    let at = f.add_cap(&body).expect("room for MSI");
    debug_assert_eq!(at, MSI_CAP);
    f.wmask[at + 2] = 0x01; // enable
    for o in at + 4..at + 14 {
        f.wmask[o] = 0xff;
    }
    f.wmask[at + 4] = 0xfc; // dword-aligned address
    f.dev = Some(Box::new(Ahci::new(cfg, mem, irq)));
    f
}
