//! The SMBIOS tables read back as a guest reads them: the entry point found
//! by its anchor and checksums, every structure walked by its length and
//! string set, and (when it is installed) dmidecode's opinion.

use super::super::bios::{write_tables, SMBIOS_ADDR, SMBIOS_TABLE_ADDR, TABLES_END};
use super::*;
use crate::memory::{ram_layout, GuestMemory, Region, FOUR_GIB};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn topology(cpus: u16, sockets: u16, cores: u16, threads: u16) -> Topology {
    Topology {
        cpus,
        sockets,
        cores,
        threads,
    }
}

/// Guest RAM of `size` bytes as the engine lays it out around the PCI hole.
fn ram(size: u64) -> Vec<(u64, u64)> {
    let (low, high) = ram_layout(size);
    let mut v = vec![(0, low)];
    if high > 0 {
        v.push((FOUR_GIB, high));
    }
    v
}

fn table(t: Topology, size: u64) -> StructureTable {
    structures(&System {
        topology: t,
        ram: &ram(size),
        uuid: vm_uuid("vm1"),
    })
}

/// One structure as read back.
#[derive(Debug)]
struct Parsed {
    kind: u8,
    handle: u16,
    area: Vec<u8>,
    strings: Vec<String>,
    /// Formatted area and strings, in bytes.
    size: usize,
}

impl Parsed {
    fn u8(&self, off: usize) -> u8 {
        self.area[off]
    }
    fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes(self.area[off..off + 2].try_into().unwrap())
    }
    fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.area[off..off + 4].try_into().unwrap())
    }
    fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.area[off..off + 8].try_into().unwrap())
    }
    /// The string the string field at `off` names (number 0 is "none").
    fn string(&self, off: usize) -> Option<&str> {
        match usize::from(self.area[off]) {
            0 => None,
            n => Some(&self.strings[n - 1]),
        }
    }
}

/// Walk a structure table as Linux's dmi_decode_table does: the formatted
/// area by its length, then strings up to a double NUL. Panics on anything
/// malformed, and unless the table ends right after its last structure.
fn parse(t: &[u8]) -> Vec<Parsed> {
    let mut v = Vec::new();
    let mut p = 0;
    while p < t.len() {
        let len = usize::from(t[p + 1]);
        assert!(len >= 4, "structure at {p:#x} shorter than its header");
        let mut q = p + len;
        let mut strings = Vec::new();
        if t[q] == 0 {
            assert_eq!(t[q + 1], 0, "a string set without strings is two NULs");
            q += 2;
        } else {
            while t[q] != 0 {
                let end = q + t[q..].iter().position(|&c| c == 0).unwrap();
                strings.push(String::from_utf8(t[q..end].to_vec()).unwrap());
                q = end + 1;
            }
            q += 1;
        }
        v.push(Parsed {
            kind: t[p],
            handle: u16::from_le_bytes([t[p + 2], t[p + 3]]),
            area: t[p..p + len].to_vec(),
            strings,
            size: q - p,
        });
        p = q;
    }
    assert_eq!(p, t.len(), "the table ends inside a structure");
    v
}

fn of_kind(s: &[Parsed], kind: u8) -> Vec<&Parsed> {
    s.iter().filter(|x| x.kind == kind).collect()
}

fn one_of_kind(s: &[Parsed], kind: u8) -> &Parsed {
    let v = of_kind(s, kind);
    assert_eq!(v.len(), 1, "type {kind}");
    v[0]
}

#[test]
fn a_vm_uuid_is_name_based() {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // What `uuidgen --sha1 --namespace <VM_NAMESPACE> --name vm1` prints.
    assert_eq!(hex(&vm_uuid("vm1")), "a017cfa92eb85122986d841806485dbc");
    assert_ne!(vm_uuid("vm1"), vm_uuid("vm2"));
}

