//! The controller driven as a guest driver would, on in-memory guest RAM:
//! commands that work, and hostile ones that must end in an error without
//! panicking, allocating or looping on guest-chosen sizes.

// Test code: casts of small fixed test values and test-side syscall results.
#![allow(clippy::cast_possible_truncation)]

use super::regs::*;
use super::transfer::{ST_ERR, ST_READY};
use super::*;
use crate::devices::virtio::test_utils::heap_peak;
use crate::memory::{memfd, GuestMemory, Region};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::Mutex;

const RAM: usize = 8 << 20;
const CLB: u64 = 0x1000;
const FB: u64 = 0x2000;
const CT: u64 = 0x4000;
const DATA: u64 = 0x10_0000;

#[derive(Default)]
struct Irqs {
    msi: Mutex<u32>,
    level: Mutex<bool>,
}

struct Recorder(Arc<Irqs>);

impl AhciIrq for Recorder {
    fn msi(&self, _address: u64, _data: u32) {
        *self.0.msi.lock().unwrap() += 1;
    }
    fn intx(&self, level: bool) {
        *self.0.level.lock().unwrap() = level;
    }
}

struct Guest {
    _ram: Vec<u8>,
    mem: GuestMemory,
    hba: Ahci,
    irqs: Arc<Irqs>,
}

fn disk(size: usize, fill: impl Fn(usize) -> u8) -> OwnedFd {
    let fd = memfd("disk", size as u64).unwrap();
    let data: Vec<u8> = (0..size).map(fill).collect();
    assert!(pwrite_all_at(&fd, &data, 0));
    fd
}

fn pwrite_all_at(fd: &OwnedFd, data: &[u8], at: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all_at(data, at).is_ok()
}

fn port(fd: OwnedFd, cd: bool) -> PortConfig {
    PortConfig {
        file: Arc::new(fd),
        cd,
        ro: cd,
        sector_size: if cd { (2048, 2048) } else { (512, 512) },
        serial: "SER123".into(),
        nmrr: 1,
    }
}

fn guest(ports: Vec<PortConfig>) -> Guest {
    let mut ram = vec![0u8; RAM];
    let mem = GuestMemory::new(vec![Region {
        gpa: 0,
        len: RAM as u64,
        host: ram.as_mut_ptr() as usize,
    }]);
    let irqs = Arc::new(Irqs::default());
    let mut hba = Ahci::new(
        AhciConfig { ports },
        mem.clone(),
        Box::new(Recorder(irqs.clone())),
    );
    // Interrupts on, port 0 set up and started, as a driver does.
    hba.write(GHC, &GHC_IE.to_le_bytes());
    let p = PORT_BASE;
    hba.write(p + P_CLB, &(CLB as u32).to_le_bytes());
    hba.write(p + P_FB, &(FB as u32).to_le_bytes());
    hba.write(p + P_IE, &u32::MAX.to_le_bytes());
    hba.write(p + P_CMD, &(CMD_FRE | CMD_ST).to_le_bytes());
    Guest {
        _ram: ram,
        mem,
        hba,
        irqs,
    }
}

fn reg(g: &mut Guest, off: u64) -> u32 {
    let mut b = [0u8; 4];
    g.hba.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Guest {
    /// Issue `cfis` (+ ATAPI `cdb`) in slot 0 with `prds` (address, bytes).
    fn issue(&mut self, cfis: [u8; 20], cdb: &[u8], write: bool, prds: &[(u64, u32)]) -> u32 {
        let mut hdr = [0u8; 32];
        let mut dw0 = 5u32 | ((prds.len() as u32) << 16);
        if write {
            dw0 |= 1 << 6;
        }
        if !cdb.is_empty() {
            dw0 |= 1 << 5;
        }
        hdr[0..4].copy_from_slice(&dw0.to_le_bytes());
        hdr[8..16].copy_from_slice(&CT.to_le_bytes());
        self.mem.write(CLB, &hdr).unwrap();
        let mut table = vec![0u8; 0x80 + 16 * prds.len()];
        table[..20].copy_from_slice(&cfis);
        table[0x40..0x40 + cdb.len()].copy_from_slice(cdb);
        for (i, (a, n)) in prds.iter().enumerate() {
            let e = &mut table[0x80 + 16 * i..0x90 + 16 * i];
            e[0..8].copy_from_slice(&a.to_le_bytes());
            e[12..16].copy_from_slice(&(n - 1).to_le_bytes());
        }
        self.mem.write(CT, &table).unwrap();
        self.hba.write(PORT_BASE + P_CI, &1u32.to_le_bytes());
        let mut prdbc = [0u8; 4];
        self.mem.read(CLB + 4, &mut prdbc).unwrap();
        u32::from_le_bytes(prdbc)
    }

    fn tfd(&mut self) -> u32 {
        reg(self, PORT_BASE + P_TFD)
    }
}

fn ata(cmd: u8, lba: u64, count: u16) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = 0x27;
    f[1] = 0x80;
    f[2] = cmd;
    f[4] = lba as u8;
    f[5] = (lba >> 8) as u8;
    f[6] = (lba >> 16) as u8;
    f[7] = 0x40;
    f[8] = (lba >> 24) as u8;
    f[9] = (lba >> 32) as u8;
    f[10] = (lba >> 40) as u8;
    f[12] = count as u8;
    f[13] = (count >> 8) as u8;
    f
}

