//! Firmware tables for the platform: ACPI (RSDP, XSDT, FADT + FACS, MADT,
//! DSDT) and, unless turned off, an Intel MP table. They describe the PM1a
//! blocks the `pm` device emulates (an ACPI OS powers off through port 0x404),
//! every vCPU (Linux takes CPUs from the MADT: without one only one CPU comes
//! up), the PCI root bridge with its windows and INTx routing (x86 Linux with
//! ACPI scans PCI only below an ACPI root bridge), the RTC and the COM ports.
//! The MP table serves OSes or command lines that do not use ACPI for
//! interrupt routing (`pci=noacpi`, `acpi=off`).

use crate::cast;
use crate::devices::rtc::{CENTURY, RTC_INDEX};
use crate::devices::{
    intx_route, COM_PORTS, ECAM_BASE, ECAM_SIZE, PCI_MMIO_BASE, PM1A_CNT, PM1A_EVT, PM_TMR,
    RESET_PORT, SCI_IRQ,
};
use crate::error::Result;
use crate::memory::GuestMemory;
use acpi_tables::{aml, Aml};

/// Where the RSDP goes: inside the 0xe0000..0xfffff BIOS area OSes scan.
pub const RSDP_ADDR: u64 = 0xf_0000;
/// MP floating pointer: in the BIOS area too, 16-byte aligned.
const MPFP_ADDR: u64 = 0xf_0030;
const XSDT_ADDR: u64 = 0xf_0040;
const FADT_ADDR: u64 = 0xf_0100;
const FACS_ADDR: u64 = 0xf_0200;
const MADT_ADDR: u64 = 0xf_0400;
const MPC_ADDR: u64 = 0xf_1000;
const MCFG_ADDR: u64 = 0xf_0d00;
const DSDT_ADDR: u64 = 0xf_3000;
/// End of the area the tables use (sizes for 255 vCPUs are checked in the tests).
pub const ACPI_END: u64 = 0xf_6000;
/// Top of the 32-bit PCI memory window: the ECAM window follows.
const PCI_MMIO_END: u64 = ECAM_BASE - 1;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

const OEM_ID: &[u8; 6] = b"VMMFS ";
const OEM_TABLE: &[u8; 8] = b"VMMENGIN";

/// The 32-bit forms of the PCI windows (below 4 GiB), checked at compile time.
const PCI_MMIO_BASE32: u32 = cast::const_u32(PCI_MMIO_BASE);
const PCI_MMIO_END32: u32 = cast::const_u32(PCI_MMIO_END);
const ECAM_BASE32: u32 = cast::const_u32(ECAM_BASE);
const ECAM_SIZE32: u32 = cast::const_u32(ECAM_SIZE);
/// The last bus number the ECAM window covers (1 MiB per bus).
const ECAM_LAST_BUS: u8 = cast::const_u8((ECAM_SIZE >> 20) - 1);
/// The SCI's ISA IRQ in the FADT's 16-bit and the MADT's 8-bit fields.
const SCI_IRQ16: u16 = cast::const_u16(SCI_IRQ as u64);
const SCI_IRQ8: u8 = cast::const_u8(SCI_IRQ as u64);

/// A length or offset inside tables we build ourselves, for a 32-bit field.
/// They are a few KiB at most (everything must fit below ACPI_END or in the
/// fw_cfg blob), so the fallback is never taken.
fn small_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A table under construction: standard 36-byte header, then the body.
struct Table(Vec<u8>);

