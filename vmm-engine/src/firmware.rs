//! UEFI firmware boot (OVMF): the variable store a VM is given with
//! `bootvars`, and the platform pieces firmware reads at `run` (fw_cfg with
//! the e820 map, ACPI tables through the table loader and the vCPU count;
//! the flash at the store's address). Turned on by `set lpc.fwcfg=qemu`.

use crate::acpi;
use crate::boot::linux::e820_map;
use crate::cast;
use crate::devices::flash::{FlashConfig, BLOCK};
use crate::devices::fwcfg::FwCfgItems;
use crate::devices::FirmwareConfig;
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemory, Mapping, FOUR_GIB, MAX_BOOTROM};
use kvm_ioctls::VmFd;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// A VM's variable store: a memory copy of the user's VARS file, and the
/// file, which flash writes go back to.
pub struct BootVars {
    pub map: Arc<Mapping>,
    pub file: Arc<OwnedFd>,
    pub size: u64,
}

/// Take the VARS file of `bootvars FD`: a regular file opened read-write, a
/// multiple of 4 KiB (the flash's erase block), at most 16 MiB.
pub fn load_vars(fd: OwnedFd) -> Result<BootVars> {
    // SAFETY: F_GETFL on a descriptor we own.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 || fl & libc::O_ACCMODE != libc::O_RDWR {
        return Err(Error::InvalidCommand(
            "bootvars: the variable file must be open for reading and writing".into(),
        ));
    }
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| Error::io("bootvars: fstat", e))?;
    let size = meta.len();
    if !meta.is_file() || size == 0 || size % BLOCK != 0 || size > MAX_BOOTROM {
        return Err(Error::InvalidCommand(format!(
            "bootvars: size {size} is not a multiple of 4 KiB up to 16 MiB"
        )));
    }
    let mfd = memory::memfd("bootvars", size)?;
    let map = Mapping::shared(&mfd, size)?;
    // SAFETY: the mapping is `size` bytes long.
    let buf =
        unsafe { std::slice::from_raw_parts_mut(map.addr() as *mut u8, cast::usize_from(size)) };
    std::os::unix::fs::FileExt::read_exact_at(&file, buf, 0)
        .map_err(|e| Error::io("bootvars: read", e))?;
    Ok(BootVars {
        map: Arc::new(map),
        file: Arc::new(OwnedFd::from(file)),
        size,
    })
}

/// `etc/e820`: the same map a directly booted kernel gets, as 20-byte
/// entries (address, length, type; little-endian).
fn e820_file(mem: &GuestMemory) -> Vec<u8> {
    let mut v = Vec::new();
    for (addr, len, ty) in e820_map(mem) {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
    }
    v
}

/// Add fw_cfg files; one refused (a name too long, too many files) is an
/// error.
pub fn add_files<'a>(
    items: &mut FwCfgItems,
    files: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
) -> Result<()> {
    for (name, data) in files {
        if !items.add_file(name, data) {
            return Err(Error::InvalidCommand(format!("fw_cfg: cannot add {name}")));
        }
    }
    Ok(())
}

/// What the platform gives firmware for this run: fw_cfg items and, with
/// a variable store, its flash just below the `rom_size`-byte boot ROM.
pub fn config(
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    cpus: u16,
    rom_size: u64,
    vars: Option<&BootVars>,
    vars_slot: u32,
    coms: [bool; 4],
) -> Result<FirmwareConfig> {
    let ram = mem.regions().iter().map(|r| r.len).sum();
    let mut items = FwCfgItems::new(cpus, ram);
    let loader = acpi::loader_files(cpus, coms);
    let files = [
        ("etc/e820", e820_file(mem)),
        (acpi::TABLES_FILE, loader.tables),
        (acpi::RSDP_FILE, loader.rsdp),
        (acpi::LOADER_FILE, loader.loader),
    ];
    add_files(&mut items, files)?;
    let flash = match vars {
        None => None,
        Some(v) => {
            if rom_size + v.size > MAX_BOOTROM {
                return Err(Error::InvalidCommand(
                    "boot ROM and variable store together exceed 16 MiB".into(),
                ));
            }
            Some(FlashConfig {
                vm: vm.clone(),
                slot: vars_slot,
                gpa: FOUR_GIB - rom_size - v.size,
                map: v.map.clone(),
                file: Some(v.file.clone()),
            })
        }
    };
    Ok(FirmwareConfig {
        fwcfg: items,
        flash,
    })
}
