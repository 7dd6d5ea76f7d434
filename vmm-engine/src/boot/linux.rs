//! Direct Linux boot through the x86 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): a bzImage or an ELF vmlinux is loaded,
//! a zero page (`boot_params`) with the e820 map, command line and initrd is
//! built, and the boot vCPU enters the kernel in long mode on identity page
//! tables, as Firecracker and Cloud Hypervisor do.
//!
//! The image comes from the user: every header field is range-checked before
//! it is used as an offset or an address.

use crate::acpi::{RSDP_ADDR, TABLES_END};
use crate::cast;
use crate::devices::{ECAM_BASE, ECAM_SIZE};
use crate::error::{Error, Result};
use crate::memory::{GuestMemory, FOUR_GIB};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use std::io::Cursor;
use vm_memory::{Address, ByteValued, GuestAddress, GuestMemoryMmap};

/// Low-memory layout of the structures the loader builds.
const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x580;
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
const STACK_TOP: u64 = 0x8ff0;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
/// Four page directories: 4 GiB identity mapped with 2 MiB pages.
const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
const CMDLINE_ADDR32: u32 = cast::const_u32(CMDLINE_ADDR);
const CMDLINE_MAX: usize = 0x1_0000;
/// The header's cmdline_size: the longest command line without its NUL.
const CMDLINE_SIZE: u32 = cast::const_u32(CMDLINE_MAX as u64 - 1);
/// Where the protected-mode kernel goes unless the header prefers elsewhere.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory (start of the EBDA).
const EBDA_START: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The setup header's offset in a bzImage and in the zero page.
const HDR_OFFSET: usize = 0x1f1;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
const XLF_KERNEL_64: u16 = 0x01;
/// Highest initrd address when the header gives none (boot.rst).
const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What the boot vCPU needs to enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    pub rip: u64,
    pub boot_params: u64,
}

/// Where things were put (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub entry: LinuxEntry,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

/// A kernel in guest memory: where to enter, where it ends (including the
/// room a bzImage decompresses into), and the setup header for the zero page.
struct Kernel {
    entry: u64,
    end: u64,
    hdr: setup_header,
    /// Longest command line the kernel takes, NUL excluded.
    cmdline_max: usize,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidCommand(format!("kernel: {}", msg.into()))
}

/// The bzImage's setup header, if it has one ("HdrS").
fn bzimage_header(k: &[u8]) -> Option<setup_header> {
    let bytes = k.get(HDR_OFFSET..HDR_OFFSET + std::mem::size_of::<setup_header>())?;
    let hdr = *setup_header::from_slice(bytes)?;
    (hdr.header == HDR_MAGIC).then_some(hdr)
}

/// Is this a bzImage (has the "HdrS" setup header)?
pub fn is_bzimage(k: &[u8]) -> bool {
    bzimage_header(k).is_some()
}

/// Is this a 64-bit little-endian x86-64 ELF?
pub fn is_elf64(k: &[u8]) -> bool {
    k.len() >= 64 && &k[0..4] == b"\x7fELF" && k[4] == 2 && k[5] == 1 && k[18..20] == [62, 0]
}

fn loader_error(e: linux_loader::loader::Error) -> Error {
    bad(e.to_string())
}