#[test]
fn entry_point_checksums_and_fields() {
    let t = table(topology(2, 2, 1, 1), 256 * MIB);
    let ep = entry_point(&t, 0xf_6020);
    assert_eq!(ep.len(), usize::from(ENTRY_POINT_LEN));
    assert_eq!(&ep[0..4], b"_SM_");
    assert_eq!(sum(&ep), 0);
    assert_eq!(ep[5], 0x1f);
    assert_eq!((ep[6], ep[7]), (2, 8));
    assert_eq!(&ep[0x10..0x15], b"_DMI_");
    assert_eq!(sum(&ep[0x10..0x1f]), 0);
    assert_eq!(ep[0x1e], 0x28);
    let parsed = parse(&t.bytes);
    let max = parsed.iter().map(|s| s.size).max().unwrap();
    assert_eq!(usize::from(u16::from_le_bytes([ep[8], ep[9]])), max);
    assert_eq!(
        usize::from(u16::from_le_bytes([ep[0x16], ep[0x17]])),
        t.bytes.len()
    );
    assert_eq!(
        u32::from_le_bytes(ep[0x18..0x1c].try_into().unwrap()),
        0xf_6020
    );
    assert_eq!(
        usize::from(u16::from_le_bytes([ep[0x1c], ep[0x1d]])),
        parsed.len()
    );
}

#[test]
fn structures_parse_back_with_bhyve_strings() {
    let s = parse(&table(topology(1, 1, 1, 1), 256 * MIB).bytes);
    let kinds: Vec<u8> = s.iter().map(|x| x.kind).collect();
    assert_eq!(kinds, [0, 1, 2, 3, 4, 16, 17, 19, 32, 127]);
    let mut handles: Vec<u16> = s.iter().map(|x| x.handle).collect();
    handles.sort_unstable();
    handles.dedup();
    assert_eq!(handles.len(), s.len(), "handles are unique");

    let bios = one_of_kind(&s, kind::BIOS);
    assert_eq!(bios.area.len(), 0x18);
    assert_eq!(bios.string(0x04), Some("BHYVE"));
    assert_eq!(bios.string(0x05), Some("14.0"));
    assert_eq!(bios.string(0x08), Some("10/17/2021"));
    assert_eq!(bios.u16(0x06), 0xf000);
    assert_eq!(bios.u64(0x0a), 0x0008_9090);
    assert_eq!((bios.u8(0x12), bios.u8(0x13)), (0x01, 0x11));

    let sys = one_of_kind(&s, kind::SYSTEM);
    assert_eq!(sys.area.len(), 0x1b);
    assert_eq!(sys.string(0x04), Some("FreeBSD"));
    assert_eq!(sys.string(0x05), Some("BHYVE"));
    assert_eq!(sys.string(0x06), Some("1.0"));
    assert_eq!(sys.string(0x07), Some("None"));
    assert_eq!(sys.string(0x1a), Some("Virtual Machine"));
    // a017cfa9-2eb8-5122-...: the first three fields little-endian.
    assert_eq!(
        &sys.area[0x08..0x18],
        &[
            0xa9, 0xcf, 0x17, 0xa0, 0xb8, 0x2e, 0x22, 0x51, 0x98, 0x6d, 0x84, 0x18, 0x06, 0x48,
            0x5d, 0xbc
        ]
    );

    let chassis = one_of_kind(&s, kind::CHASSIS);
    assert_eq!(chassis.area.len(), 0x16);
    assert_eq!(chassis.string(0x04), Some("FreeBSD"));
    assert_eq!(chassis.u8(0x05), 2, "type unknown");
    let board = one_of_kind(&s, kind::BOARD);
    assert_eq!(board.area.len(), 0x0f);
    assert_eq!(board.string(0x04), Some("FreeBSD"));
    assert_eq!(board.string(0x05), Some("BHYVE"));
    assert_eq!(board.u16(0x0b), chassis.handle);

    let cpu = one_of_kind(&s, kind::PROCESSOR);
    assert_eq!(cpu.area.len(), 0x2a);
    assert_eq!(cpu.string(0x04), Some("CPU #0"));
    assert_eq!((cpu.u8(0x23), cpu.u8(0x24), cpu.u8(0x25)), (1, 1, 1));

    let array = one_of_kind(&s, kind::MEMORY_ARRAY);
    assert_eq!(array.area.len(), 0x17);
    assert_eq!(array.u32(0x07), 256 << 10, "capacity in KiB");
    assert_eq!(array.u16(0x0d), 1, "one device");
    let dev = one_of_kind(&s, kind::MEMORY_DEVICE);
    assert_eq!(dev.area.len(), 0x28);
    assert_eq!(dev.u16(0x04), array.handle);
    assert_eq!((dev.u16(0x0c), dev.u32(0x1c)), (256, 0), "256 MiB");
    let map = one_of_kind(&s, kind::ARRAY_MAPPED);
    assert_eq!(map.area.len(), 0x1f);
    assert_eq!(map.u16(0x0c), array.handle);
    assert_eq!((map.u32(0x04), map.u32(0x08)), (0, (256 << 10) - 1));

    assert_eq!(one_of_kind(&s, kind::BOOT).area.len(), 0x0b);
    let end = s.last().unwrap();
    assert_eq!((end.kind, end.area.len(), end.size), (127, 4, 6));
}

