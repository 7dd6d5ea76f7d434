//! Direct Linux boot: the test kernel reports what it finds in boot_params.
mod common;
use common::*;
use vmm_engine::ExitReason;

const CMDLINE: &str = "console=ttyS0 hello=world";
const INITRD: &[u8] = b"initrd-bytes";

/// Wrap the flat kernel into a bzImage: 4 setup sectors with a protocol
/// 2.15 header, 64-bit entry at +0x200 of the protected-mode part.
fn bzimage(payload: &[u8]) -> Vec<u8> {
    let mut k = vec![0u8; 5 * 512];
    k[0x1f1] = 4; // setup_sects
    k[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    k[0x200] = 0xeb; // jmp over the header...
    k[0x201] = 0x6a; // ...which ends at 0x26c
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x211] = 0x01; // LOADED_HIGH
    k[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    k[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
    k[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    k[0x236..0x238].copy_from_slice(&0x0001u16.to_le_bytes()); // XLF_KERNEL_64
    k[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    k[0x258..0x260].copy_from_slice(&0x10_0000u64.to_le_bytes()); // pref_address
    k[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
    k.extend_from_slice(payload);
    k
}

fn boot(name: &str, memory: &str, kernel: &[u8]) -> String {
    let mut t = TestVm::new(name, &[memory]);
    let mut fds = Fds::default();
    let k = fds.add(memfd_with(kernel));
    let i = fds.add(memfd_with(INITRD));
    for c in [
        format!("kernel {k}"),
        format!("initrd {i}"),
        format!("cmdline {CMDLINE}"),
    ] {
        t.vm.execute(vmm_engine::Command::parse(&c).unwrap(), &mut fds)
            .unwrap();
    }
    t.run();
    assert_eq!(t.wait_exit(60), ExitReason::PowerOff, "{}", t.vm.status());
    assert!(t.vm.status().contains("boot_time_us="));
    t.drain()
}

fn expected(e820_ram: &[(u64, u64)], initrd_at: u64) -> String {
    let mut map = vec![
        (0u64, 0x9fc00u64, 1u32),
        (0x9fc00, 0x400, 2),
        (0xe0000, 0x20000, 2),
    ];
    for (i, (a, s)) in e820_ram.iter().enumerate() {
        map.push((*a, *s, 1));
        if i == 0 {
            // The PCIe configuration window (ECAM), between low and high RAM.
            map.push((0xe000_0000, 0x10_0000, 2));
        }
    }
    let mut s = String::from("linux64 boot_params 0x00007000\nloader 0xff version 0x020f\n");
    s += &format!("e820 0x{:02x}\n", map.len());
    for (a, l, t) in map {
        s += &format!("e820 0x{a:016x} 0x{l:016x} 0x{t:02x}\n");
    }
    s += &format!("cmdline '{CMDLINE}'\n");
    s += &format!(
        "initrd 0x{initrd_at:08x} 0x{:08x} '{}'\n",
        INITRD.len(),
        String::from_utf8_lossy(INITRD)
    );
    s += "rsdp 0x000f0000 ok\n";
    s
}

#[test]
fn elf_kernel_reports_boot_params() {
    if !kvm_or_skip() {
        return;
    }
    let out = boot("elf", "memory 256M", &guest("kernel.elf"));
    assert_eq!(
        out,
        expected(&[(0x10_0000, (256 << 20) - 0x10_0000)], 0x0fff_f000)
    );
}

#[test]
fn bzimage_kernel_reports_boot_params() {
    if !kvm_or_skip() {
        return;
    }
    let out = boot("bz", "memory 128M", &bzimage(&guest("kernel.bin")));
    assert_eq!(
        out,
        expected(&[(0x10_0000, (128 << 20) - 0x10_0000)], 0x07ff_f000)
    );
}

#[test]
fn large_memory_goes_above_4g() {
    if !kvm_or_skip() {
        return;
    }
    let out = boot("big", "memory 5G", &guest("kernel.elf"));
    assert_eq!(
        out,
        expected(
            &[(0x10_0000, 0xc000_0000 - 0x10_0000), (1 << 32, 2 << 30)],
            0x37ff_f000
        )
    );
}

#[test]
fn bad_kernels_are_refused() {
    if !kvm_or_skip() {
        return;
    }
    let t = TestVm::new("badk", &[]);
    let mut fds = Fds::default();
    let k = fds.add(memfd_with(b"not a kernel at all"));
    let e =
        t.vm.execute(vmm_engine::Command::Kernel(k), &mut fds)
            .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
}
