//! SMBIOS (DMTF DSP0134) for guests that find their firmware tables in the
//! BIOS area: a 32-bit entry point and the structures FreeBSD's bhyve writes
//! (usr.sbin/bhyve/smbiostbl.c), with bhyve's identity strings.
//!
//! Without SMBIOS a Linux guest says "DMI not present or invalid.", its
//! /sys/class/dmi/id is empty, and what identifies the machine from DMI
//! (systemd-detect-virt, udev's hardware database, dmidecode, cloud-init)
//! sees nothing. With these tables it sees what it sees under bhyve: system
//! "FreeBSD BHYVE", BIOS vendor "BHYVE". A guest not booted through EFI
//! finds the entry point by scanning 0xf0000..0xfffff on 16-byte
//! boundaries; `bios.rs` chooses the addresses.
//!
//! The version is 2.8: the structures use the extended memory sizes and
//! addresses of 2.7 and the memory voltages of 2.8, nothing of 3.x, so the
//! 32-bit entry point (its table below 4 GiB, as ours is) is enough.

use super::table::checksum;
use crate::cast;
use crate::command::Topology;
use crate::memory::GuestMemory;

#[cfg(test)]
mod tests;

const MAJOR: u8 = 2;
const MINOR: u8 = 8;
/// Length of the 2.1 (32-bit) entry point structure.
pub(super) const ENTRY_POINT_LEN: u8 = 0x1f;

/// Structure types (DSP0134 section 7).
pub(super) mod kind {
    pub const BIOS: u8 = 0;
    pub const SYSTEM: u8 = 1;
    pub const BOARD: u8 = 2;
    pub const CHASSIS: u8 = 3;
    pub const PROCESSOR: u8 = 4;
    pub const MEMORY_ARRAY: u8 = 16;
    pub const MEMORY_DEVICE: u8 = 17;
    pub const ARRAY_MAPPED: u8 = 19;
    pub const BOOT: u8 = 32;
    pub const END: u8 = 127;
}

// bhyve's strings: guests and tools recognise bhyve by them.
pub(super) const MANUFACTURER: &str = "FreeBSD";
pub(super) const PRODUCT: &str = "BHYVE";
pub(super) const BIOS_VENDOR: &str = "BHYVE";
pub(super) const BIOS_VERSION: &str = "14.0";
/// mm/dd/yyyy, the format the specification asks for.
pub(super) const BIOS_DATE: &str = "10/17/2021";
const VERSION: &str = "1.0";
const NONE: &str = "None";
const FAMILY: &str = "Virtual Machine";
/// What bhyve puts where it has nothing to say but a string is expected
/// (an empty string cannot be written: string number 0 means "none").
const BLANK: &str = " ";

/// A handle that refers to no structure ("not provided").
const NO_HANDLE: u16 = 0xfffe;
/// A cache handle meaning "no such cache structure".
const NO_CACHE: u16 = 0xffff;

/// Namespace of the name-based (version 5) UUIDs of virtual machines:
/// `uuidgen --sha1 --namespace 162fbfff-0df8-4ffb-a36f-a8a62096c3e7
/// --name NAME` prints the UUID a VM named NAME gets.
const VM_NAMESPACE: [u8; 16] = [
    0x16, 0x2f, 0xbf, 0xff, 0x0d, 0xf8, 0x4f, 0xfb, 0xa3, 0x6f, 0xa8, 0xa6, 0x20, 0x96, 0xc3, 0xe7,
];

/// What the tables describe.
pub(super) struct System<'a> {
    pub(super) topology: Topology,
    /// Guest RAM as (guest-physical start, length), lowest first.
    pub(super) ram: &'a [(u64, u64)],
    /// The system UUID, in RFC 4122 (big-endian) byte order.
    pub(super) uuid: [u8; 16],
}

/// The structure table and what the entry point says of it.
pub(super) struct StructureTable {
    pub(super) bytes: Vec<u8>,
    count: u16,
    max_size: u16,
    next_handle: u16,
}