#[test]
fn one_processor_per_populated_socket() {
    // (topology, [(cores, enabled cores, threads) of each socket])
    let cases = [
        (topology(4, 4, 1, 1), vec![(1, 1, 1); 4]),
        // 6 vCPUs in sockets of 2 cores x 2 threads: the second socket
        // holds 2 vCPUs, one core's worth.
        (topology(6, 2, 2, 2), vec![(2, 2, 4), (2, 1, 4)]),
        (topology(1, 1000, 1, 1), vec![(1, 1, 1)]),
        // More than 254 is "unknown" in SMBIOS 2.x.
        (topology(255, 1, 255, 1), vec![(0, 0, 0)]),
    ];
    for (t, want) in cases {
        let s = parse(&table(t, 256 * MIB).bytes);
        let cpus = of_kind(&s, kind::PROCESSOR);
        let got: Vec<(u8, u8, u8)> = cpus
            .iter()
            .map(|c| (c.u8(0x23), c.u8(0x24), c.u8(0x25)))
            .collect();
        assert_eq!(got, want, "{t:?}");
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(c.string(0x04), Some(format!("CPU #{i}").as_str()));
        }
    }
    let s = parse(&table(topology(255, 255, 1, 1), 256 * MIB).bytes);
    assert_eq!(of_kind(&s, kind::PROCESSOR).len(), 255);
    assert_eq!(s.last().unwrap().kind, kind::END);
}

#[test]
fn memory_size_fields() {
    assert_eq!(memory_device_size(16 * MIB), (0x8000 | (16 << 10), 0));
    assert_eq!(memory_device_size(256 * MIB), (256, 0));
    assert_eq!(memory_device_size(32766 * MIB), (32766, 0));
    assert_eq!(memory_device_size(32767 * MIB), (0x7fff, 32767));
    assert_eq!(memory_device_size(64 * GIB), (0x7fff, 64 << 10));
    assert_eq!(memory_device_size(u64::MAX), (0x7fff, 0x7fff_ffff));
    // Low RAM, RAM above 4 GiB, and a range beyond the 32-bit KiB fields.
    assert_eq!(mapped_range_fields(0, 3 * GIB), (0, (3 << 20) - 1, 0, 0));
    assert_eq!(
        mapped_range_fields(FOUR_GIB, 60 * GIB),
        (4 << 20, (64 << 20) - 1, 0, 0)
    );
    assert_eq!(
        mapped_range_fields(FOUR_GIB, 8 << 40),
        (0xffff_ffff, 0xffff_ffff, FOUR_GIB, FOUR_GIB + (8 << 40) - 1)
    );
}