/// Load a bzImage's protected-mode part (linux-loader) where the kernel
/// prefers to run, so that it decompresses in place, or at 1 MiB.
fn load_bzimage(
    view: &GuestMemoryMmap,
    k: &[u8],
    hdr: setup_header,
    low_end: u64,
) -> Result<Kernel> {
    let (version, xlf) = (hdr.version, hdr.xloadflags);
    if version < 0x020c || xlf & XLF_KERNEL_64 == 0 {
        return Err(bad(format!(
            "bzImage protocol {version:#x} has no 64-bit entry"
        )));
    }
    // boot.rst: a setup_sects of 0 means 4.
    let setup = (match hdr.setup_sects {
        0 => 4,
        n => usize::from(n),
    } + 1)
        * 512;
    let payload = k.len().saturating_sub(setup) as u64;
    let init_size = u64::from(hdr.init_size).max(payload);
    let fits = |at: u64| at.checked_add(init_size).is_some_and(|e| e <= low_end);
    let pref = hdr.pref_address;
    let at = if pref >= HIMEM_START && pref.is_multiple_of(4096) && fits(pref) {
        pref
    } else {
        HIMEM_START
    };
    if !fits(at) {
        return Err(bad("bzImage does not fit in memory"));
    }
    let r = BzImage::load(
        view,
        Some(GuestAddress(at)),
        &mut Cursor::new(k),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(loader_error)?;
    let csize = hdr.cmdline_size as usize;
    Ok(Kernel {
        entry: r.kernel_load.raw_value() + 0x200,
        end: at + init_size,
        hdr,
        cmdline_max: if csize == 0 { 255 } else { csize },
    })
}

/// Load an ELF vmlinux's segments at their physical addresses
/// (linux-loader), entry at or above 1 MiB, and make up the setup header a
/// bzImage would have brought.
fn load_elf(view: &GuestMemoryMmap, k: &[u8]) -> Result<Kernel> {
    let r = Elf::load(
        view,
        None,
        &mut Cursor::new(k),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(loader_error)?;
    let hdr = setup_header {
        boot_flag: 0xaa55,
        header: HDR_MAGIC,
        version: 0x020f,
        kernel_alignment: 0x0100_0000,
        cmdline_size: CMDLINE_SIZE,
        ..Default::default()
    };
    Ok(Kernel {
        entry: r.kernel_load.raw_value(),
        end: r.kernel_end,
        hdr,
        cmdline_max: CMDLINE_MAX - 1,
    })
}

/// Place the initrd as high as the kernel allows, page aligned, above the
/// kernel; record it in the zero page.
fn load_initrd(
    mem: &GuestMemory,
    bp: &mut boot_params,
    kernel: &Kernel,
    rd: &[u8],
) -> Result<Option<(u64, u64)>> {
    let len = rd.len() as u64;
    if len == 0 {
        return Ok(None);
    }
    let max = match u64::from(kernel.hdr.initrd_addr_max) {
        0 => INITRD_ADDR_MAX,
        m => m,
    };
    let top = max.saturating_add(1).min(mem.low_end());
    let at = top
        .checked_sub(len)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel.end.next_multiple_of(4096))
        .ok_or_else(|| Error::NoMemory("initrd does not fit below the kernel's limit".into()))?;
    mem.write(at, rd)?;
    // The low and high halves of the address and the size.
    bp.hdr.ramdisk_image = cast::low_u32(at);
    // at + len <= top <= 4 GiB (initrd_addr_max is 32-bit), so len fits.
    bp.hdr.ramdisk_size = u32::try_from(len)
        .map_err(|_| Error::NoMemory("initrd does not fit below the kernel's limit".into()))?;
    bp.ext_ramdisk_image = cast::high_u32(at);
    bp.ext_ramdisk_size = (len >> 32) as u32;
    Ok(Some((at, len)))
}

/// Write the command line, NUL terminated, and point the zero page at it.
fn load_cmdline(mem: &GuestMemory, bp: &mut boot_params, max: usize, cmdline: &str) -> Result<()> {
    let limit = max.min(CMDLINE_MAX - 1);
    let cmdline = cmdline.as_bytes();
    if cmdline.len() > limit {
        return Err(Error::InvalidCommand(format!(
            "command line longer than the kernel's {limit} bytes"
        )));
    }
    mem.zero(CMDLINE_ADDR, cmdline.len() + 1)?;
    mem.write(CMDLINE_ADDR, cmdline)?;
    bp.hdr.cmd_line_ptr = CMDLINE_ADDR32;
    bp.ext_cmd_line_ptr = 0;
    Ok(())
}

/// Load `kernel` (bzImage or ELF), `initrd` and `cmdline` into guest memory,
/// write the zero page and page tables, and say where to enter.
pub fn load(
    mem: &GuestMemory,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<Loaded> {
    let low_end = mem.low_end();
    if low_end < HIMEM_START * 2 {
        return Err(bad("guest memory too small for direct boot"));
    }
    let view = mem.view()?;
    let k = if let Some(hdr) = bzimage_header(kernel) {
        load_bzimage(&view, kernel, hdr, low_end)?
    } else if is_elf64(kernel) {
        load_elf(&view, kernel)?
    } else {
        return Err(bad("neither a bzImage nor an x86-64 ELF"));
    };
    if k.entry >= low_end {
        return Err(bad(format!("entry point {:#x} outside RAM", k.entry)));
    }
    let mut bp = boot_params {
        hdr: k.hdr,
        acpi_rsdp_addr: RSDP_ADDR,
        ..Default::default()
    };
    bp.hdr.type_of_loader = 0xff;
    bp.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = 0xfe00;
    load_cmdline(mem, &mut bp, k.cmdline_max, cmdline)?;
    let initrd = match initrd {
        Some(rd) => load_initrd(mem, &mut bp, &k, rd)?,
        None => None,
    };
    let e820 = e820_map(mem);
    // The table has 128 entries, so the bound fits in a u8.
    bp.e820_entries = u8::try_from(e820.len().min(bp.e820_table.len())).unwrap_or(u8::MAX);
    for (slot, (addr, size, ty)) in bp.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    mem.write(BOOT_PARAMS_ADDR, bp.as_slice())?;
    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(Loaded {
        entry: LinuxEntry {
            rip: k.entry,
            boot_params: BOOT_PARAMS_ADDR,
        },
        kernel_end: k.end,
        initrd,
    })
}

/// The guest's physical memory map: RAM around the legacy hole and the PCI
/// hole; the BIOS area holding the ACPI, MP and SMBIOS tables and the PCIe
/// configuration window (ECAM: Linux uses it only if it is reserved) are
/// reserved.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let low_end = mem.low_end();
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        (
            0xe_0000,
            TABLES_END.max(HIMEM_START) - 0xe_0000,
            E820_RESERVED,
        ),
    ];
    if low_end > HIMEM_START {
        v.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    v.push((ECAM_BASE, ECAM_SIZE, E820_RESERVED));
    let high = mem.high_len();
    if high > 0 {
        v.push((FOUR_GIB, high, E820_RAM));
    }
    v
}

fn write_page_tables(mem: &GuestMemory) -> Result<()> {
    mem.zero(PML4_ADDR, 0x1000)?;
    mem.zero(PDPT_ADDR, 0x1000)?;
    mem.write_u64(PML4_ADDR, PDPT_ADDR | 0x3)?;
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        mem.write_u64(PDPT_ADDR + i * 8, pd | 0x3)?;
        let mut page = vec![0u8; 4096];
        for j in 0..512u64 {
            // Present, writable, 2 MiB page.
            let e = ((i * 512 + j) << 21) | 0x83;
            let at = cast::usize_from(j * 8);
            page[at..at + 8].copy_from_slice(&e.to_le_bytes());
        }
        mem.write(pd, &page)?;
    }
    Ok(())
}

