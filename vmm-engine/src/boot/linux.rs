//! Direct Linux boot through the x86 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): a bzImage or an ELF vmlinux is loaded,
//! a zero page (`boot_params`) with the e820 map, command line and initrd is
//! built, and the boot vCPU enters the kernel in long mode on identity page
//! tables, as Firecracker and Cloud Hypervisor do.
//!
//! The image comes from the user: every header field is range-checked before
//! it is used as an offset or an address.

use crate::acpi::{ACPI_END, RSDP_ADDR};
use crate::devices::{ECAM_BASE, ECAM_SIZE};
use crate::error::{Error, Result};
use crate::memory::{GuestMemory, FOUR_GIB};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

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
const CMDLINE_MAX: usize = 0x1_0000;
/// Where the protected-mode kernel goes unless the header prefers elsewhere.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory (start of the EBDA).
const EBDA_START: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const E820_MAX: usize = 128;

// boot_params offsets.
const BP_EXT_RAMDISK_IMAGE: usize = 0x0c0;
const BP_EXT_RAMDISK_SIZE: usize = 0x0c4;
const BP_EXT_CMD_LINE_PTR: usize = 0x0c8;
const BP_E820_ENTRIES: usize = 0x1e8;
const BP_E820_TABLE: usize = 0x2d0;
// setup_header offsets (inside boot_params and inside a bzImage).
const HDR_START: usize = 0x1f1;
const HDR_SETUP_SECTS: usize = 0x1f1;
const HDR_BOOT_FLAG: usize = 0x1fe;
const HDR_JUMP: usize = 0x200;
const HDR_MAGIC: usize = 0x202;
const HDR_VERSION: usize = 0x206;
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_RAMDISK_IMAGE: usize = 0x218;
const HDR_RAMDISK_SIZE: usize = 0x21c;
const HDR_HEAP_END_PTR: usize = 0x224;
const HDR_CMD_LINE_PTR: usize = 0x228;
const HDR_INITRD_ADDR_MAX: usize = 0x22c;
const HDR_KERNEL_ALIGNMENT: usize = 0x230;
const HDR_XLOADFLAGS: usize = 0x236;
const HDR_CMDLINE_SIZE: usize = 0x238;
const HDR_PREF_ADDRESS: usize = 0x258;
const HDR_INIT_SIZE: usize = 0x260;
const HDR_ACPI_RSDP: usize = 0x268;
const HDR_END_MAX: usize = 0x290;

const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
const XLF_KERNEL_64: u16 = 0x01;

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

fn rd16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn rd32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}
fn rd64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}
fn wr16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidCommand(format!("kernel: {}", msg.into()))
}

/// Is this a bzImage (has the "HdrS" setup header)?
pub fn is_bzimage(k: &[u8]) -> bool {
    k.len() >= HDR_END_MAX && &k[HDR_MAGIC..HDR_MAGIC + 4] == b"HdrS"
}

/// Is this a 64-bit little-endian x86-64 ELF?
pub fn is_elf64(k: &[u8]) -> bool {
    k.len() >= 64 && &k[0..4] == b"\x7fELF" && k[4] == 2 && k[5] == 1 && rd16(k, 18) == 62
}