impl Table {
    fn new(sig: &[u8; 4], revision: u8) -> Table {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(sig);
        v.extend_from_slice(&[0; 4]); // length, patched in finish
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(OEM_ID);
        v.extend_from_slice(OEM_TABLE);
        v.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        v.extend_from_slice(b"VMME"); // creator id
        v.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Table(v)
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u16(&mut self, x: u16) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// Generic Address Structure for an I/O port register.
    fn gas_io(&mut self, bits: u8, port: u16) -> &mut Self {
        let access = match bits {
            8 => 1,
            16 => 2,
            _ => 3,
        };
        self.u8(1).u8(bits).u8(0).u8(access).u64(u64::from(port))
    }
    fn finish(mut self) -> Vec<u8> {
        let len = small_u32(self.0.len());
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// FADT offsets of the FACS and DSDT pointers (32-bit, then 64-bit).
const FADT_FACS32: usize = 36;
const FADT_DSDT32: usize = 40;
const FADT_FACS64: usize = 132;
const FADT_DSDT64: usize = 140;

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut t = Table::new(b"FACP", 4);
    // The 32-bit pointer fields; ours are below 1 MiB, or offsets into the
    // loader blob. 0 (never taken) defers to the 64-bit fields below.
    t.u32(u32::try_from(facs).unwrap_or(0))
        .u32(u32::try_from(dsdt).unwrap_or(0))
        .u8(0) // reserved (INT_MODEL)
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ16)
        .u32(0) // SMI_CMD: none, ACPI is always enabled
        .u8(0)
        .u8(0)
        .u8(0) // S4BIOS_REQ
        .u8(0) // PSTATE_CNT
        .u32(u32::from(PM1A_EVT))
        .u32(0)
        .u32(u32::from(PM1A_CNT))
        .u32(0)
        .u32(0) // PM2
        .u32(u32::from(PM_TMR))
        .u32(0) // GPE0
        .u32(0) // GPE1
        .u8(4) // PM1_EVT_LEN
        .u8(2) // PM1_CNT_LEN
        .u8(0)
        .u8(4) // PM_TMR_LEN
        .u8(0)
        .u8(0)
        .u8(0) // GPE1_BASE
        .u8(0) // CST_CNT
        .u16(0xfff) // P_LVL2_LAT: C2 unsupported
        .u16(0xffff) // P_LVL3_LAT: C3 unsupported
        .u16(0)
        .u16(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0) // DAY_ALRM, MON_ALRM
        .u8(CENTURY) // CENTURY (CMOS index)
        // IAPC_BOOT_ARCH: legacy devices, and no 8042: Linux then skips the
        // PS/2 probe (2.5 s and "Can't read CTR" against a missing one).
        .u16(0x1)
        .u8(0)
        // Flags: WBINVD, PROC_C1, SLP_BUTTON (none), TMR_VAL_EXT, RESET_REG_SUP.
        .u32((1 << 0) | (1 << 2) | (1 << 5) | (1 << 8) | (1 << 10))
        .gas_io(8, RESET_PORT)
        .u8(0x6) // RESET_VALUE
        .u16(0) // ARM boot arch
        .u8(0) // FADT minor version
        .u64(facs)
        .u64(dsdt)
        .gas_io(32, PM1A_EVT)
        .bytes(&[0; 12])
        .gas_io(16, PM1A_CNT)
        .bytes(&[0; 12])
        .bytes(&[0; 12]) // PM2
        .gas_io(32, PM_TMR)
        .bytes(&[0; 12]) // GPE0
        .bytes(&[0; 12]); // GPE1
    t.finish()
}

fn facs() -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[0..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&64u32.to_le_bytes());
    v[32] = 2; // version
    v
}

/// A PNP device with one I/O range and one ISA interrupt.
fn isa_device(name: &str, hid: &str, uid: u8, port: u16, len: u8, irq: u32) -> Raw {
    encode(&aml::Device::new(
        name.into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new(hid)),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(port, port, 1, len),
                    &aml::Interrupt::new(true, true, false, false, irq),
                ]),
            ),
        ],
    ))
}

/// AML already encoded: the crate's builders borrow their children, so
/// parts are encoded as they are made and nested as bytes.
struct Raw(Vec<u8>);

fn encode(a: &dyn Aml) -> Raw {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    Raw(v)
}

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in &self.0 {
            sink.byte(*b);
        }
    }
}

