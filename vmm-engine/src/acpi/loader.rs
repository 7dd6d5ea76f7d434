//! The table set as fw_cfg files for firmware that installs tables itself
//! (QEMU's ACPI table loader interface, which OVMF runs).

use super::dsdt::dsdt;
use super::fadt::{facs, fadt, FADT_DSDT32, FADT_DSDT64, FADT_FACS32, FADT_FACS64};
use super::madt::madt;
use super::mcfg::mcfg;
use super::root::{rsdp, xsdt, RSDP_XSDT};
use super::table::small_u32;

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