/// Load an ELF vmlinux's PT_LOAD segments at their physical addresses.
/// Returns (entry, end of the highest segment).
fn load_elf(mem: &GuestMemory, k: &[u8]) -> Result<(u64, u64)> {
    let phoff = rd64(k, 0x20);
    let phentsize = u64::from(rd16(k, 0x36));
    let phnum = u64::from(rd16(k, 0x38));
    let mut entry = rd64(k, 0x18);
    if phentsize < 56 || phnum == 0 {
        return Err(bad("ELF without program headers"));
    }
    let mut end = 0u64;
    let mut loaded = 0;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .filter(|&p| p.checked_add(56).is_some_and(|e| e <= k.len() as u64))
            .ok_or_else(|| bad("program header outside the file"))? as usize;
        if rd32(k, ph) != 1 {
            continue; // not PT_LOAD
        }
        let offset = rd64(k, ph + 8);
        let vaddr = rd64(k, ph + 0x10);
        let paddr = rd64(k, ph + 0x18);
        let filesz = rd64(k, ph + 0x20);
        let memsz = rd64(k, ph + 0x28);
        let file_end = offset
            .checked_add(filesz)
            .filter(|&e| e <= k.len() as u64)
            .ok_or_else(|| bad("segment outside the file"))?;
        if filesz > memsz || paddr < HIMEM_START {
            return Err(bad(format!("bad segment at {paddr:#x}")));
        }
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or_else(|| bad("segment wraps"))?;
        mem.write(paddr, &k[offset as usize..file_end as usize])
            .map_err(|_| bad(format!("segment {paddr:#x}+{memsz:#x} outside RAM")))?;
        mem.zero(paddr + filesz, (memsz - filesz) as usize)
            .map_err(|_| bad("segment outside RAM"))?;
        // vmlinux may give a virtual entry point: translate it.
        if entry >= vaddr && entry < vaddr.wrapping_add(memsz) && vaddr != paddr {
            entry = entry - vaddr + paddr;
        }
        end = end.max(seg_end);
        loaded += 1;
    }
    if loaded == 0 {
        return Err(bad("ELF has no loadable segment"));
    }
    Ok((entry, end))
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
    let mut bp = vec![0u8; 4096];
    let (entry, kernel_end, cmdline_size, initrd_max) = if is_bzimage(kernel) {
        let version = rd16(kernel, HDR_VERSION);
        let xlf = rd16(kernel, HDR_XLOADFLAGS);
        if version < 0x020c || xlf & XLF_KERNEL_64 == 0 {
            return Err(bad(format!(
                "bzImage protocol {version:#x} has no 64-bit entry"
            )));
        }
        let setup_sects = match kernel[HDR_SETUP_SECTS] {
            0 => 4,
            n => usize::from(n),
        };
        let payload_off = (setup_sects + 1) * 512;
        if payload_off >= kernel.len() {
            return Err(bad("bzImage without protected-mode code"));
        }
        let payload = &kernel[payload_off..];
        let pref = rd64(kernel, HDR_PREF_ADDRESS);
        let init_size = u64::from(rd32(kernel, HDR_INIT_SIZE)).max(payload.len() as u64);
        let fits = |at: u64| at.checked_add(init_size).is_some_and(|e| e <= low_end);
        let load_at = if pref >= HIMEM_START && pref.is_multiple_of(4096) && fits(pref) {
            pref
        } else {
            HIMEM_START
        };
        if !fits(load_at) {
            return Err(bad("bzImage does not fit in memory"));
        }
        mem.write(load_at, payload)?;
        // Copy the setup header as the image has it, then fill in ours.
        let hdr_end = (HDR_MAGIC + usize::from(kernel[HDR_JUMP + 1]))
            .min(HDR_END_MAX)
            .min(kernel.len());
        bp[HDR_START..hdr_end].copy_from_slice(&kernel[HDR_START..hdr_end]);
        let csize = rd32(kernel, HDR_CMDLINE_SIZE) as usize;
        let imax = u64::from(rd32(kernel, HDR_INITRD_ADDR_MAX));
        (
            load_at + 0x200,
            load_at + init_size,
            if csize == 0 { 255 } else { csize },
            if imax == 0 { 0x37ff_ffff } else { imax },
        )
    } else if is_elf64(kernel) {
        let (entry, end) = load_elf(mem, kernel)?;
        wr16(&mut bp, HDR_BOOT_FLAG, 0xaa55);
        bp[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(b"HdrS");
        wr16(&mut bp, HDR_VERSION, 0x020f);
        wr32(&mut bp, HDR_KERNEL_ALIGNMENT, 0x0100_0000);
        wr32(&mut bp, HDR_CMDLINE_SIZE, (CMDLINE_MAX - 1) as u32);
        (entry, end, CMDLINE_MAX - 1, 0x37ff_ffff)
    } else {
        return Err(bad("neither a bzImage nor an x86-64 ELF"));
    };
    if entry >= low_end {
        return Err(bad(format!("entry point {entry:#x} outside RAM")));
    }
    bp[HDR_TYPE_OF_LOADER] = 0xff;
    bp[HDR_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP;
    wr16(&mut bp, HDR_HEAP_END_PTR, 0xfe00);

    // Command line, NUL terminated.
    let cmdline = cmdline.as_bytes();
    if cmdline.len() >= cmdline_size.min(CMDLINE_MAX) {
        return Err(Error::InvalidCommand(format!(
            "command line longer than the kernel's {} bytes",
            cmdline_size.min(CMDLINE_MAX) - 1
        )));
    }
    mem.zero(CMDLINE_ADDR, cmdline.len() + 1)?;
    mem.write(CMDLINE_ADDR, cmdline)?;
    wr32(&mut bp, HDR_CMD_LINE_PTR, CMDLINE_ADDR as u32);
    wr32(&mut bp, BP_EXT_CMD_LINE_PTR, 0);

    // Initrd: as high as the kernel allows, page aligned, above the kernel.
    let mut initrd_at = None;
    if let Some(rd) = initrd {
        let len = rd.len() as u64;
        let top = (initrd_max.saturating_add(1)).min(low_end);
        let at = top.checked_sub(len).map(|a| a & !0xfff);
        match at {
            Some(at) if at >= kernel_end.next_multiple_of(4096) && len > 0 => {
                mem.write(at, rd)?;
                wr32(&mut bp, HDR_RAMDISK_IMAGE, at as u32);
                wr32(&mut bp, HDR_RAMDISK_SIZE, len as u32);
                wr32(&mut bp, BP_EXT_RAMDISK_IMAGE, (at >> 32) as u32);
                wr32(&mut bp, BP_EXT_RAMDISK_SIZE, (len >> 32) as u32);
                initrd_at = Some((at, len));
            }
            _ if len == 0 => {}
            _ => {
                return Err(Error::NoMemory(
                    "initrd does not fit below the kernel's limit".into(),
                ))
            }
        }
    }

    wr64(&mut bp, HDR_ACPI_RSDP, RSDP_ADDR);
    let e820 = e820_map(mem);
    bp[BP_E820_ENTRIES] = e820.len() as u8;
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        let o = BP_E820_TABLE + 20 * i;
        wr64(&mut bp, o, *addr);
        wr64(&mut bp, o + 8, *size);
        wr32(&mut bp, o + 16, *ty);
    }
    mem.write(BOOT_PARAMS_ADDR, &bp)?;
    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(Loaded {
        entry: LinuxEntry {
            rip: entry,
            boot_params: BOOT_PARAMS_ADDR,
        },
        kernel_end,
        initrd: initrd_at,
    })
}