/// The memory structures for RAM below the PCI hole only, split around it,
/// and large enough for the extended size.
#[test]
fn memory_structures_follow_the_layout() {
    for (size, ranges, dev_size) in [
        (256 * MIB, vec![(0, 256 * MIB)], (256u16, 0u32)),
        (
            6 * GIB,
            vec![(0, 3 * GIB), (FOUR_GIB, 3 * GIB)],
            (6 << 10, 0),
        ),
        (
            64 * GIB,
            vec![(0, 3 * GIB), (FOUR_GIB, 61 * GIB)],
            (0x7fff, 64 << 10),
        ),
    ] {
        let s = parse(&table(topology(1, 1, 1, 1), size).bytes);
        let array = one_of_kind(&s, kind::MEMORY_ARRAY);
        assert_eq!(u64::from(array.u32(0x07)), size >> 10);
        let dev = one_of_kind(&s, kind::MEMORY_DEVICE);
        assert_eq!((dev.u16(0x0c), dev.u32(0x1c)), dev_size);
        let maps: Vec<(u64, u64)> = of_kind(&s, kind::ARRAY_MAPPED)
            .iter()
            .map(|m| {
                let first = u64::from(m.u32(0x04)) << 10;
                let last = (u64::from(m.u32(0x08)) << 10) | 0x3ff;
                (first, last + 1 - first)
            })
            .collect();
        assert_eq!(maps, ranges, "{size:#x}");
    }
}

/// Guest RAM below `size` (the BIOS area included) in a host buffer,
/// which must outlive the GuestMemory.
fn guest(size: usize) -> (Vec<u8>, GuestMemory) {
    let mut buf = vec![0xaau8; size];
    let gm = GuestMemory::new(vec![Region {
        gpa: 0,
        len: size as u64,
        host: buf.as_mut_ptr() as usize,
    }]);
    (buf, gm)
}

/// write_tables as Linux's dmi_scan finds it: one "_SM_" anchor on a
/// 16-byte boundary in 0xf0000..0xfffff, both checksums right, the
/// table it points to walkable to its end-of-table, the rest of the area
/// zeroed (the RAM had other contents).
#[test]
fn guest_finds_the_entry_point() {
    let (_buf, gm) = guest(2 << 20);
    write_tables(&gm, &topology(2, 2, 1, 1), true, [true; 4], vm_uuid("vm1")).unwrap();
    let mut area = vec![0u8; 0x1_0000];
    gm.read(0xf_0000, &mut area).unwrap();
    let found: Vec<usize> = (0..area.len() - 32)
        .step_by(16)
        .filter(|&o| {
            let b = &area[o..o + 32];
            &b[0..4] == b"_SM_"
                && sum(&b[..usize::from(b[5])]) == 0
                && &b[16..21] == b"_DMI_"
                && sum(&b[16..31]) == 0
        })
        .collect();
    assert_eq!(found, [cast::usize_from(SMBIOS_ADDR - 0xf_0000)]);
    let ep = &area[found[0]..found[0] + 31];
    let addr = u64::from(u32::from_le_bytes(ep[0x18..0x1c].try_into().unwrap()));
    let len = usize::from(u16::from_le_bytes([ep[0x16], ep[0x17]]));
    assert_eq!(addr, SMBIOS_TABLE_ADDR);
    let mut t = vec![0u8; len];
    gm.read(addr, &mut t).unwrap();
    let s = parse(&t);
    assert_eq!(
        usize::from(u16::from_le_bytes([ep[0x1c], ep[0x1d]])),
        s.len()
    );
    assert_eq!(s.last().unwrap().kind, kind::END);
    assert_eq!(of_kind(&s, kind::PROCESSOR).len(), 2);
    let map = one_of_kind(&s, kind::ARRAY_MAPPED);
    assert_eq!(map.u32(0x08), (2 << 10) - 1, "all 2 MiB of RAM");
    let after = cast::usize_from(addr - 0xf_0000) + len;
    let end = cast::usize_from(TABLES_END - 0xf_0000);
    assert!(area[after..end].iter().all(|&b| b == 0));
    // The ACPI and MP tables before it are still whole.
    assert_eq!(&area[0..8], b"RSD PTR ");
    assert_eq!(sum(&area[0..20]), 0);
    assert_eq!(&area[0x30..0x34], b"_MP_");
    assert_eq!(sum(&area[0x30..0x40]), 0);
}

