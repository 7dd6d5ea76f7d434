//! The HBA: generic and port register reads and writes, and interrupts
//! (MSI or INTx) as ports raise events.

use super::config::AhciConfig;
use super::port::Port;
use super::regs::*;
use super::transfer::ST_READY;
use crate::cast;
use crate::memory::GuestMemory;

/// How the controller interrupts: MSI messages or the INTx line. Tests
/// record them; the platform sends them to KVM.
pub trait AhciIrq: Send {
    fn msi(&self, address: u64, data: u32);
    fn intx(&self, level: bool);
}

/// Everything a guest's MSI capability says, as last written.
#[derive(Default, Clone, Copy)]
struct Msi {
    enabled: bool,
    address: u64,
    data: u32,
}

/// An AHCI controller: its generic registers, ports and interrupt state.
pub struct Ahci {
    pub(super) mem: GuestMemory,
    irq: Box<dyn AhciIrq>,
    pub(super) ports: Vec<Port>,
    ghc: u32,
    is: u32,
    msi: Msi,
    intx_disabled: bool,
    intx_level: bool,
}

impl Ahci {
    pub fn new(cfg: AhciConfig, mem: GuestMemory, irq: Box<dyn AhciIrq>) -> Ahci {
        Ahci {
            mem,
            irq,
            ports: cfg.ports.into_iter().map(Port::new).collect(),
            ghc: GHC_AE,
            is: 0,
            msi: Msi::default(),
            intx_disabled: false,
            intx_level: false,
        }
    }

    fn cap(&self) -> u32 {
        // 64-bit addressing, AHCI only, 3 Gb/s, 32 slots, N ports.
        // NP is ports - 1: 1 to MAX_PORTS (32) ports, so 0 to 31.
        let np = u32::try_from(self.ports.len() - 1).unwrap_or(31);
        (1 << 31) | (1 << 18) | (2 << 20) | ((SLOTS - 1) << 8) | np
    }

