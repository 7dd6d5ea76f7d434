//! Guest memory: memfd-backed segments, the guest-physical layout, and
//! bounds-checked host access used by the loaders and table writers.

use crate::cast;
use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Start of the PCI hole below 4 GiB; RAM beyond this goes above 4 GiB.
pub const PCI_HOLE_START: u64 = 0xC000_0000;
/// First address above the 32-bit space.
pub const FOUR_GIB: u64 = 1 << 32;
/// Largest bootrom accepted (as bhyve: it must fit below 4 GiB without
/// colliding with the PCI hole's devices).
pub const MAX_BOOTROM: u64 = 16 << 20;

/// Create a sealed-size memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| Error::InvalidCommand("bad name".into()))?;
    // SAFETY: plain syscall on a valid C string.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(size)
        .map_err(|_| Error::NoMemory(format!("{name}: size {size} too large")))?;
    // SAFETY: valid descriptor.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(Error::NoMemory(format!(
            "{name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

/// A host mapping that is unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Map `size` bytes of `fd` shared and writable.
    pub fn shared(fd: &OwnedFd, size: u64) -> Result<Mapping> {
        let len = usize::try_from(size).map_err(|_| Error::NoMemory("size".into()))?;
        // SAFETY: mapping a memfd we own; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::NoMemory(format!(
                "mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Mapping {
            addr: p as usize,
            len,
        })
    }

    /// Host address of the first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never made by [`Mapping::shared`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len describe a live mapping made by Mapping::shared.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

// SAFETY: a Mapping is just an address range; access goes through GuestMemory's
// bounds-checked copies.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// One guest-physical RAM range backed by host memory.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub gpa: u64,
    pub len: u64,
    pub host: usize,
}

/// Split `size` bytes of RAM around the PCI hole: (below 4 GiB, above 4 GiB).
pub fn ram_layout(size: u64) -> (u64, u64) {
    if size > PCI_HOLE_START {
        (PCI_HOLE_START, size - PCI_HOLE_START)
    } else {
        (size, 0)
    }
}

/// Host view of guest RAM for the VMM's own writes (loaders, ACPI tables).
/// Every access is bounds-checked: nothing here trusts a guest-provided address.
#[derive(Debug, Clone, Default)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl GuestMemory {
    pub fn new(regions: Vec<Region>) -> GuestMemory {
        GuestMemory { regions }
    }

    /// The RAM regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of RAM below 4 GiB.
    pub fn low_end(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.gpa < FOUR_GIB)
            .map(|r| r.gpa + r.len)
            .max()
            .unwrap_or(0)
    }

    /// Bytes of RAM at and above 4 GiB.
    pub fn high_len(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.gpa >= FOUR_GIB)
            .map(|r| r.len)
            .sum()
    }

    fn host_range(&self, gpa: u64, len: usize) -> Result<*mut u8> {
        let bad = || Error::InvalidCommand(format!("guest range {gpa:#x}+{len:#x} not in RAM"));
        let end = gpa.checked_add(len as u64).ok_or_else(bad)?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
            .ok_or_else(bad)?;
        Ok((r.host + cast::usize_from(gpa - r.gpa)) as *mut u8)
    }

    /// Copy `data` to guest-physical `gpa`; the whole range must be RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let p = self.host_range(gpa, data.len())?;
        // SAFETY: host_range checked that [p, p+len) lies in a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Fill `len` bytes at `gpa` with zero.
    pub fn zero(&self, gpa: u64, len: usize) -> Result<()> {
        let p = self.host_range(gpa, len)?;
        // SAFETY: as in write.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Ok(())
    }

    /// Read `buf.len()` bytes from `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.host_range(gpa, buf.len())?;
        // SAFETY: as in write.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// The same RAM as rust-vmm's `GuestMemoryMmap`, for the crates that
    /// take one (virtio-queue, linux-loader). The view borrows the mappings:
    /// they belong to the VM and outlive every user of the view.
    pub fn view(&self) -> Result<GuestMemoryMmap> {
        let fail = |e: String| Error::io("RAM view", std::io::Error::other(e));
        let mut rs = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let len = usize::try_from(r.len).map_err(|_| Error::NoMemory("RAM region".into()))?;
            // SAFETY: [host, host+len) is a live shared read-write mapping
            // (memory::Mapping::shared, or a test's buffer); build_raw does
            // not take ownership, so no munmap happens on drop.
            let m = unsafe {
                MmapRegion::build_raw(
                    r.host as *mut u8,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| fail(e.to_string()))?;
            rs.push(
                GuestRegionMmap::new(m, GuestAddress(r.gpa))
                    .ok_or_else(|| fail("bad region".into()))?,
            );
        }
        GuestMemoryMmap::from_regions(rs).map_err(|e| fail(e.to_string()))
    }
}

/// A memory segment: memfd-backed, shareable through vmmfs (`vmm.io/NAME.SEG`).
#[derive(Debug, Clone)]
pub struct Segment {
    /// Segment name (`sysmem`, `bootrom`, ...).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The memfd.
    pub fd: Arc<OwnedFd>,
}

impl Segment {
    /// A segment over `fd`.
    pub fn new(name: &str, size: u64, fd: OwnedFd) -> Segment {
        Segment {
            name: name.into(),
            size,
            fd: Arc::new(fd),
        }
    }

    /// Bytes the host has allocated for the segment (its memfd's blocks).
    pub fn allocated(&self) -> Option<u64> {
        // SAFETY: fstat on a descriptor the segment owns.
        let mut sb: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; sb is a valid stat buffer.
        (unsafe { libc::fstat(self.fd.as_raw_fd(), &mut sb) } == 0)
            .then(|| u64::try_from(sb.st_blocks).unwrap_or(0) * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_at_pci_hole() {
        assert_eq!(ram_layout(256 << 20), (256 << 20, 0));
        assert_eq!(ram_layout(3 << 30), (3 << 30, 0));
        assert_eq!(ram_layout(4 << 30), (3 << 30, 1 << 30));
    }

    #[test]
    fn guest_memory_is_bounds_checked() {
        let mut buf = vec![0u8; 4096];
        let gm = GuestMemory::new(vec![Region {
            gpa: 0x1000,
            len: 4096,
            host: buf.as_mut_ptr() as usize,
        }]);
        gm.write(0x1000, b"abc").unwrap();
        assert!(gm.write(0x1ffe, b"abc").is_err());
        assert!(gm.write(0xfff, b"a").is_err());
        assert!(gm.write(u64::MAX, b"a").is_err());
        let mut out = [0u8; 3];
        gm.read(0x1000, &mut out).unwrap();
        assert_eq!(&out, b"abc");
        drop(gm);
        assert_eq!(&buf[..3], b"abc");
    }
}