/// `coms`: which of COM1-COM4 the guest has.
fn dsdt(coms: [bool; 4]) -> Vec<u8> {
    let mut t = Table::new(b"DSDT", 2);
    let mut body = Vec::new();
    // SLP_TYP 5 for the PM1a control: S5.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &5u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let pci0 = pci_root_bridge();
    let mbrs = motherboard_resources();
    let rtc = isa_device("RTC_", "PNP0B00", 0, RTC_INDEX, 2, 8);
    let com: Vec<Raw> = COM_PORTS
        .iter()
        .enumerate()
        .filter(|(i, _)| coms[*i])
        .map(|(i, (port, irq))| {
            isa_device(
                &format!("COM{}", i + 1),
                "PNP0501",
                u8::try_from(i + 1).unwrap_or(u8::MAX), // i < COM_PORTS.len() == 4
                *port,
                8,
                *irq,
            )
        })
        .collect();
    let mut sb: Vec<&dyn Aml> = vec![&pci0, &mbrs, &rtc];
    sb.extend(com.iter().map(|c| c as &dyn Aml));
    aml::Scope::new("\\_SB_".into(), sb).to_aml_bytes(&mut body);
    t.bytes(&body);
    t.finish()
}

/// \_SB.PCI0: the root bridge, its bus, I/O and memory windows, and the
/// INTx routing of every slot and pin as the engine wires it.
fn pci_root_bridge() -> Raw {
    let prt: Vec<(u32, u8, u32)> = (0..32u8)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                let line = intx_route(slot, pin).1;
                ((u32::from(slot) << 16) | 0xffff, pin, line)
            })
        })
        .collect();
    let prt_pkgs: Vec<aml::Package> = prt
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &0u8, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_pkgs.iter().map(|p| p as &dyn Aml).collect();
    let prt = encode(&aml::Package::new(prt_refs));
    let crs = encode(&aml::ResourceTemplate::new(vec![
        // Bus 0 only, as the MCFG.
        &aml::AddressSpace::new_bus_number(0u16, 0u16),
        &aml::IO::new(0xcf8, 0xcf8, 1, 8),
        &aml::AddressSpace::new_io(0u16, 0xcf7u16, None),
        &aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None),
        &aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            PCI_MMIO_BASE32,
            PCI_MMIO_END32,
            None,
        ),
    ]));
    encode(&aml::Device::new(
        "PCI0".into(),
        vec![
            // PCI Express root bridge (configuration through the MCFG's
            // ECAM), compatible with a plain PCI one.
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &0u8),
            &aml::Name::new("_SEG".into(), &0u8),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_BBN".into(), &0u8),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    ))
}

/// \_SB.MBRS: the ECAM window claimed as a motherboard resource, as Linux
/// wants before it trusts the MCFG.
fn motherboard_resources() -> Raw {
    encode(&aml::Device::new(
        "MBRS".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    false,
                    ECAM_BASE32,
                    ECAM_SIZE32,
                )]),
            ),
        ],
    ))
}

/// PCI Express memory-mapped configuration: segment 0, bus 0.
fn mcfg() -> Vec<u8> {
    let mut t = Table::new(b"MCFG", 1);
    t.u64(0) // reserved
        .u64(ECAM_BASE)
        .u16(0) // segment
        .u8(0) // first bus
        .u8(ECAM_LAST_BUS)
        .u32(0);
    t.finish()
}

