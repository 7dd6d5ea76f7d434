//! An AHCI 1.3 SATA controller (bhyve's `ahci`, `ahci-hd`, `ahci-cd`): up
//! to 32 ports, each a disk (ATA) or a CD/DVD drive (ATAPI, read-only
//! media), behind a 32-bit memory BAR 5 (ABAR), interrupting by MSI or INTx.
//! Enough for Linux's `ahci` driver and UEFI firmware: no NCQ, no port
//! multiplier, no hot plug.
//!
//! Everything here is guest controlled: register offsets and values, the
//! command list and FIS addresses, the command tables and their PRDTs. A
//! command is carried out when the guest sets its bit in PxCI, on the
//! writing vCPU: its header and table are read from guest RAM with bounds
//! checks, the transfer length is the command's (at most 32 MiB), the PRDT
//! walk stops at the header's PRDTL entries or when the transfer is done,
//! and data moves through one buffer per port of [`BOUNCE`] bytes, allocated
//! with the device. Malformed commands complete with an ATA error (task
//! file error), never by stopping the VM.

pub mod ata;
mod atapi;
mod commands;
mod config;
mod function;
mod hba;
mod port;
mod regs;
mod transfer;

pub use config::AhciConfig;
pub use function::{function, KvmIrq};
pub use hba::{Ahci, AhciIrq};
pub use regs::{ABAR_SIZE, BOUNCE, MAX_PORTS, MAX_PRDT, MSI_CAP, SLOTS};
pub use transfer::{PortConfig, Prdt};

#[cfg(test)]
mod tests;