/// GDT entries: null, null, code64 (0x10, Linux's __BOOT_CS), data (0x18, __BOOT_DS), TSS (0x20).
/// The GDTR limit of [`GDT`]: its size in bytes, less one.
const GDT_LIMIT: u16 = cast::const_u16((GDT.len() * 8 - 1) as u64);
const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_0067,
];

fn write_gdt(mem: &GuestMemory) -> Result<()> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_u64(GDT_ADDR + 8 * i as u64, *e)?;
    }
    mem.write_u64(IDT_ADDR, 0)
}

fn segment(selector: u16, type_: u8, l: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        // KVM takes limits in bytes, already scaled by granularity.
        limit: if s == 1 { 0xffff_ffff } else { 0x67 },
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: s,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Registers for 64-bit entry: long mode, identity paging, flat segments,
/// RSI = zero page.
pub fn entry_state(entry: &LinuxEntry, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let code = segment(0x10, 0xb, 1, 0, 1);
    let data = segment(0x18, 0x3, 0, 1, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x20, 0xb, 0, 0, 0);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    // PE, MP, ET, NE, WP, PG.
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    let regs = kvm_regs {
        rip: entry.rip,
        rsi: entry.boot_params,
        rsp: STACK_TOP,
        rbp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    };
    (regs, sregs)
}

#[cfg(test)]
mod tests;