/// dmidecode reads the tables without a complaint, from a file laid out as
/// its `--dump-bin` writes one: the entry point at offset 0 pointing at the
/// table at offset 0x20. Skipped where dmidecode is not installed, but in CI.
#[test]
fn dmidecode_parses_the_tables() {
    let common = [
        "SMBIOS 2.8 present.",
        "\tVendor: BHYVE",
        "\tVersion: 14.0",
        "\tRelease Date: 10/17/2021",
        "\tManufacturer: FreeBSD",
        "\tProduct Name: BHYVE",
        "\tUUID: a017cfa9-2eb8-5122-986d-841806485dbc",
        "\tFamily: Virtual Machine",
        "End Of Table",
    ];
    let cases: [(Topology, u64, &[&str]); 2] = [
        (
            topology(6, 2, 2, 2),
            6 * GIB,
            &[
                "12 structures occupying",
                "\tSocket Designation: CPU #1",
                "\tCore Enabled: 1",
                "\tThread Count: 4",
                "\tMaximum Capacity: 6 GB",
                "\tSize: 6 GB",
                "\tStarting Address: 0x00100000000",
                "\tEnding Address: 0x001BFFFFFFF",
            ],
        ),
        (
            topology(255, 255, 1, 1),
            64 * GIB,
            &[
                "265 structures occupying",
                "\tSocket Designation: CPU #254",
                "\tMaximum Capacity: 64 GB",
                "\tSize: 64 GB",
                "\tEnding Address: 0x0103FFFFFFF",
                "\tRange Size: 61 GB",
            ],
        ),
    ];
    for (t, size, wanted) in cases {
        let Some(stdout) = dmidecode(&table(t, size)) else {
            eprintln!("SKIPPED: dmidecode_parses_the_tables: dmidecode not installed");
            return;
        };
        for want in common.iter().chain(wanted) {
            assert!(
                stdout.to_lowercase().contains(&want.to_lowercase()),
                "{want:?} not in\n{stdout}"
            );
        }
        for bad in ["OUT OF SPEC", "BAD INDEX", "Invalid", "TRUNCATED", "Wrong"] {
            assert!(!stdout.contains(bad), "{bad:?} in\n{stdout}");
        }
    }
}

/// What `dmidecode --from-dump` prints for `t`; None without dmidecode.
/// It must succeed with nothing on stderr (where its warnings go).
fn dmidecode(t: &StructureTable) -> Option<String> {
    let mut dump = entry_point(t, 0x20);
    dump.resize(0x20, 0);
    dump.extend_from_slice(&t.bytes);
    let path = std::env::temp_dir().join(format!("vmm-engine-smbios-{}.bin", std::process::id()));
    std::fs::write(&path, &dump).unwrap();
    let out = std::process::Command::new("dmidecode")
        .arg("--from-dump")
        .arg(&path)
        .output();
    let _ = std::fs::remove_file(&path);
    let out = match out {
        Ok(o) => o,
        // scripts/setup installs it: in CI its absence is a failure.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
            return None
        }
        Err(e) => panic!("dmidecode: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr, "", "dmidecode warned");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What UEFI firmware gets through fw_cfg: the same structures, and an
/// entry point with valid checksums that describes them (address 0: the
/// firmware places the table). A given UUID is the system's.
#[test]
fn firmware_gets_the_same_tables() {
    let (_buf, gm) = guest(2 << 20);
    let uuid = [0x11; 16];
    let [(anchor_name, anchor), (tables_name, tables)] =
        fw_cfg_files(&topology(2, 2, 1, 1), &gm, uuid);
    assert_eq!(
        (anchor_name, tables_name),
        ("etc/smbios/smbios-anchor", "etc/smbios/smbios-tables")
    );
    assert_eq!(&anchor[..4], b"_SM_");
    assert_eq!(anchor.len(), usize::from(ENTRY_POINT_LEN));
    assert_eq!(sum(&anchor), 0);
    assert_eq!(sum(&anchor[0x10..]), 0);
    assert_eq!(
        u32::from_le_bytes([anchor[0x18], anchor[0x19], anchor[0x1a], anchor[0x1b]]),
        0
    );
    assert_eq!(
        usize::from(u16::from_le_bytes([anchor[0x16], anchor[0x17]])),
        tables.len()
    );
    let s = parse(&tables);
    let kinds: Vec<u8> = s.iter().map(|x| x.kind).collect();
    assert_eq!(kinds, [0, 1, 2, 3, 4, 4, 16, 17, 19, 32, 127]);
    assert_eq!(&one_of_kind(&s, kind::SYSTEM).area[0x08..0x18], &[0x11; 16]);
}