/// The guest's physical memory map: RAM around the legacy hole and the PCI
/// hole; the BIOS area holding the ACPI tables and the PCIe configuration
/// window (ECAM: Linux uses it only if it is reserved) are reserved.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let low_end = mem.low_end();
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        (
            0xe_0000,
            ACPI_END.max(HIMEM_START) - 0xe_0000,
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
    v.truncate(E820_MAX);
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
            page[(j * 8) as usize..(j * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
        }
        mem.write(pd, &page)?;
    }
    Ok(())
}

/// GDT entries: null, null, code64 (0x10, Linux's __BOOT_CS), data (0x18, __BOOT_DS), TSS (0x20).
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
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
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
mod tests {
    use super::*;
    use crate::memory::Region;

    fn guest(size: usize) -> (Vec<u8>, GuestMemory) {
        let mut buf = vec![0u8; size];
        let gm = GuestMemory::new(vec![Region {
            gpa: 0,
            len: size as u64,
            host: buf.as_mut_ptr() as usize,
        }]);
        (buf, gm)
    }

    fn elf(paddr: u64, body: &[u8]) -> Vec<u8> {
        let mut k = vec![0u8; 0x1000];
        k[0..4].copy_from_slice(b"\x7fELF");
        k[4] = 2;
        k[5] = 1;
        wr16(&mut k, 18, 62);
        wr64(&mut k, 0x18, paddr);
        wr64(&mut k, 0x20, 64);
        wr16(&mut k, 0x36, 56);
        wr16(&mut k, 0x38, 1);
        wr32(&mut k, 64, 1);
        wr64(&mut k, 64 + 8, 0x1000);
        wr64(&mut k, 64 + 0x10, paddr);
        wr64(&mut k, 64 + 0x18, paddr);
        wr64(&mut k, 64 + 0x20, body.len() as u64);
        wr64(&mut k, 64 + 0x28, body.len() as u64 + 0x100);
        k.extend_from_slice(body);
        k
    }

    #[test]
    fn elf_loads_with_initrd_and_cmdline() {
        let (buf, gm) = guest(64 << 20);
        let k = elf(0x20_0000, b"kernel");
        let l = load(&gm, &k, Some(b"initrd"), "console=ttyS0").unwrap();
        assert_eq!(l.entry.rip, 0x20_0000);
        let (at, len) = l.initrd.unwrap();
        assert_eq!(len, 6);
        assert_eq!(&buf[at as usize..at as usize + 6], b"initrd");
        assert_eq!(&buf[0x20_0000..0x20_0006], b"kernel");
        assert_eq!(
            &buf[CMDLINE_ADDR as usize..CMDLINE_ADDR as usize + 14],
            b"console=ttyS0\0"
        );
        let bp = &buf[BOOT_PARAMS_ADDR as usize..];
        assert_eq!(bp[BP_E820_ENTRIES], 5);
        assert_eq!(rd32(bp, HDR_RAMDISK_IMAGE) as u64, at);
    }

    #[test]
    fn hostile_images_are_refused() {
        let (_buf, gm) = guest(64 << 20);
        assert!(load(&gm, b"junk", None, "").is_err());
        // Segment far outside RAM.
        assert!(load(&gm, &elf(0x7000_0000, b"k"), None, "").is_err());
        // Segment over our own structures.
        assert!(load(&gm, &elf(0x1000, b"k"), None, "").is_err());
        // Program header offset past the end.
        let mut k = elf(0x20_0000, b"k");
        wr64(&mut k, 0x20, u64::MAX - 10);
        assert!(load(&gm, &k, None, "").is_err());
        // bzImage claiming huge setup.
        let mut bz = vec![0u8; 0x1000];
        bz[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(b"HdrS");
        wr16(&mut bz, HDR_VERSION, 0x020f);
        wr16(&mut bz, HDR_XLOADFLAGS, 1);
        bz[HDR_SETUP_SECTS] = 200;
        assert!(load(&gm, &bz, None, "").is_err());
        // Initrd larger than memory.
        let big = vec![0u8; 70 << 20];
        assert!(load(&gm, &elf(0x20_0000, b"k"), Some(&big), "").is_err());
    }
}