    /// The guest changed the configuration space: MSI and INTx disable.
    pub fn config_written(&mut self, cfg: &[u8; 256]) {
        let rd16 = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
        let rd32 = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().expect("4 bytes"));
        self.intx_disabled = rd16(4) & (1 << 10) != 0;
        self.msi = Msi {
            enabled: rd16(MSI_CAP + 2) & 1 != 0,
            address: u64::from(rd32(MSI_CAP + 4)) | (u64::from(rd32(MSI_CAP + 8)) << 32),
            data: u32::from(rd16(MSI_CAP + 12)),
        };
        self.update_intx();
    }

    fn update_intx(&mut self) {
        let level =
            !self.msi.enabled && !self.intx_disabled && self.ghc & GHC_IE != 0 && self.is != 0;
        if level != self.intx_level {
            self.intx_level = level;
            self.irq.intx(level);
        }
    }

    /// Port `i` raised `bits` in PxIS: propagate to IS and interrupt.
    pub(super) fn port_event(&mut self, i: usize, bits: u32) {
        let p = &mut self.ports[i];
        p.is |= bits;
        if p.is & p.ie == 0 {
            return;
        }
        let new = self.is & (1 << i) == 0;
        self.is |= 1 << i;
        if self.ghc & GHC_IE == 0 {
            return;
        }
        if self.msi.enabled {
            // An edge per event that raised the port's summary bit.
            if new || bits != 0 {
                self.irq.msi(self.msi.address, self.msi.data);
            }
        } else {
            self.update_intx();
        }
    }

    /// A read of `data.len()` bytes at `off` in the ABAR.
    pub fn read(&mut self, off: u64, data: &mut [u8]) {
        let v = if data.len() == 4 && off.is_multiple_of(4) {
            self.reg_read(off)
        } else {
            // Registers are dwords; narrower reads take their part.
            let d = self.reg_read(off & !3);
            d >> (8 * (off & 3))
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = if i < 4 { v.to_le_bytes()[i] } else { 0 };
        }
    }

    fn reg_read(&self, off: u64) -> u32 {
        match off {
            CAP => self.cap(),
            GHC => self.ghc,
            IS => self.is,
            // One bit per port, at most 32 ports.
            PI => cast::low_u32((1u64 << self.ports.len()).wrapping_sub(1)),
            VS => 0x0001_0300,
            o if o >= PORT_BASE => {
                let i = ((o - PORT_BASE) / PORT_STRIDE) as usize;
                let Some(p) = self.ports.get(i) else { return 0 };
                match (o - PORT_BASE) % PORT_STRIDE {
                    P_CLB => cast::low_u32(p.clb),
                    P_CLBU => cast::high_u32(p.clb),
                    P_FB => cast::low_u32(p.fb),
                    P_FBU => cast::high_u32(p.fb),
                    P_IS => p.is,
                    P_IE => p.ie,
                    P_CMD => p.cmd,
                    P_TFD => p.tfd,
                    P_SIG => p.sig,
                    P_SSTS => p.ssts,
                    P_SCTL => p.sctl,
                    P_SERR => p.serr,
                    P_SACT => p.sact,
                    P_CI => p.ci,
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    /// A write at `off` in the ABAR; registers take dword writes (others
    /// are ignored, as a real HBA need not accept them).
    pub fn write(&mut self, off: u64, data: &[u8]) {
        if data.len() != 4 || !off.is_multiple_of(4) {
            log::debug!("ahci: ignored {}-byte write at {off:#x}", data.len());
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        match off {
            GHC => {
                if v & GHC_HR != 0 {
                    for p in &mut self.ports {
                        p.reset();
                        p.is = 0;
                        p.ie = 0;
                        p.cmd &= !(CMD_ST | CMD_CR | CMD_FRE | CMD_FR);
                    }
                    self.is = 0;
                    self.ghc = GHC_AE;
                } else {
                    self.ghc = GHC_AE | (v & GHC_IE);
                }
                self.update_intx();
            }
            IS => {
                self.is &= !v;
                // A port whose enabled events are still set keeps its bit.
                for (i, p) in self.ports.iter().enumerate() {
                    if p.is & p.ie != 0 {
                        self.is |= 1 << i;
                    }
                }
                self.update_intx();
            }
            o if o >= PORT_BASE => {
                let i = ((o - PORT_BASE) / PORT_STRIDE) as usize;
                if i < self.ports.len() {
                    self.port_write(i, (o - PORT_BASE) % PORT_STRIDE, v);
                }
            }
            _ => {}
        }
    }

    fn port_write(&mut self, i: usize, reg: u64, v: u32) {
        let p = &mut self.ports[i];
        match reg {
            P_CLB => p.clb = (p.clb & !0xffff_ffff) | u64::from(v & !0x3ff),
            P_CLBU => p.clb = (p.clb & 0xffff_ffff) | (u64::from(v) << 32),
            P_FB => p.fb = (p.fb & !0xffff_ffff) | u64::from(v & !0xff),
            P_FBU => p.fb = (p.fb & 0xffff_ffff) | (u64::from(v) << 32),
            P_IS => {
                p.is &= !v;
                self.update_intx();
            }
            P_IE => {
                p.ie = v;
                self.port_event(i, 0);
            }
            P_CMD => {
                let keep_ro = p.cmd & CMD_ATAPI;
                let mut c = (v & (CMD_ST | CMD_SUD | CMD_POD | CMD_FRE | 0xf000_0000)) | keep_ro;
                if v & CMD_CLO != 0 {
                    p.tfd &= !u32::from(ST_BSY | ST_DRQ);
                }
                if c & CMD_FRE != 0 {
                    c |= CMD_FR;
                }
                if c & CMD_ST != 0 {
                    c |= CMD_CR;
                } else {
                    // Stopping the port drops every outstanding command.
                    p.ci = 0;
                    p.sact = 0;
                }
                let starting_fre = c & CMD_FRE != 0 && p.cmd & CMD_FRE == 0;
                p.cmd = c;
                if starting_fre {
                    // The device's signature FIS, as after a reset.
                    self.write_d2h(i, ST_READY, 0, true);
                }
                self.run_port(i);
            }
            P_SCTL => {
                let det = v & 0xf;
                p.sctl = v;
                if det == 1 {
                    // COMRESET held: no link.
                    p.ssts = 0;
                    p.tfd = u32::from(ST_BSY);
                } else if det == 0 && p.ssts == 0 {
                    p.reset();
                    if p.cmd & CMD_FRE != 0 {
                        self.write_d2h(i, ST_READY, 0, true);
                    }
                }
            }
            P_SERR => p.serr &= !v,
            P_SACT => p.sact |= v,
            P_CI => {
                p.ci |= v;
                self.run_port(i);
            }
            _ => {}
        }
    }
}

impl crate::devices::pci::PciDevice for Ahci {
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
        if bar == 5 {
            self.read(off, data);
        } else {
            data.fill(0xff);
        }
    }
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
        if bar == 5 {
            self.write(off, data);
        }
    }
    fn config_written(&mut self, cfg: &[u8; 256]) {
        Ahci::config_written(self, cfg);
    }
}