fn ata_str(b: &[u8]) -> String {
    b.chunks(2)
        .flat_map(|w| [w[1], w[0]])
        .map(char::from)
        .collect::<String>()
        .trim_end()
        .to_string()
}

#[test]
fn registers_and_signature() {
    let mut g = guest(vec![
        port(disk(1 << 20, |_| 0), false),
        port(disk(4096, |_| 0), true),
    ]);
    let cap = reg(&mut g, CAP);
    assert_eq!(cap & 0x1f, 1, "two ports");
    assert_eq!((cap >> 8) & 0x1f, 31, "32 slots");
    assert_eq!(reg(&mut g, PI), 0b11);
    assert_eq!(reg(&mut g, VS), 0x0001_0300);
    assert_eq!(reg(&mut g, PORT_BASE + P_SSTS) & 0xf, 3);
    assert_eq!(reg(&mut g, PORT_BASE + P_SIG), 0x101);
    assert_eq!(reg(&mut g, PORT_BASE + PORT_STRIDE + P_SIG), 0xeb14_0101);
    // The signature FIS arrived when FIS receive was turned on.
    let mut fis = [0u8; 20];
    g.mem.read(FB + 0x40, &mut fis).unwrap();
    assert_eq!((fis[0], fis[2]), (0x34, ST_READY));
    // COMRESET: link down while DET=1, back with the signature after.
    g.hba.write(PORT_BASE + P_SCTL, &1u32.to_le_bytes());
    assert_eq!(reg(&mut g, PORT_BASE + P_SSTS), 0);
    g.hba.write(PORT_BASE + P_SCTL, &0u32.to_le_bytes());
    assert_eq!(reg(&mut g, PORT_BASE + P_SSTS) & 0xf, 3);
    assert_eq!(g.tfd() & 0xff, u32::from(ST_READY));
}

