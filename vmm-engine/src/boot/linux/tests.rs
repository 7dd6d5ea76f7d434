//! The loader against hand-made ELF and bzImage files, hostile ones included.

use super::*;
use crate::memory::Region;

/// Page-aligned guest RAM (the rust-vmm view requires it); the buffer
/// must outlive the GuestMemory.
fn guest(size: usize) -> (Vec<u8>, GuestMemory) {
    let mut buf = vec![0u8; size + 4096];
    let off = buf.as_ptr().align_offset(4096);
    let gm = GuestMemory::new(vec![Region {
        gpa: 0,
        len: size as u64,
        host: buf[off..].as_mut_ptr() as usize,
    }]);
    (buf, gm)
}

fn peek(gm: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    gm.read(gpa, &mut v).unwrap();
    v
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

fn zero_page(gm: &GuestMemory) -> boot_params {
    *boot_params::from_slice(&peek(
        gm,
        BOOT_PARAMS_ADDR,
        std::mem::size_of::<boot_params>(),
    ))
    .unwrap()
}

fn elf(paddr: u64, body: &[u8]) -> Vec<u8> {
    let mut k = vec![0u8; 0x1000];
    k[0..4].copy_from_slice(b"\x7fELF");
    k[4] = 2;
    k[5] = 1;
    k[6] = 1; // EV_CURRENT
    wr16(&mut k, 18, 62);
    wr64(&mut k, 0x18, paddr);
    wr64(&mut k, 0x20, 64);
    wr16(&mut k, 0x34, 64);
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

/// A bzImage: SETUP_SECTS sectors of setup after the boot sector, then
/// BODY as the protected-mode part.
fn bzimage(setup_sects: u8, body: &[u8]) -> Vec<u8> {
    let mut k = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    k[HDR_OFFSET] = setup_sects;
    wr16(&mut k, 0x1fe, 0xaa55);
    k[0x200] = 0xeb;
    k[0x201] = 0x6a;
    k[0x202..0x206].copy_from_slice(b"HdrS");
    wr16(&mut k, 0x206, 0x020f);
    k[0x211] = LOADED_HIGH;
    wr32(&mut k, 0x214, 0x10_0000); // code32_start
    wr32(&mut k, 0x22c, 0x37ff_ffff); // initrd_addr_max
    wr16(&mut k, 0x236, XLF_KERNEL_64);
    wr32(&mut k, 0x238, 2047); // cmdline_size
    wr64(&mut k, 0x258, 0x100_0000); // pref_address
    wr32(&mut k, 0x260, 0x10_0000); // init_size
    k.extend_from_slice(body);
    k
}

#[test]
fn elf_loads_with_initrd_and_cmdline() {
    let (_buf, gm) = guest(64 << 20);
    let k = elf(0x20_0000, b"kernel");
    let l = load(&gm, &k, Some(b"initrd"), "console=ttyS0").unwrap();
    assert_eq!(l.entry.rip, 0x20_0000);
    let (at, len) = l.initrd.unwrap();
    assert_eq!(len, 6);
    assert_eq!(peek(&gm, at, 6), b"initrd");
    assert_eq!(peek(&gm, 0x20_0000, 6), b"kernel");
    assert_eq!(peek(&gm, CMDLINE_ADDR, 14), b"console=ttyS0\0");
    let bp = zero_page(&gm);
    assert_eq!(bp.e820_entries, 5);
    assert_eq!({ bp.hdr.ramdisk_image } as u64, at);
    assert_eq!({ bp.hdr.cmd_line_ptr } as u64, CMDLINE_ADDR);
    assert_eq!({ bp.acpi_rsdp_addr }, RSDP_ADDR);
}

#[test]
fn bzimage_runs_where_it_prefers_with_its_header_in_the_zero_page() {
    let (_buf, gm) = guest(64 << 20);
    let k = bzimage(4, b"protected-mode code");
    let l = load(&gm, &k, Some(b"rd"), "quiet").unwrap();
    assert_eq!(l.entry.rip, 0x100_0000 + 0x200);
    assert_eq!(l.kernel_end, 0x100_0000 + 0x10_0000);
    assert_eq!(peek(&gm, 0x100_0000, 19), b"protected-mode code");
    let bp = zero_page(&gm);
    assert_eq!({ bp.hdr.header }, HDR_MAGIC);
    assert_eq!({ bp.hdr.version }, 0x020f);
    assert_eq!(bp.hdr.type_of_loader, 0xff);
    assert_eq!(bp.hdr.loadflags, LOADED_HIGH | CAN_USE_HEAP);
    let (at, _) = l.initrd.unwrap();
    assert!(at >= l.kernel_end);
    // Longer than the kernel's own limit.
    let (_b, gm) = guest(64 << 20);
    assert!(load(&gm, &k, None, &"x".repeat(2048)).is_err());
    // Where the preferred address does not fit, 1 MiB.
    let (_buf, gm) = guest(8 << 20);
    let l = load(&gm, &k, None, "").unwrap();
    assert_eq!(l.entry.rip, HIMEM_START + 0x200);
    assert_eq!(peek(&gm, 0x10_0000, 19), b"protected-mode code");
}

#[test]
fn hostile_images_are_refused() {
    let (_buf, gm) = guest(64 << 20);
    assert!(load(&gm, b"junk", None, "").is_err());
    // Segment far outside RAM.
    assert!(load(&gm, &elf(0x7000_0000, b"k"), None, "").is_err());
    // Entry below 1 MiB, over our own structures.
    assert!(load(&gm, &elf(0x1000, b"k"), None, "").is_err());
    // Program header offset past the end.
    let mut k = elf(0x20_0000, b"k");
    wr64(&mut k, 0x20, u64::MAX - 10);
    assert!(load(&gm, &k, None, "").is_err());
    // Segment data past the end of the file.
    let mut k = elf(0x20_0000, b"k");
    wr64(&mut k, 64 + 0x20, 1 << 20);
    assert!(load(&gm, &k, None, "").is_err());
    // bzImage claiming more setup than the file has.
    let mut bz = bzimage(4, b"k");
    bz[HDR_OFFSET] = 200;
    assert!(load(&gm, &bz, None, "").is_err());
    // bzImage without a 64-bit entry.
    let mut bz = bzimage(4, b"k");
    wr16(&mut bz, 0x236, 0);
    assert!(load(&gm, &bz, None, "").is_err());
    // bzImage whose decompressed size does not fit.
    let mut bz = bzimage(4, b"k");
    wr32(&mut bz, 0x260, 0xffff_0000);
    assert!(load(&gm, &bz, None, "").is_err());
    // Initrd larger than memory.
    let big = vec![0u8; 70 << 20];
    assert!(load(&gm, &elf(0x20_0000, b"k"), Some(&big), "").is_err());
}