impl StructureTable {
    /// A fresh handle: structures refer to each other by them.
    fn handle(&mut self) -> u16 {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    fn push(&mut self, s: Vec<u8>) {
        // A few hundred structures of at most a few hundred bytes (the
        // tests check the largest table): the fallbacks are never taken.
        self.max_size = self
            .max_size
            .max(u16::try_from(s.len()).unwrap_or(u16::MAX));
        self.count += 1;
        self.bytes.extend_from_slice(&s);
    }

    /// The table's length for the entry point's 16-bit field.
    pub(super) fn len_u16(&self) -> u16 {
        // At most about 19 KiB (255 sockets; checked in the tests).
        u16::try_from(self.bytes.len()).unwrap_or(u16::MAX)
    }
}

/// One structure under construction: the formatted area, header first,
/// then the string set its string fields number from 1.
struct Structure {
    area: Vec<u8>,
    strings: Vec<u8>,
    count: u8,
}

impl Structure {
    fn new(kind: u8, handle: u16) -> Structure {
        let mut area = Vec::with_capacity(64);
        area.extend_from_slice(&[kind, 0]); // length, set in finish
        area.extend_from_slice(&handle.to_le_bytes());
        Structure {
            area,
            strings: Vec::new(),
            count: 0,
        }
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.area.push(x);
        self
    }
    fn u16(&mut self, x: u16) -> &mut Self {
        self.area.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.area.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.area.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.area.extend_from_slice(b);
        self
    }
    /// A string field: `s` joins the string set, the field gets its number.
    /// `s` is one of ours: not empty, no NUL.
    fn string(&mut self, s: &str) -> &mut Self {
        self.count += 1;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        self.u8(self.count)
    }
    /// The formatted area with its length, then the string set and its
    /// terminating NUL (two NULs when there are no strings).
    fn finish(mut self) -> Vec<u8> {
        // Formatted areas are at most 0x2a bytes.
        self.area[1] = cast::low_u8(self.area.len() as u64);
        if self.strings.is_empty() {
            self.strings.push(0);
        }
        self.strings.push(0);
        self.area.extend_from_slice(&self.strings);
        self.area
    }
}

/// Type 0, BIOS information, as bhyve's: a 64 KiB BIOS at 0xf0000 that
/// supports ISA, PCI, shadowing, CD boot, EDD, ACPI and BBS, and says the
/// machine is virtual.
fn bios(handle: u16) -> Vec<u8> {
    const ISA: u64 = 1 << 4;
    const PCI: u64 = 1 << 7;
    const SHADOWING: u64 = 1 << 12;
    const CD_BOOT: u64 = 1 << 15;
    const EDD: u64 = 1 << 19;
    const EXT1_ACPI: u8 = 1 << 0;
    const EXT2_BBS: u8 = 1 << 0;
    const EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
    let mut s = Structure::new(kind::BIOS, handle);
    s.string(BIOS_VENDOR)
        .string(BIOS_VERSION)
        .u16(0xf000) // starting segment
        .string(BIOS_DATE)
        .u8(0) // ROM size: 64 KiB * (n + 1)
        .u64(ISA | PCI | SHADOWING | CD_BOOT | EDD)
        .u8(EXT1_ACPI)
        .u8(EXT2_BBS | EXT2_VIRTUAL_MACHINE)
        .u8(0) // BIOS release 0.0, as bhyve says
        .u8(0)
        .u8(0xff) // no embedded controller firmware
        .u8(0xff);
    s.finish()
}

/// Type 1, system information: who made it, what it is, and its UUID.
fn system(handle: u16, uuid: &[u8; 16]) -> Vec<u8> {
    const WAKE_UP_POWER_SWITCH: u8 = 6;
    let mut s = Structure::new(kind::SYSTEM, handle);
    s.string(MANUFACTURER)
        .string(PRODUCT)
        .string(VERSION)
        .string(NONE) // serial number
        .bytes(&smbios_uuid(uuid))
        .u8(WAKE_UP_POWER_SWITCH)
        .string(NONE) // SKU
        .string(FAMILY);
    s.finish()
}

/// Type 2, the baseboard (bhyve has one since FreeBSD 14): a motherboard,
/// the hosting board, in the chassis `chassis`.
fn board(handle: u16, chassis: u16) -> Vec<u8> {
    const HOSTING_BOARD: u8 = 1 << 0;
    const MOTHERBOARD: u8 = 0x0a;
    let mut s = Structure::new(kind::BOARD, handle);
    s.string(MANUFACTURER)
        .string(PRODUCT)
        .string(VERSION)
        .string(NONE) // serial number
        .string(NONE) // asset tag
        .u8(HOSTING_BOARD)
        .string(NONE) // location in the chassis
        .u16(chassis)
        .u8(MOTHERBOARD)
        .u8(0); // no contained objects
    s.finish()
}

/// Type 3, the chassis: of unknown type, in a safe state, without security.
fn chassis(handle: u16) -> Vec<u8> {
    const UNKNOWN: u8 = 2;
    const SAFE: u8 = 3;
    const NO_SECURITY: u8 = 3;
    let mut s = Structure::new(kind::CHASSIS, handle);
    s.string(MANUFACTURER)
        .u8(UNKNOWN)
        .string(VERSION)
        .string(NONE) // serial number
        .string(NONE) // asset tag
        .u8(SAFE) // boot-up state
        .u8(SAFE) // power supply state
        .u8(SAFE) // thermal state
        .u8(NO_SECURITY)
        .u32(0) // OEM-defined
        .u8(0) // height unspecified
        .u8(0) // power cords unspecified
        .u8(0) // no contained elements, of length 0
        .u8(0)
        .string(NONE); // SKU
    s.finish()
}

/// vCPUs per socket in `t`.
fn per_socket(t: &Topology) -> u32 {
    u32::from(t.cores.max(1)) * u32::from(t.threads.max(1))
}

/// Sockets that hold at least one vCPU: one type 4 each, as bhyve (whose
/// topology has no empty sockets) writes one per socket. Empty sockets are
/// left out: `cpus 1 sockets=1000` must not write a thousand structures.
pub(super) fn populated_sockets(t: &Topology) -> u32 {
    u32::from(t.cpus).div_ceil(per_socket(t))
}

/// A count for a processor's 8-bit fields; as bhyve, 0 ("unknown") for
/// counts above 254, which only SMBIOS 3.0's 16-bit fields can carry.
fn count_u8(n: u32) -> u8 {
    u8::try_from(n).ok().filter(|&c| c < 0xff).unwrap_or(0)
}

/// Type 4 for socket `socket`: "CPU #N", of the topology's cores and
/// threads, the cores that hold this socket's vCPUs enabled.
fn processor(handle: u16, socket: u32, t: &Topology) -> Vec<u8> {
    const CENTRAL: u8 = 3;
    const FAMILY_OTHER: u8 = 1;
    const POPULATED_ENABLED: u8 = 0x41;
    const UPGRADE_NONE: u8 = 6;
    const CAPABLE_64BIT: u16 = 1 << 2;
    let per = per_socket(t);
    let threads = u32::from(t.threads.max(1));
    let here = per.min(u32::from(t.cpus).saturating_sub(socket.saturating_mul(per)));
    let mut s = Structure::new(kind::PROCESSOR, handle);
    s.string(&format!("CPU #{socket}"))
        .u8(CENTRAL)
        .u8(FAMILY_OTHER)
        .string(BLANK) // manufacturer
        .u64(0) // processor id (CPUID leaf 1), as bhyve
        .string(BLANK) // version
        .u8(0) // voltage unknown
        .u16(0) // external clock, maximum and current speed unknown
        .u16(0)
        .u16(0)
        .u8(POPULATED_ENABLED)
        .u8(UPGRADE_NONE)
        .u16(NO_CACHE) // L1, L2, L3
        .u16(NO_CACHE)
        .u16(NO_CACHE)
        .string(NONE) // serial number
        .string(NONE) // asset tag
        .string(NONE) // part number
        .u8(count_u8(u32::from(t.cores.max(1))))
        .u8(count_u8(here.div_ceil(threads)))
        .u8(count_u8(per))
        .u16(CAPABLE_64BIT)
        .u16(u16::from(FAMILY_OTHER));
    s.finish()
}

/// Type 16, the physical memory array: system memory on the board, no
/// error correction, as large as the guest's RAM.
fn memory_array(handle: u16, total: u64, devices: u16) -> Vec<u8> {
    const ON_BOARD: u8 = 3;
    const SYSTEM_MEMORY: u8 = 3;
    const NO_ECC: u8 = 3;
    /// In the KiB field: "see the extended field (bytes)".
    const USE_EXTENDED: u32 = 0x8000_0000;
    let (kib, extended) = match u32::try_from(total >> 10) {
        Ok(k) if k < USE_EXTENDED => (k, 0),
        _ => (USE_EXTENDED, total),
    };
    let mut s = Structure::new(kind::MEMORY_ARRAY, handle);
    s.u8(ON_BOARD)
        .u8(SYSTEM_MEMORY)
        .u8(NO_ECC)
        .u32(kib)
        .u16(NO_HANDLE) // error information
        .u16(devices)
        .u64(extended);
    s.finish()
}

/// Type 17's size fields (Size, Extended Size) for `bytes`: KiB with bit
/// 15 set below 32 MiB, MiB below 32767 MiB, beyond that 0x7fff and the
/// size in MiB in the extended field (31 bits, up to 2 PiB).
pub(super) fn memory_device_size(bytes: u64) -> (u16, u32) {
    const KIB_GRANULARITY: u16 = 0x8000;
    const USE_EXTENDED: u16 = 0x7fff;
    let (kib, mib) = (bytes >> 10, bytes >> 20);
    if let Ok(k) = u16::try_from(kib) {
        if k < KIB_GRANULARITY {
            return (k | KIB_GRANULARITY, 0);
        }
    }
    match u16::try_from(mib) {
        Ok(m) if m < USE_EXTENDED => (m, 0),
        // Bit 31 is reserved: more than 2 PiB is said to be 2 PiB.
        _ => (
            USE_EXTENDED,
            u32::try_from(mib.min(0x7fff_ffff)).unwrap_or(0x7fff_ffff),
        ),
    }
}

/// Type 17, one memory device of all the guest's RAM in array `array`
/// (bhyve's single device; the strings are bhyve's).
fn memory_device(handle: u16, array: u16, total: u64) -> Vec<u8> {
    const FORM_UNKNOWN: u8 = 2;
    const TYPE_UNKNOWN: u8 = 2;
    const DETAIL_UNKNOWN: u16 = 1 << 2;
    let (size, extended) = memory_device_size(total);
    let mut s = Structure::new(kind::MEMORY_DEVICE, handle);
    s.u16(array)
        .u16(NO_HANDLE) // error information
        .u16(64) // total and data width in bits
        .u16(64)
        .u16(size)
        .u8(FORM_UNKNOWN)
        .u8(0) // not in a set
        .string(BLANK) // device locator
        .string(BLANK) // bank locator
        .u8(TYPE_UNKNOWN)
        .u16(DETAIL_UNKNOWN)
        .u16(0) // speed unknown
        .string(BLANK) // manufacturer
        .string(NONE) // serial number
        .string(NONE) // asset tag
        .string(NONE) // part number
        .u8(0) // rank unknown
        .u32(extended)
        .u16(0) // configured speed, minimum, maximum, configured voltage unknown
        .u16(0)
        .u16(0)
        .u16(0);
    s.finish()
}

/// Type 19's address fields for `len` bytes at `start`: first and last
/// KiB, or, from 4 TiB up where those do not fit, 0xffffffff in both and
/// the first and last byte in the extended fields.
pub(super) fn mapped_range_fields(start: u64, len: u64) -> (u32, u32, u64, u64) {
    const USE_EXTENDED: u32 = 0xffff_ffff;
    let last = start + len.max(1) - 1;
    match (u32::try_from(start >> 10), u32::try_from(last >> 10)) {
        (Ok(first_kib), Ok(last_kib)) if last_kib < USE_EXTENDED => (first_kib, last_kib, 0, 0),
        _ => (USE_EXTENDED, USE_EXTENDED, start, last),
    }
}

/// Type 19, one guest RAM range mapped to array `array`.
fn mapped_range(handle: u16, array: u16, start: u64, len: u64) -> Vec<u8> {
    let (first_kib, last_kib, first, last) = mapped_range_fields(start, len);
    let mut s = Structure::new(kind::ARRAY_MAPPED, handle);
    s.u32(first_kib)
        .u32(last_kib)
        .u16(array)
        .u8(1) // one device per row
        .u64(first)
        .u64(last);
    s.finish()
}

/// Type 32, system boot information: no errors.
fn boot_status(handle: u16) -> Vec<u8> {
    let mut s = Structure::new(kind::BOOT, handle);
    s.bytes(&[0; 6]).u8(0);
    s.finish()
}

/// The structure table for `sys`, in bhyve's order, ending with type 127.
pub(super) fn structures(sys: &System<'_>) -> StructureTable {
    let mut t = StructureTable {
        bytes: Vec::with_capacity(1024),
        count: 0,
        max_size: 0,
        next_handle: 0,
    };
    let h = t.handle();
    t.push(bios(h));
    let h = t.handle();
    t.push(system(h, &sys.uuid));
    let (board_handle, chassis_handle) = (t.handle(), t.handle());
    t.push(board(board_handle, chassis_handle));
    t.push(chassis(chassis_handle));
    for socket in 0..populated_sockets(&sys.topology) {
        let h = t.handle();
        t.push(processor(h, socket, &sys.topology));
    }
    let total = sys.ram.iter().map(|r| r.1).sum();
    let array = t.handle();
    t.push(memory_array(array, total, 1));
    let h = t.handle();
    t.push(memory_device(h, array, total));
    for &(start, len) in sys.ram {
        let h = t.handle();
        t.push(mapped_range(h, array, start, len));
    }
    let h = t.handle();
    t.push(boot_status(h));
    let h = t.handle();
    t.push(Structure::new(kind::END, h).finish());
    t
}

/// The 32-bit ("_SM_") entry point for `table` at guest-physical
/// `table_addr`, both checksums set.
pub(super) fn entry_point(table: &StructureTable, table_addr: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(usize::from(ENTRY_POINT_LEN));
    v.extend_from_slice(b"_SM_");
    v.push(0); // checksum of the whole structure
    v.push(ENTRY_POINT_LEN);
    v.extend_from_slice(&[MAJOR, MINOR]);
    v.extend_from_slice(&table.max_size.to_le_bytes());
    v.push(0); // entry point revision 0: the formatted area is reserved
    v.extend_from_slice(&[0; 5]);
    // The intermediate (legacy DMI) part, with a checksum of its own.
    v.extend_from_slice(b"_DMI_");
    v.push(0);
    v.extend_from_slice(&table.len_u16().to_le_bytes());
    v.extend_from_slice(&table_addr.to_le_bytes());
    v.extend_from_slice(&table.count.to_le_bytes());
    v.push((MAJOR << 4) | MINOR); // BCD revision
    v[0x15] = checksum(&v[0x10..]);
    v[4] = checksum(&v);
    v
}

/// The structure table for a VM of `topology` whose guest RAM is `mem`,
/// with `uuid` as the system's: what both the BIOS area and fw_cfg carry.
pub(super) fn for_guest(topology: &Topology, mem: &GuestMemory, uuid: [u8; 16]) -> StructureTable {
    let ram: Vec<(u64, u64)> = mem.regions().iter().map(|r| (r.gpa, r.len)).collect();
    structures(&System {
        topology: *topology,
        ram: &ram,
        uuid,
    })
}

/// The tables as fw_cfg hands them to UEFI firmware (QEMU's layout, which
/// OVMF reads): `etc/smbios/smbios-anchor`, the entry point, whose version
/// the firmware takes, and `etc/smbios/smbios-tables`, the structures,
/// which it installs and points its own entry point at (the address here
/// is 0). Without them OVMF publishes its own defaults instead of bhyve's.
pub fn fw_cfg_files(
    topology: &Topology,
    mem: &GuestMemory,
    uuid: [u8; 16],
) -> [(&'static str, Vec<u8>); 2] {
    let table = for_guest(topology, mem, uuid);
    let anchor = entry_point(&table, 0);
    [
        ("etc/smbios/smbios-anchor", anchor),
        ("etc/smbios/smbios-tables", table.bytes),
    ]
}

/// The UUID of the VM named `name`: name-based (RFC 4122 version 5), so a
/// VM keeps it across runs and re-creations (a guest's systemd may derive
/// its machine id from it), and VMs of different names differ. bhyve
/// hashes the name with the host name; here the host name is no help: a
/// worker process runs in a UTS namespace of its own named "vmm-worker".
pub fn vm_uuid(name: &str) -> [u8; 16] {
    uuid::Uuid::new_v5(&uuid::Uuid::from_bytes(VM_NAMESPACE), name.as_bytes()).into_bytes()
}

/// A UUID as SMBIOS 2.6 and later store it: the first three fields
/// little-endian, the rest as in RFC 4122.
fn smbios_uuid(u: &[u8; 16]) -> [u8; 16] {
    let mut v = *u;
    v[0..4].reverse();
    v[4..6].reverse();
    v[6..8].reverse();
    v
}
