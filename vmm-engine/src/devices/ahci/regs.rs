//! The ABAR's register map: the generic host control registers, each
//! port's registers and their bits, and the sizes the controller reports.

/// Size of the ABAR (BAR 5): generic registers and 32 ports of 0x80 bytes.
pub const ABAR_SIZE: u64 = 0x2000;
/// Where the port registers start, and each port's stride.
pub(super) const PORT_BASE: u64 = 0x100;
pub(super) const PORT_STRIDE: u64 = 0x80;
/// Command slots per port (CAP.NCS + 1).
pub const SLOTS: u32 = 32;
pub const MAX_PORTS: usize = 32;
/// Data moves between the backing file and guest RAM through this many
/// bytes at a time (per port, allocated once).
pub const BOUNCE: usize = 128 << 10;
/// Most PRDT entries a command may name (PRDTL is 16 bits).
pub const MAX_PRDT: usize = 65535;

// Generic host control.
pub(super) const CAP: u64 = 0x00;
pub(super) const GHC: u64 = 0x04;
pub(super) const IS: u64 = 0x08;
pub(super) const PI: u64 = 0x0c;
pub(super) const VS: u64 = 0x10;
pub(super) const GHC_HR: u32 = 1 << 0;
pub(super) const GHC_IE: u32 = 1 << 1;
pub(super) const GHC_AE: u32 = 1 << 31;

// Port registers (offsets inside a port).
pub(super) const P_CLB: u64 = 0x00;
pub(super) const P_CLBU: u64 = 0x04;
pub(super) const P_FB: u64 = 0x08;
pub(super) const P_FBU: u64 = 0x0c;
pub(super) const P_IS: u64 = 0x10;
pub(super) const P_IE: u64 = 0x14;
pub(super) const P_CMD: u64 = 0x18;
pub(super) const P_TFD: u64 = 0x20;
pub(super) const P_SIG: u64 = 0x24;
pub(super) const P_SSTS: u64 = 0x28;
pub(super) const P_SCTL: u64 = 0x2c;
pub(super) const P_SERR: u64 = 0x30;
pub(super) const P_SACT: u64 = 0x34;
pub(super) const P_CI: u64 = 0x38;

pub(super) const CMD_ST: u32 = 1 << 0;
pub(super) const CMD_SUD: u32 = 1 << 1;
pub(super) const CMD_POD: u32 = 1 << 2;
pub(super) const CMD_CLO: u32 = 1 << 3;
pub(super) const CMD_FRE: u32 = 1 << 4;
pub(super) const CMD_FR: u32 = 1 << 14;
pub(super) const CMD_CR: u32 = 1 << 15;
pub(super) const CMD_ATAPI: u32 = 1 << 24;

pub(super) const IS_DHRS: u32 = 1 << 0;
pub(super) const IS_PSS: u32 = 1 << 1;
pub(super) const IS_TFES: u32 = 1 << 30;

/// ATA status: busy; data request.
pub(super) const ST_BSY: u8 = 0x80;
pub(super) const ST_DRQ: u8 = 0x08;

/// Offset of the MSI capability in the function's configuration space.
pub const MSI_CAP: usize = 0x40;
