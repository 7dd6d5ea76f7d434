//! Integer narrowing whose truncation is the intent.
//!
//! Device registers are byte, word and dword windows onto wider values, and
//! x86-64 addresses split into 32-bit halves; these helpers say so once, so
//! that the rest of the engine has no `as` narrowing casts (the workspace
//! denies them by lint). Values that must fit but might not (a guest's length,
//! a user's size) go through `try_from` and an error path instead.

// The engine is an x86-64 KVM VMM: usize is 64 bits wide, so u64 <-> usize
// conversions are lossless.
const _: () = assert!(std::mem::size_of::<usize>() == std::mem::size_of::<u64>());

/// The low 8 bits of `v` (a byte lane of a register, a checksum byte).
#[allow(clippy::cast_possible_truncation)] // truncation is the intent
#[inline]
pub const fn low_u8(v: u64) -> u8 {
    v as u8
}

/// The low 16 bits of `v` (a word lane of a register).
#[allow(clippy::cast_possible_truncation)] // truncation is the intent
#[inline]
pub const fn low_u16(v: u64) -> u16 {
    v as u16
}

/// The low 32 bits of `v` (the low half of an address or register).
#[allow(clippy::cast_possible_truncation)] // truncation is the intent
#[inline]
pub const fn low_u32(v: u64) -> u32 {
    v as u32
}

/// The high 32 bits of `v`.
#[inline]
pub const fn high_u32(v: u64) -> u32 {
    low_u32(v >> 32)
}

/// Byte `i` (0 = least significant) of `v`, the byte lane at offset `i` of a
/// little-endian register. `i` must be below 8.
#[inline]
pub const fn byte(v: u64, i: usize) -> u8 {
    v.to_le_bytes()[i]
}

/// `v` as a usize: lossless, usize is 64 bits on the only target (asserted
/// above).
#[allow(clippy::cast_possible_truncation)] // lossless on x86-64, asserted above
#[inline]
pub const fn usize_from(v: u64) -> usize {
    v as usize
}

/// `v` as a u32 for a constant that fits. Only for constants, in a `const`
/// item or a `const { }` block, where the check runs at compile time (a
/// constant that does not fit fails the build); never for runtime values.
pub const fn const_u32(v: u64) -> u32 {
    assert!(v <= u32::MAX as u64, "constant does not fit in 32 bits");
    low_u32(v)
}

/// `v` as a u16 for a constant that fits (see [`const_u32`]).
pub const fn const_u16(v: u64) -> u16 {
    assert!(v <= u16::MAX as u64, "constant does not fit in 16 bits");
    low_u16(v)
}

/// `v` as a u8 for a constant that fits (see [`const_u32`]).
pub const fn const_u8(v: u64) -> u8 {
    assert!(v <= u8::MAX as u64, "constant does not fit in 8 bits");
    low_u8(v)
}

/// A file offset for pread/pwrite/fallocate. Offsets beyond `off_t::MAX`
/// become -1, which the kernel refuses with EINVAL, as the wrapping cast
/// used to (a negative offset) did.
#[inline]
pub fn off_t(v: u64) -> libc::off_t {
    libc::off_t::try_from(v).unwrap_or(-1)
}

/// The byte count of a successful read/write-like call (`n >= 0`, checked by
/// the caller); a negative `n` gives 0.
#[inline]
pub fn count(n: isize) -> usize {
    usize::try_from(n).unwrap_or(0)
}
