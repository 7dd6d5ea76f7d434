//! FreeBSD's vmmctl ioctl structures, byte for byte.

/// `VM_MAX_NAMELEN + 1`.
pub const NAME_FIELD: usize = 230;
/// `_IOWR('V', 0, struct vmmctl_vm_create)`.
pub const VMMCTL_VM_CREATE: u32 = 0xc128_5600;
/// `_IOWR('V', 1, struct vmmctl_vm_destroy)`.
pub const VMMCTL_VM_DESTROY: u32 = 0xc128_5601;
/// `VMMCTL_CREATE_DESTROY_ON_CLOSE`.
pub const CREATE_DESTROY_ON_CLOSE: u32 = 0x1;

// The request numbers are FreeBSD's `_IOWR('V', n, struct ...)`.
const _: () = assert!(iowr(b'V', 0, std::mem::size_of::<VmCreate>()) == VMMCTL_VM_CREATE);
const _: () = assert!(iowr(b'V', 1, std::mem::size_of::<VmDestroy>()) == VMMCTL_VM_DESTROY);

/// `struct vmmctl_vm_create`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VmCreate {
    pub name: [u8; NAME_FIELD],
    pub flags: u32,
    pub reserved: [i32; 15],
}

/// `struct vmmctl_vm_destroy`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VmDestroy {
    pub name: [u8; NAME_FIELD],
    pub reserved: [i32; 16],
}

/// `_IOWR(group, nr, size)` as Linux and FreeBSD encode it.
// The encoding keeps the size's low 13 bits, as the C macro does; the
// asserts above check the two numbers the suite uses.
#[allow(clippy::cast_possible_truncation, reason = "the ioctl number keeps the size's low 13 bits")]
pub const fn iowr(group: u8, nr: u8, size: usize) -> u32 {
    (3 << 30) | ((size as u32 & 0x1fff) << 16) | ((group as u32) << 8) | nr as u32
}

fn name_field(name: &[u8]) -> Result<[u8; NAME_FIELD], String> {
    if name.len() > NAME_FIELD {
        return Err(format!("name of {} bytes does not fit in char[{NAME_FIELD}]", name.len()));
    }
    let mut f = [0u8; NAME_FIELD];
    f[..name.len()].copy_from_slice(name);
    Ok(f)
}

impl VmCreate {
    /// A create request; `reserved_idx` sets that reserved word to 1.
    /// A name of exactly 230 bytes fills the field with no terminating NUL.
    pub fn new(name: &[u8], flags: u32, reserved_idx: Option<usize>) -> Result<VmCreate, String> {
        let mut reserved = [0i32; 15];
        if let Some(i) = reserved_idx {
            *reserved.get_mut(i).ok_or(format!("reserved index {i} out of 0..15"))? = 1;
        }
        Ok(VmCreate { name: name_field(name)?, flags, reserved })
    }
}

impl VmDestroy {
    /// A destroy request; `reserved_idx` sets that reserved word to 1.
    pub fn new(name: &[u8], reserved_idx: Option<usize>) -> Result<VmDestroy, String> {
        let mut reserved = [0i32; 16];
        if let Some(i) = reserved_idx {
            *reserved.get_mut(i).ok_or(format!("reserved index {i} out of 0..16"))? = 1;
        }
        Ok(VmDestroy { name: name_field(name)?, reserved })
    }
}

/// Issue `request` with `arg` on `fd`; Err(errno) on failure.
///
/// # Safety
/// `T` must be the structure the request expects (the kernel copies
/// `size_of::<T>()` bytes in and out).
pub unsafe fn ioctl<T>(fd: i32, request: u32, arg: &mut T) -> Result<(), i32> {
    // SAFETY: the caller guarantees `arg` matches `request`.
    let r = unsafe { libc::ioctl(fd, request as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_freebsd() {
        assert_eq!(size_of::<VmCreate>(), 296);
        assert_eq!(size_of::<VmDestroy>(), 296);
        assert_eq!(offset_of!(VmCreate, flags), 232);
        assert_eq!(offset_of!(VmCreate, reserved), 236);
        assert_eq!(offset_of!(VmDestroy, reserved), 232);
    }

    #[test]
    fn request_numbers() {
        assert_eq!(iowr(b'V', 0, size_of::<VmCreate>()), VMMCTL_VM_CREATE);
        assert_eq!(iowr(b'V', 1, size_of::<VmDestroy>()), VMMCTL_VM_DESTROY);
    }

    #[test]
    fn packing() {
        let c = VmCreate::new(b"vm1", CREATE_DESTROY_ON_CLOSE, Some(14)).unwrap();
        assert_eq!(&c.name[..4], b"vm1\0");
        assert_eq!(c.flags, 1);
        assert_eq!(c.reserved[14], 1);
        assert_eq!(c.reserved[..14], [0; 14]);
        let full = VmCreate::new(&[b'x'; 230], 0, None).unwrap();
        assert!(full.name.iter().all(|&b| b == b'x'), "230-byte name has no NUL");
        assert!(VmCreate::new(&[b'x'; 231], 0, None).is_err());
        assert!(VmCreate::new(b"a", 0, Some(15)).is_err());
        let d = VmDestroy::new(b"vm1", Some(15)).unwrap();
        assert_eq!(d.reserved[15], 1);
        assert!(VmDestroy::new(b"a", Some(16)).is_err());
    }
}