#[test]
fn identify_read_write_flush() {
    let mut g = guest(vec![port(disk(1 << 20, |i| (i / 512) as u8), false)]);
    assert_eq!(g.issue(ata(0xec, 0, 0), &[], false, &[(DATA, 512)]), 512);
    let mut id = [0u8; 512];
    g.mem.read(DATA, &mut id).unwrap();
    assert_eq!(ata_str(&id[54..94]), "BHYVE SATA DISK");
    assert_eq!(ata_str(&id[20..40]), "SER123");
    assert_eq!(
        u16::from_le_bytes([id[200], id[201]]),
        2048,
        "48-bit sectors"
    );
    assert_eq!(u16::from_le_bytes([id[434], id[435]]), 1, "nmrr");
    assert_eq!(id.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    // The PIO Setup FIS carries the ending status; INTx is raised.
    let mut ps = [0u8; 20];
    g.mem.read(FB + 0x20, &mut ps).unwrap();
    assert_eq!((ps[0], ps[15]), (0x5f, ST_READY));
    assert!(*g.irqs.level.lock().unwrap());
    assert_eq!(reg(&mut g, IS), 1);
    g.hba.write(PORT_BASE + P_IS, &u32::MAX.to_le_bytes());
    g.hba.write(IS, &1u32.to_le_bytes());
    assert!(!*g.irqs.level.lock().unwrap());
    // READ DMA EXT of sectors 3..5 into two buffers.
    assert_eq!(
        g.issue(
            ata(0x25, 3, 2),
            &[],
            false,
            &[(DATA, 700), (DATA + 0x1000, 324)]
        ),
        1024
    );
    let mut b = [0u8; 700];
    g.mem.read(DATA, &mut b).unwrap();
    assert_eq!((b[0], b[511], b[512], b[699]), (3, 3, 4, 4));
    // WRITE DMA EXT lands in the file; FLUSH succeeds.
    g.mem.write(DATA, &[0xab; 512]).unwrap();
    assert_eq!(g.issue(ata(0x35, 7, 1), &[], true, &[(DATA, 512)]), 512);
    assert_eq!(g.tfd() & 0xff, u32::from(ST_READY));
    g.issue(ata(0x25, 7, 1), &[], false, &[(DATA + 0x2000, 512)]);
    let mut r = [0u8; 512];
    g.mem.read(DATA + 0x2000, &mut r).unwrap();
    assert_eq!(r, [0xab; 512]);
    g.issue(ata(0xea, 0, 0), &[], false, &[]);
    assert_eq!(g.tfd() & 0xff, u32::from(ST_READY));
}

#[test]
fn cdrom_packets() {
    let iso = disk(16 * 2048, |i| (i / 2048) as u8 ^ 0x5a);
    let mut g = guest(vec![port(iso, true)]);
    // IDENTIFY DEVICE aborts (the host then knows a packet device).
    g.issue(ata(0xec, 0, 0), &[], false, &[(DATA, 512)]);
    assert_eq!(g.tfd() & 0xff, u32::from(ST_READY | ST_ERR));
    assert_eq!(g.issue(ata(0xa1, 0, 0), &[], false, &[(DATA, 512)]), 512);
    let mut id = [0u8; 2];
    g.mem.read(DATA, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes(id), 0x85c0);
    let pkt = ata(0xa0, 0, 0);
    // READ CAPACITY: last block 15, 2048-byte blocks.
    assert_eq!(g.issue(pkt, &[0x25], false, &[(DATA, 8)]), 8);
    let mut cap = [0u8; 8];
    g.mem.read(DATA, &mut cap).unwrap();
    assert_eq!(cap, [0, 0, 0, 15, 0, 0, 8, 0]);
    // READ(10) of blocks 2-3.
    let cdb = [0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0, 0, 0];
    assert_eq!(g.issue(pkt, &cdb, false, &[(DATA, 4096)]), 4096);
    let mut b = [0u8; 4096];
    g.mem.read(DATA, &mut b).unwrap();
    assert_eq!((b[0], b[2048]), (2 ^ 0x5a, 3 ^ 0x5a));
    // Past the end: CHECK CONDITION, then REQUEST SENSE says why.
    let cdb = [0x28, 0, 0, 0, 0, 15, 0, 0, 2, 0, 0, 0];
    g.issue(pkt, &cdb, false, &[(DATA, 4096)]);
    assert_eq!(g.tfd(), (0x50 << 8) | 0x51);
    g.issue(pkt, &[0x03, 0, 0, 0, 18], false, &[(DATA, 18)]);
    let mut s = [0u8; 18];
    g.mem.read(DATA, &mut s).unwrap();
    assert_eq!((s[2], s[12]), (5, 0x21));
    // INQUIRY: a removable CD/DVD device; unknown commands are illegal.
    g.issue(pkt, &[0x12, 0, 0, 0, 36], false, &[(DATA, 36)]);
    let mut inq = [0u8; 36];
    g.mem.read(DATA, &mut inq).unwrap();
    assert_eq!((inq[0], inq[1]), (5, 0x80));
    g.issue(pkt, &[0xff], false, &[]);
    assert_eq!(g.tfd() & 0xff, 0x51);
    // Writes to the medium are refused.
    g.issue(ata(0x35, 0, 1), &[], true, &[(DATA, 512)]);
    assert_eq!(g.tfd() & 0xff, 0x51);
}

#[test]
fn msi_when_enabled() {
    let mut g = guest(vec![port(disk(4096, |_| 0), false)]);
    let mut cfg = [0u8; 256];
    cfg[MSI_CAP + 2] = 1;
    cfg[MSI_CAP + 4..MSI_CAP + 8].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
    g.hba.config_written(&cfg);
    g.issue(ata(0xe7, 0, 0), &[], false, &[]);
    assert_eq!(*g.irqs.msi.lock().unwrap(), 1);
    assert!(!*g.irqs.level.lock().unwrap());
}

/// A hostile driver: tables outside RAM, out-of-range sectors, short and
/// bogus PRDTs, every slot issued at once, odd register accesses. Each
/// command ends with an error status and the controller keeps working.
#[test]
fn hostile_commands() {
    let mut g = guest(vec![port(disk(64 << 10, |_| 7), false)]);
    let err = u32::from(ST_READY | ST_ERR);
    // Sectors past the end, and 48-bit LBAs that would overflow.
    g.issue(ata(0x25, 127, 2), &[], false, &[(DATA, 1024)]);
    assert_eq!(g.tfd(), (0x10 << 8) | err);
    g.issue(ata(0x25, (1 << 48) - 1, 0), &[], false, &[(DATA, 512)]);
    assert_eq!(g.tfd() & 0xff, err);
    // A PRDT shorter than the transfer, and one whose buffer is not RAM.
    g.issue(ata(0x25, 0, 4), &[], false, &[(DATA, 512)]);
    assert_eq!(g.tfd() & 0xff, err);
    g.issue(ata(0x25, 0, 1), &[], false, &[(1 << 40, 512)]);
    assert_eq!(g.tfd() & 0xff, err);
    // 65535 PRDT entries claimed, none of them in RAM (the table runs off
    // the end of RAM): the walk stops at the first bad entry.
    let mut hdr = [0u8; 32];
    hdr[0..4].copy_from_slice(&(5u32 | (0xffff << 16)).to_le_bytes());
    hdr[8..16].copy_from_slice(&((RAM as u64) - 0x80).to_le_bytes());
    g.mem.write(CLB, &hdr).unwrap();
    g.mem.write(RAM as u64 - 0x80, &ata(0x25, 0, 1)).unwrap();
    g.hba.write(PORT_BASE + P_CI, &1u32.to_le_bytes());
    assert_eq!(g.tfd() & 0xff, err);
    // A 32 MiB read through 4 MiB PRDs that all alias one buffer: bounded
    // by the command, completes, and the controller allocates nothing for
    // it (data moves through the port's fixed buffer).
    let prds = [(DATA, 4 << 20); 8];
    let ((), heap) = heap_peak(|| {
        g.issue(ata(0x25, 0, 128), &[], false, &prds);
    });
    assert_eq!(g.tfd() & 0xff, u32::from(ST_READY));
    assert!(heap < 8 << 10, "a command held {heap} bytes of heap");
    // Every slot at once, headers pointing at garbage or outside RAM.
    g.mem.write(CLB, &[0xff; 1024]).unwrap();
    g.hba.write(PORT_BASE + P_CI, &u32::MAX.to_le_bytes());
    assert_eq!(reg(&mut g, PORT_BASE + P_CI), 0);
    // Command list and FIS areas outside RAM.
    g.hba.write(PORT_BASE + P_CLBU, &0xffffu32.to_le_bytes());
    g.hba.write(PORT_BASE + P_FBU, &0xffffu32.to_le_bytes());
    g.hba.write(PORT_BASE + P_CI, &1u32.to_le_bytes());
    assert_eq!(g.tfd() & 0xff, err);
    // Every register, every width, every value: no panic.
    for off in (0..ABAR_SIZE + 16).step_by(1) {
        for len in [1usize, 2, 4, 8] {
            let mut b = vec![0u8; len];
            g.hba.read(off, &mut b);
            g.hba.write(off, &vec![0xff; len]);
        }
    }
    // Host reset brings it back.
    g.hba.write(GHC, &GHC_HR.to_le_bytes());
    assert_eq!(reg(&mut g, GHC), GHC_AE);
    assert_eq!(reg(&mut g, PORT_BASE + P_SIG), 0x101);
}

#[test]
fn option_parsing() {
    let fds = std::cell::RefCell::new(Vec::new());
    let mut take = |n: i32| -> crate::error::Result<OwnedFd> {
        fds.borrow_mut().push(n);
        Ok(memfd("t", 4096).unwrap())
    };
    let o = |s: &str| s.split(',').map(String::from).collect::<Vec<_>>();
    let c = AhciConfig::configure(
        "ahci",
        &o("port=hd,fd=3,sectorsize=4096,ser=ABC,nmrr=1,port=cd,fd=4"),
        &mut take,
    )
    .unwrap();
    assert_eq!(c.ports.len(), 2);
    assert_eq!(c.ports[0].sector_size, (4096, 4096));
    assert!(c.ports[1].cd && c.ports[1].ro);
    let c = AhciConfig::configure("ahci-cd", &o("fd=5"), &mut take).unwrap();
    assert!(c.ports[0].cd);
    for bad in [
        "fd=3",
        "port=zz,fd=3",
        "port=hd",
        "port=hd,fd=3,sectorsize=1000",
        "port=hd,fd=3,ser=waytoolongserialnumber00",
        "port=hd,fd=-1",
        "port=hd,fd=3,bogus",
    ] {
        let before = fds.borrow().len();
        assert!(
            AhciConfig::configure("ahci", &o(bad), &mut take).is_err(),
            "{bad}"
        );
        // Options are refused before any descriptor is taken.
        if bad != "port=hd" {
            assert_eq!(fds.borrow().len(), before, "{bad}");
        }
    }
}
