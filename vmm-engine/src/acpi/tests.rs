//! The tables' checksums, lengths and placement, and the loader script run
//! as firmware would.

use super::bios::*;
use super::dsdt::dsdt;
use super::fadt::{fadt, FADT_DSDT64, FADT_FACS32};
use super::loader::{loader_files, RSDP_FILE, TABLES_FILE};
use super::madt::madt;
use super::mcfg::mcfg;
use super::mptable::{mp_config, mp_floating};
use super::root::{rsdp, xsdt};
use super::smbios::{self, System};
use super::table::checksum;
use crate::cast;
use crate::command::Topology;
use crate::memory::{ram_layout, FOUR_GIB};

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

/// The SMBIOS structures for 1 and 255 vCPUs and RAM below the PCI hole,
/// around it and beyond the 32 GiB of the short size field fit between
/// the entry point (after the ACPI tables, bios.rs checks at build time)
/// and TABLES_END.
#[test]
fn smbios_fits_after_the_acpi_tables() {
    for cpus in [1, 255] {
        for size in [256 << 20, (4 << 30) + (256 << 20), 64 << 30] {
            let (low, high) = ram_layout(size);
            let ram = [(0, low), (FOUR_GIB, high)];
            let t = smbios::structures(&System {
                topology: Topology {
                    cpus,
                    sockets: cpus,
                    cores: 1,
                    threads: 1,
                },
                ram: if high > 0 { &ram } else { &ram[..1] },
                uuid: smbios::vm_uuid("vm1"),
            });
            assert!(SMBIOS_TABLE_ADDR + t.bytes.len() as u64 <= TABLES_END);
        }
    }
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
    let name =
        |b: &[u8]| String::from_utf8(b.iter().take_while(|c| **c != 0).copied().collect()).unwrap();
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