/// Intel MP specification 1.4 configuration table: processors, the PCI
/// and ISA buses, the I/O APIC, ISA and PCI interrupt routing (the same
/// lines as the MADT and the DSDT's _PRT), LINT0 ExtINT and LINT1 NMI.
fn mp_config(cpus: u16) -> Vec<u8> {
    const PCI_BUS: u8 = 0;
    const ISA_BUS: u8 = 1;
    let cpus = apic_ids(cpus);
    let ioapic = cpus;
    let mut e: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for i in 0..cpus {
        // Processor: APIC id, version, enabled (+ BSP), signature, features (FPU, APIC).
        e.extend_from_slice(&[0, i, 0x14, if i == 0 { 3 } else { 1 }]);
        e.extend_from_slice(&0x600u32.to_le_bytes());
        e.extend_from_slice(&0x201u32.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(PCI_BUS, b"PCI   "), (ISA_BUS, b"ISA   ")] {
        e.extend_from_slice(&[1, id]);
        e.extend_from_slice(name);
        count += 1;
    }
    e.extend_from_slice(&[2, ioapic, 0x11, 1]);
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    let mut intr = |kind: u8, flags: u16, bus: u8, irq: u8, pin: u8| {
        e.extend_from_slice(&[3, kind]);
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&[bus, irq, ioapic, pin]);
        count += 1;
    };
    // The 8259 behind pin 0; ISA IRQ 0 (PIT) on pin 2, the rest identity.
    intr(3, 0, ISA_BUS, 0, 0);
    for irq in 0..16u8 {
        match irq {
            0 => intr(0, 0, ISA_BUS, 0, 2),
            2 => {}
            // SCI: level, active high (the MADT says the same).
            i if u32::from(i) == SCI_IRQ => intr(0, 0x0d, ISA_BUS, i, i),
            i => intr(0, 0, ISA_BUS, i, i),
        }
    }
    // PCI: source IRQ = slot << 2 | pin; level, active low by the bus's rules.
    for slot in 0..32u8 {
        for pin in 0..4u8 {
            // IOAPIC pins are below 24.
            let line = cast::low_u8(u64::from(intx_route(slot, pin).1));
            intr(0, 0, PCI_BUS, (slot << 2) | pin, line);
        }
    }
    for (kind, lint) in [(3u8, 0u8), (1, 1)] {
        e.extend_from_slice(&[4, kind, 0, 0, ISA_BUS, 0, 0xff, lint]);
        count += 1;
    }
    let mut v = Vec::with_capacity(44 + e.len());
    v.extend_from_slice(b"PCMP");
    // At most 255 processors, 2 buses, 1 I/O APIC, 17 + 128 interrupts and
    // 2 local interrupts of 8 or 20 bytes: well below 64 KiB.
    v.extend_from_slice(
        &u16::try_from(44 + e.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    v.push(4); // spec revision 1.4
    v.push(0); // checksum
    v.extend_from_slice(b"VMMFS   ");
    v.extend_from_slice(b"VMM-ENGINE  ");
    v.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    v.extend_from_slice(&[0; 4]); // no extended table
    v.extend_from_slice(&e);
    v[7] = checksum(&v);
    v
}

/// MP floating pointer structure pointing at the configuration table.
fn mp_floating(config: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(b"_MP_");
    // A 32-bit physical address field; the table is below 1 MiB (0, never
    // taken, would mean "no table").
    v.extend_from_slice(&u32::try_from(config).unwrap_or(0).to_le_bytes());
    v.extend_from_slice(&[1, 4, 0]); // 16 bytes, revision 1.4, checksum
    v.extend_from_slice(&[0; 5]); // a configuration table is present; no IMCR
    v[10] = checksum(&v);
    v
}

/// APIC ids are 8 bits; the protocol caps `cpus` at 255, so the clamp
/// never changes a value.
fn apic_ids(cpus: u16) -> u8 {
    u8::try_from(cpus).unwrap_or(u8::MAX)
}

fn madt(cpus: u16) -> Vec<u8> {
    let cpus = apic_ids(cpus);
    let mut t = Table::new(b"APIC", 4);
    t.u32(LAPIC_ADDR).u32(1); // PCAT_COMPAT: there are 8259s
    for i in 0..cpus {
        // Processor local APIC: ACPI id, APIC id, enabled.
        t.u8(0).u8(8).u8(i).u8(i).u32(1);
    }
    // I/O APIC id = cpus (distinct from every LAPIC), GSI base 0.
    t.u8(1).u8(12).u8(cpus).u8(0).u32(IOAPIC_ADDR).u32(0);
    // ISA IRQ 0 is wired to GSI 2.
    t.u8(2).u8(10).u8(0).u8(0).u32(2).u16(0);
    // SCI: level triggered, active high (KVM's IOAPIC line semantics).
    t.u8(2).u8(10).u8(0).u8(SCI_IRQ8).u32(SCI_IRQ).u16(0x000d);
    // LINT1 of every processor is NMI.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Table::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

/// RSDP offset of the XSDT address.
const RSDP_XSDT: usize = 24;

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(b"RSD PTR ");
    v.push(0);
    v.extend_from_slice(OEM_ID);
    v.push(2); // revision: ACPI 2.0+, XSDT valid
    v.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    v.extend_from_slice(&36u32.to_le_bytes());
    v.extend_from_slice(&xsdt.to_le_bytes());
    v.extend_from_slice(&[0; 4]); // ext checksum + reserved
    v[8] = checksum(&v[..20]);
    v[32] = checksum(&v);
    v
}

/// Write the whole table set for `cpus` vCPUs into guest RAM; the MP table
/// unless `mptable` is false (bhyve -Y).
pub fn write_tables(mem: &GuestMemory, cpus: u16, mptable: bool, coms: [bool; 4]) -> Result<()> {
    mem.zero(RSDP_ADDR, cast::usize_from(ACPI_END - RSDP_ADDR))?;
    if mptable {
        mem.write(MPC_ADDR, &mp_config(cpus))?;
        mem.write(MPFP_ADDR, &mp_floating(MPC_ADDR))?;
    }
    mem.write(FACS_ADDR, &facs())?;
    mem.write(DSDT_ADDR, &dsdt(coms))?;
    mem.write(FADT_ADDR, &fadt(FACS_ADDR, DSDT_ADDR))?;
    mem.write(MADT_ADDR, &madt(cpus))?;
    mem.write(MCFG_ADDR, &mcfg())?;
    mem.write(XSDT_ADDR, &xsdt(&[FADT_ADDR, MADT_ADDR, MCFG_ADDR]))?;
    mem.write(RSDP_ADDR, &rsdp(XSDT_ADDR))?;
    Ok(())
}

/// fw_cfg file names of QEMU's ACPI table loader interface.
pub const LOADER_FILE: &str = "etc/table-loader";
pub const TABLES_FILE: &str = "etc/acpi/tables";
pub const RSDP_FILE: &str = "etc/acpi/rsdp";

/// The same tables for firmware that installs them itself (OVMF): one blob
/// of tables whose pointers are offsets into it, an RSDP blob, and the
/// loader script of 128-byte commands (ALLOCATE each blob, ADD_POINTER to
/// relocate every pointer, ADD_CHECKSUM for every table) that OVMF runs.
/// Checksum fields are zero in the blobs: the script computes them.
pub struct LoaderFiles {
    pub tables: Vec<u8>,
    pub rsdp: Vec<u8>,
    pub loader: Vec<u8>,
}

fn loader_name(e: &mut Vec<u8>, name: &str) {
    let mut n = [0u8; 56];
    n[..name.len()].copy_from_slice(name.as_bytes());
    e.extend_from_slice(&n);
}

fn loader_entry(cmd: u32, body: Vec<u8>) -> Vec<u8> {
    let mut e = cmd.to_le_bytes().to_vec();
    e.extend_from_slice(&body);
    e.resize(128, 0);
    e
}

fn loader_allocate(file: &str, align: u32, zone: u8) -> Vec<u8> {
    let mut b = Vec::new();
    loader_name(&mut b, file);
    b.extend_from_slice(&align.to_le_bytes());
    b.push(zone);
    loader_entry(1, b)
}

fn loader_pointer(from: &str, to: &str, offset: usize, size: u8) -> Vec<u8> {
    let mut b = Vec::new();
    loader_name(&mut b, from);
    loader_name(&mut b, to);
    b.extend_from_slice(&small_u32(offset).to_le_bytes());
    b.push(size);
    loader_entry(2, b)
}

fn loader_checksum(file: &str, at: usize, start: usize, len: usize) -> Vec<u8> {
    let mut b = Vec::new();
    loader_name(&mut b, file);
    for v in [at, start, len] {
        b.extend_from_slice(&small_u32(v).to_le_bytes());
    }
    loader_entry(3, b)
}

/// Build the loader files for `cpus` vCPUs.
pub fn loader_files(cpus: u16, coms: [bool; 4]) -> LoaderFiles {
    let mut blob: Vec<u8> = Vec::new();
    let mut place = |t: Vec<u8>, align: usize| -> usize {
        while !blob.len().is_multiple_of(align) {
            blob.push(0);
        }
        let at = blob.len();
        blob.extend_from_slice(&t);
        at
    };
    // The FACS wants 64-byte alignment; it has no checksum.
    let facs_at = place(facs(), 64);
    let dsdt_at = place(dsdt(coms), 8);
    let fadt_at = place(fadt(facs_at as u64, dsdt_at as u64), 8);
    let madt_at = place(madt(cpus), 8);
    let mcfg_at = place(mcfg(), 8);
    let entries = [fadt_at as u64, madt_at as u64, mcfg_at as u64];
    let xsdt_at = place(xsdt(&entries), 8);
    let mut tables = blob;
    let mut cmds = vec![
        loader_allocate(RSDP_FILE, 16, 2),
        loader_allocate(TABLES_FILE, 64, 1),
    ];
    let mut ptr =
        |at: usize, size: u8| cmds.push(loader_pointer(TABLES_FILE, TABLES_FILE, at, size));
    ptr(fadt_at + FADT_FACS32, 4);
    ptr(fadt_at + FADT_DSDT32, 4);
    ptr(fadt_at + FADT_FACS64, 8);
    ptr(fadt_at + FADT_DSDT64, 8);
    for i in 0..entries.len() {
        ptr(xsdt_at + 36 + 8 * i, 8);
    }
    for at in [dsdt_at, fadt_at, madt_at, mcfg_at, xsdt_at] {
        let len = u32::from_le_bytes(tables[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        tables[at + 9] = 0;
        cmds.push(loader_checksum(TABLES_FILE, at + 9, at, len));
    }
    let mut rsdp = rsdp(xsdt_at as u64);
    rsdp[8] = 0;
    rsdp[32] = 0;
    cmds.push(loader_pointer(RSDP_FILE, TABLES_FILE, RSDP_XSDT, 8));
    cmds.push(loader_checksum(RSDP_FILE, 8, 0, 20));
    cmds.push(loader_checksum(RSDP_FILE, 32, 0, rsdp.len()));
    LoaderFiles {
        tables,
        rsdp,
        loader: cmds.concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_fit() {
        assert_eq!(fadt(FACS_ADDR, DSDT_ADDR).len(), 244);
        for t in [
            fadt(FACS_ADDR, DSDT_ADDR),
            dsdt([true; 4]),
            madt(255),
            xsdt(&[1, 2, 3]),
            mcfg(),
        ] {
            assert_eq!(sum(&t), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
        }
        let r = rsdp(XSDT_ADDR);
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let mpc = mp_config(255);
        assert_eq!(sum(&mpc), 0);
        assert_eq!(usize::from(u16::from_le_bytes([mpc[4], mpc[5]])), mpc.len());
        let m = mp_floating(MPC_ADDR);
        assert_eq!(sum(&m), 0);
        assert!(RSDP_ADDR + r.len() as u64 <= MPFP_ADDR);
        assert!(MPFP_ADDR + m.len() as u64 <= XSDT_ADDR);
        assert!(XSDT_ADDR + xsdt(&[1, 2, 3]).len() as u64 <= FADT_ADDR);
        assert!(FADT_ADDR + fadt(FACS_ADDR, DSDT_ADDR).len() as u64 <= FACS_ADDR);
        assert!(MADT_ADDR + madt(255).len() as u64 <= MCFG_ADDR);
        assert!(MCFG_ADDR + mcfg().len() as u64 <= MPC_ADDR);
        assert!(MPC_ADDR + mp_config(255).len() as u64 <= DSDT_ADDR);
        assert!(DSDT_ADDR + dsdt([true; 4]).len() as u64 <= ACPI_END);
    }

    /// Run the loader script as firmware would (allocate at made-up
    /// addresses, relocate, checksum) and check the result is a valid,
    /// linked table set.
    #[test]
    fn loader_script_links_the_tables() {
        let f = loader_files(2, [true, true, false, false]);
        assert_eq!(f.loader.len() % 128, 0);
        let (rsdp_base, tables_base) = (0xf_0000u64, 0x7fe0_0000u64);
        let mut tables = f.tables.clone();
        let mut rsdp = f.rsdp.clone();
        let name = |b: &[u8]| {
            String::from_utf8(b.iter().take_while(|c| **c != 0).copied().collect()).unwrap()
        };
        for e in f.loader.chunks(128) {
            let cmd = u32::from_le_bytes(e[0..4].try_into().unwrap());
            match cmd {
                1 => {}
                2 => {
                    let (from, to) = (name(&e[4..60]), name(&e[60..116]));
                    let off = u32::from_le_bytes(e[116..120].try_into().unwrap()) as usize;
                    let size = e[120] as usize;
                    assert_eq!(to, TABLES_FILE);
                    let buf = if from == RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&buf[off..off + size]);
                    let p = u64::from_le_bytes(v) + tables_base;
                    buf[off..off + size].copy_from_slice(&p.to_le_bytes()[..size]);
                }
                3 => {
                    let file = name(&e[4..60]);
                    let w = |i: usize| {
                        u32::from_le_bytes(e[60 + 4 * i..64 + 4 * i].try_into().unwrap()) as usize
                    };
                    let buf = if file == RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    buf[w(0)] = checksum(&buf[w(1)..w(1) + w(2)]);
                }
                c => panic!("unexpected loader command {c}"),
            }
        }
        let _ = rsdp_base;
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap()) - tables_base;
        let at = |a: u64| cast::usize_from(a - tables_base);
        let x = at(xsdt + tables_base);
        assert_eq!(&tables[x..x + 4], b"XSDT");
        let xlen = u32::from_le_bytes(tables[x + 4..x + 8].try_into().unwrap()) as usize;
        assert_eq!(sum(&tables[x..x + xlen]), 0);
        let mut sigs = Vec::new();
        for i in 0..(xlen - 36) / 8 {
            let p = u64::from_le_bytes(tables[x + 36 + 8 * i..x + 44 + 8 * i].try_into().unwrap());
            let t = at(p);
            let len = u32::from_le_bytes(tables[t + 4..t + 8].try_into().unwrap()) as usize;
            assert_eq!(sum(&tables[t..t + len]), 0);
            sigs.push(String::from_utf8(tables[t..t + 4].to_vec()).unwrap());
            if &tables[t..t + 4] == b"FACP" {
                let dsdt = at(u64::from_le_bytes(
                    tables[t + FADT_DSDT64..t + FADT_DSDT64 + 8]
                        .try_into()
                        .unwrap(),
                ));
                assert_eq!(&tables[dsdt..dsdt + 4], b"DSDT");
                let facs = at(u64::from(u32::from_le_bytes(
                    tables[t + FADT_FACS32..t + FADT_FACS32 + 4]
                        .try_into()
                        .unwrap(),
                )));
                assert_eq!(&tables[facs..facs + 4], b"FACS");
                assert_eq!(facs % 64, 0);
            }
        }
        assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
    }
}
