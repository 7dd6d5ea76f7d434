//! An AHCI 1.3 SATA controller (bhyve's `ahci`, `ahci-hd`, `ahci-cd`): up
//! to 32 ports, each a disk (ATA) or a CD/DVD drive (ATAPI, read-only
//! media), behind a 32-bit memory BAR 5 (ABAR), interrupting by MSI or INTx.
//! Enough for Linux's `ahci` driver and UEFI firmware: no NCQ, no port
//! multiplier, no hot plug.
//!
//! Everything here is guest controlled: register offsets and values, the
//! command list and FIS addresses, the command tables and their PRDTs. A
//! command is carried out when the guest sets its bit in PxCI, on the
//! writing vCPU: its header and table are read from guest RAM with bounds
//! checks, the transfer length is the command's (at most 32 MiB), the PRDT
//! walk stops at the header's PRDTL entries or when the transfer is done,
//! and data moves through one buffer per port of [`BOUNCE`] bytes, allocated
//! with the device. Malformed commands complete with an ATA error (task
//! file error), never by stopping the VM.

pub mod ata;

use crate::cast;
use crate::memory::GuestMemory;
use ata::{Disk, Outcome, ST_ERR, ST_READY};
pub use ata::{PortConfig, Prdt};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Size of the ABAR (BAR 5): generic registers and 32 ports of 0x80 bytes.
pub const ABAR_SIZE: u64 = 0x2000;
/// Where the port registers start, and each port's stride.
const PORT_BASE: u64 = 0x100;
const PORT_STRIDE: u64 = 0x80;
/// Command slots per port (CAP.NCS + 1).
pub const SLOTS: u32 = 32;
pub const MAX_PORTS: usize = 32;
/// Data moves between the backing file and guest RAM through this many
/// bytes at a time (per port, allocated once).
pub const BOUNCE: usize = 128 << 10;
/// Most PRDT entries a command may name (PRDTL is 16 bits).
pub const MAX_PRDT: usize = 65535;

// Generic host control.
const CAP: u64 = 0x00;
const GHC: u64 = 0x04;
const IS: u64 = 0x08;
const PI: u64 = 0x0c;
const VS: u64 = 0x10;
const GHC_HR: u32 = 1 << 0;
const GHC_IE: u32 = 1 << 1;
const GHC_AE: u32 = 1 << 31;

// Port registers (offsets inside a port).
const P_CLB: u64 = 0x00;
const P_CLBU: u64 = 0x04;
const P_FB: u64 = 0x08;
const P_FBU: u64 = 0x0c;
const P_IS: u64 = 0x10;
const P_IE: u64 = 0x14;
const P_CMD: u64 = 0x18;
const P_TFD: u64 = 0x20;
const P_SIG: u64 = 0x24;
const P_SSTS: u64 = 0x28;
const P_SCTL: u64 = 0x2c;
const P_SERR: u64 = 0x30;
const P_SACT: u64 = 0x34;
const P_CI: u64 = 0x38;

const CMD_ST: u32 = 1 << 0;
const CMD_SUD: u32 = 1 << 1;
const CMD_POD: u32 = 1 << 2;
const CMD_CLO: u32 = 1 << 3;
const CMD_FRE: u32 = 1 << 4;
const CMD_FR: u32 = 1 << 14;
const CMD_CR: u32 = 1 << 15;
const CMD_ATAPI: u32 = 1 << 24;

const IS_DHRS: u32 = 1 << 0;
const IS_PSS: u32 = 1 << 1;
const IS_TFES: u32 = 1 << 30;

/// ATA status: busy; data request.
const ST_BSY: u8 = 0x80;
const ST_DRQ: u8 = 0x08;

/// The ports of one controller, in port order.
#[derive(Debug, Clone)]
pub struct AhciConfig {
    pub ports: Vec<PortConfig>,
}

fn bad(msg: String) -> crate::error::Error {
    crate::error::Error::InvalidCommand(msg)
}

/// One port's options as given, before its descriptor is taken.
struct PortSpec {
    cd: bool,
    fd: Option<i32>,
    ro: bool,
    sector_size: (u32, u32),
    serial: Option<String>,
    nmrr: u16,
}

impl PortSpec {
    fn new(cd: bool) -> PortSpec {
        PortSpec {
            cd,
            fd: None,
            ro: cd,
            sector_size: (512, 512),
            serial: None,
            nmrr: 0,
        }
    }

