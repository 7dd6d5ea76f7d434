//! The DSDT: the S5 sleep state, the PCI root bridge with its windows and
//! INTx routing, the ECAM window as a motherboard resource, the RTC and the
//! COM ports the guest has.

use super::table::Table;
use crate::cast;
use crate::devices::rtc::RTC_INDEX;
use crate::devices::{intx_route, COM_PORTS, ECAM_BASE, ECAM_SIZE, PCI_MMIO_BASE};
use acpi_tables::{aml, Aml};

/// Top of the 32-bit PCI memory window: the ECAM window follows.
const PCI_MMIO_END: u64 = ECAM_BASE - 1;

/// The 32-bit forms of the PCI windows (below 4 GiB), checked at compile time.
const PCI_MMIO_BASE32: u32 = cast::const_u32(PCI_MMIO_BASE);
const PCI_MMIO_END32: u32 = cast::const_u32(PCI_MMIO_END);
const ECAM_BASE32: u32 = cast::const_u32(ECAM_BASE);
const ECAM_SIZE32: u32 = cast::const_u32(ECAM_SIZE);

/// A PNP device with one I/O range and one ISA interrupt.
pub(super) fn isa_device(name: &str, hid: &str, uid: u8, port: u16, len: u8, irq: u32) -> Raw {
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
pub(super) struct Raw(Vec<u8>);

pub(super) fn encode(a: &dyn Aml) -> Raw {
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
pub(super) fn dsdt(coms: [bool; 4]) -> Vec<u8> {
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
pub(super) fn pci_root_bridge() -> Raw {
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
pub(super) fn motherboard_resources() -> Raw {
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