    /// Apply option `o` (`k[=v]`) of `emulation` to this port.
    fn set(
        &mut self,
        emulation: &str,
        o: &str,
        k: &str,
        v: Option<&str>,
    ) -> crate::error::Result<()> {
        match (k, v) {
            ("fd", Some(n)) => {
                self.fd = Some(
                    n.parse::<i32>()
                        .ok()
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| bad(format!("{emulation}: bad descriptor '{n}'")))?,
                )
            }
            ("ro", None) => self.ro = true,
            ("sectorsize", Some(s)) => {
                let (l, ph) = s.split_once('/').unwrap_or((s, s));
                let ok = |x: &str| {
                    x.parse::<u32>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (512..=32768).contains(n))
                };
                match (ok(l), ok(ph)) {
                    (Some(l), Some(ph)) if ph >= l => self.sector_size = (l, ph),
                    _ => return Err(bad(format!("{emulation}: bad sectorsize '{s}'"))),
                }
            }
            ("ser", Some(s)) => {
                if s.len() > 20 || !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad(format!("{emulation}: bad serial '{s}'")));
                }
                self.serial = Some(s.to_string());
            }
            ("nmrr", Some(s)) => {
                self.nmrr = s
                    .parse()
                    .map_err(|_| bad(format!("{emulation}: bad nmrr '{s}'")))?
            }
            // Host caching choices of bhyve's block interface.
            ("nocache" | "direct" | "sync" | "nodelete", None) => {
                log::warn!("{emulation}: option '{k}' ignored")
            }
            _ => return Err(bad(format!("{emulation}: unknown option '{o}'"))),
        }
        Ok(())
    }

    /// Take the port's descriptor: port `i` of the controller.
    fn open(
        self,
        emulation: &str,
        i: usize,
        take: &mut dyn FnMut(i32) -> crate::error::Result<OwnedFd>,
    ) -> crate::error::Result<PortConfig> {
        let n = self
            .fd
            .ok_or_else(|| bad(format!("{emulation}: port {i}: fd=N required")))?;
        let file = take(n)?;
        let ro = self.ro || crate::files::opened_read_only(&file);
        Ok(PortConfig {
            file: Arc::new(file),
            cd: self.cd,
            ro,
            sector_size: if self.cd {
                (2048, 2048)
            } else {
                self.sector_size
            },
            serial: self.serial.unwrap_or_else(|| format!("BHYVE-{i:04}")),
            nmrr: self.nmrr,
        })
    }
}

impl AhciConfig {
    /// `device S ahci port=hd,fd=N[,ro][,sectorsize=L[/P]][,ser=S][,nmrr=R],port=cd,fd=M...`;
    /// `ahci-hd` and `ahci-cd` take one port's options without `port=`.
    /// Options are checked before descriptors are taken.
    pub fn configure(
        emulation: &str,
        options: &[String],
        take: &mut dyn FnMut(i32) -> crate::error::Result<OwnedFd>,
    ) -> crate::error::Result<AhciConfig> {
        let mut specs: Vec<PortSpec> = match emulation {
            "ahci-hd" => vec![PortSpec::new(false)],
            "ahci-cd" => vec![PortSpec::new(true)],
            _ => Vec::new(),
        };
        for o in options {
            let (k, v) = match o.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (o.as_str(), None),
            };
            if k == "port" {
                if emulation != "ahci" {
                    return Err(bad(format!("{emulation}: one port, no port= option")));
                }
                let cd = match v {
                    Some("hd") => false,
                    Some("cd") => true,
                    _ => return Err(bad(format!("ahci: bad port type '{o}'"))),
                };
                if specs.len() >= MAX_PORTS {
                    return Err(bad(format!("ahci: at most {MAX_PORTS} ports")));
                }
                specs.push(PortSpec::new(cd));
                continue;
            }
            let Some(p) = specs.last_mut() else {
                return Err(bad(format!("ahci: option '{o}' before any port=")));
            };
            p.set(emulation, o, k, v)?;
        }
        if specs.is_empty() {
            return Err(bad(format!("{emulation}: no port")));
        }
        let ports = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.open(emulation, i, take))
            .collect::<crate::error::Result<Vec<_>>>()?;
        Ok(AhciConfig { ports })
    }
}

/// How the controller interrupts: MSI messages or the INTx line. Tests
/// record them; the platform sends them to KVM.
pub trait AhciIrq: Send {
    fn msi(&self, address: u64, data: u32);
    fn intx(&self, level: bool);
}

struct Port {
    disk: Disk,
    clb: u64,
    fb: u64,
    is: u32,
    ie: u32,
    cmd: u32,
    tfd: u32,
    sig: u32,
    ssts: u32,
    sctl: u32,
    serr: u32,
    sact: u32,
    ci: u32,
    bounce: Vec<u8>,
}

impl Port {
    fn new(cfg: PortConfig) -> Port {
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
    fn reset(&mut self) {
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

/// Everything a guest's MSI capability says, as last written.
#[derive(Default, Clone, Copy)]
struct Msi {
    enabled: bool,
    address: u64,
    data: u32,
}

pub struct Ahci {
    mem: GuestMemory,
    irq: Box<dyn AhciIrq>,
    ports: Vec<Port>,
    ghc: u32,
    is: u32,
    msi: Msi,
    intx_disabled: bool,
    intx_level: bool,
}

/// Offset of the MSI capability in the function's configuration space.
pub const MSI_CAP: usize = 0x40;

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
    fn port_event(&mut self, i: usize, bits: u32) {
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

    /// Carry out every issued command of a started port, lowest slot first.
    /// Each command completes before this returns (at most 32 of them).
    fn run_port(&mut self, i: usize) {
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
    fn write_d2h(&mut self, i: usize, status: u8, error: u8, signature: bool) {
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

#[cfg(test)]
mod tests;
