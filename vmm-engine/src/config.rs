//! A VM's configuration as plain data: what the `vmm/NAME` commands
//! accumulate before `run` (Firecracker's `resources.rs`, Cloud Hypervisor's
//! `vm_config.rs`). Every rule here is checked without KVM; `builder.rs`
//! turns a validated configuration into KVM objects, devices and threads.

use crate::boot;
use crate::command::{PciSlot, Topology};
use crate::devices::PciEmulation;
use crate::error::{Error, Result};
use crate::firmware::BootVars;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Default guest RAM, as bhyve.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Largest kernel image accepted by `kernel`.
pub const MAX_KERNEL: u64 = 512 << 20;
/// Most PCI devices a VM takes (besides the host bridge): one bus's worth of
/// slots, as bhyve's pci_emul places them. Each holds descriptors and a
/// thread in the daemon, so the number is bounded.
pub const MAX_DEVICES: usize = 32;

/// Serial port descriptors.
#[derive(Debug)]
pub struct SerialFds {
    /// What the guest reads.
    pub input: Arc<OwnedFd>,
    /// Where the guest's output goes.
    pub output: Arc<OwnedFd>,
}

/// Platform options set with `set KEY=VALUE` (bhyve's configuration variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformOptions {
    /// `rtc.use_localtime`: the RTC shows local time (bhyve's default) or UTC (`-u`).
    pub rtc_localtime: bool,
    /// `x86.mptable`: write an MP table (`-Y` turns it off).
    pub mptable: bool,
    /// `lpc.fwcfg=qemu`: the platform UEFI firmware (OVMF) expects.
    pub fwcfg: bool,
    /// `uuid` (bhyve `-U`): the system UUID in SMBIOS, RFC 4122 byte order;
    /// otherwise one derived from the VM's name.
    pub uuid: Option<[u8; 16]>,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        PlatformOptions {
            rtc_localtime: true,
            mptable: true,
            fwcfg: false,
            uuid: None,
        }
    }
}

impl PlatformOptions {
    /// Apply one `set`; keys this engine has no use for are EOPNOTSUPP.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        if key == "lpc.fwcfg" {
            // bhyve's own firmware interface ("bhyve") is not provided:
            // that value means no fw_cfg at all.
            self.fwcfg = match value {
                "qemu" => true,
                "bhyve" => false,
                _ => {
                    return Err(Error::InvalidCommand(format!(
                        "lpc.fwcfg: '{value}' is neither qemu nor bhyve"
                    )))
                }
            };
            return Ok(());
        }
        if key == "uuid" {
            self.uuid = Some(parse_uuid(value)?);
            return Ok(());
        }
        let slot = match key {
            "rtc.use_localtime" => &mut self.rtc_localtime,
            "x86.mptable" => &mut self.mptable,
            _ => return Err(Error::Unsupported(format!("option '{key}'"))),
        };
        // bhyve's get_config_bool spellings.
        *slot = match value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => true,
            "false" | "no" | "off" | "0" => false,
            _ => {
                return Err(Error::InvalidCommand(format!(
                    "{key}: '{value}' is not a boolean"
                )))
            }
        };
        Ok(())
    }
}

/// A UUID in the one form FreeBSD's uuid_from_string(3) takes, as bhyve
/// `-U` gets it: 36 characters, hex digits in groups of 8-4-4-4-12.
fn parse_uuid(value: &str) -> Result<[u8; 16]> {
    let groups: Vec<&str> = value.split('-').collect();
    let shaped = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    match uuid::Uuid::try_parse(value) {
        Ok(u) if shaped => Ok(u.into_bytes()),
        _ => Err(Error::InvalidCommand(format!(
            "uuid: '{value}' is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        ))),
    }
}

/// What the commands before `run` accumulate.
pub struct VmConfig {
    /// vCPUs and their topology (`cpus`).
    pub topology: Topology,
    /// Guest RAM in bytes (`memory`).
    pub memory: u64,
    /// Size of the boot ROM mapped below 4 GiB (`bootrom`), if any.
    pub bootrom: Option<u64>,
    /// The UEFI variable store (`bootvars`).
    pub vars: Option<BootVars>,
    /// A Linux kernel image (`kernel`), checked to be a bzImage or an ELF.
    pub kernel: Option<Vec<u8>>,
    /// Its initial ramdisk (`initrd`).
    pub initrd: Option<Vec<u8>>,
    /// Its command line (`cmdline`).
    pub cmdline: String,
    /// COM1..COM4 (`serial`).
    pub serial: [Option<SerialFds>; 4],
    /// PCI functions by slot (`device`), at most one per slot.
    pub pci: Vec<(PciSlot, PciEmulation)>,
    /// `set KEY=VALUE`.
    pub options: PlatformOptions,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            topology: Topology {
                cpus: 1,
                sockets: 1,
                cores: 1,
                threads: 1,
            },
            memory: DEFAULT_MEMORY,
            bootrom: None,
            vars: None,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            serial: [None, None, None, None],
            pci: Vec::new(),
            options: PlatformOptions::default(),
        }
    }
}

impl VmConfig {
    /// `kernel`: keep an image that is a bzImage or an x86-64 ELF.
    pub fn set_kernel(&mut self, img: Vec<u8>) -> Result<()> {
        if !boot::linux::is_bzimage(&img) && !boot::linux::is_elf64(&img) {
            return Err(Error::InvalidCommand(
                "kernel is neither a bzImage nor an x86-64 ELF".into(),
            ));
        }
        self.kernel = Some(img);
        Ok(())
    }

    /// Largest initrd `initrd` reads.
    pub fn initrd_limit(&self) -> u64 {
        self.memory.min(MAX_KERNEL * 4)
    }

    /// `device` in `slot`: refused when the VM has its [`MAX_DEVICES`] and
    /// the slot is not one of them (a device replacing another is fine).
    pub fn check_device_room(&self, slot: PciSlot) -> Result<()> {
        if self.pci.len() >= MAX_DEVICES && !self.pci.iter().any(|(s, _)| *s == slot) {
            return Err(Error::InvalidCommand(format!(
                "at most {MAX_DEVICES} PCI devices per VM"
            )));
        }
        Ok(())
    }

    /// `device`: put `emulation` in `slot`, replacing what was there.
    pub fn add_device(&mut self, slot: PciSlot, emulation: PciEmulation) {
        self.pci.retain(|(s, _)| *s != slot);
        self.pci.push((slot, emulation));
    }

    /// Let go of the client's descriptors: consoles and devices.
    pub fn detach(&mut self) {
        self.serial = [None, None, None, None];
        // Device descriptors (disks, passt sockets, taps) go with the VM:
        // passt then sees its socket close and exits.
        self.pci.clear();
    }

    /// Which serial ports were given.
    pub fn serial_configured(&self) -> [bool; 4] {
        self.serial.each_ref().map(|s| s.is_some())
    }

    /// The checks `run` makes before it creates anything.
    pub fn validate(&self) -> Result<()> {
        if self.bootrom.is_none() && self.kernel.is_none() {
            return Err(Error::InvalidCommand(
                "nothing to boot: give a bootrom or a kernel".into(),
            ));
        }
        if self.vars.is_some() && !(self.bootrom.is_some() && self.options.fwcfg) {
            return Err(Error::InvalidCommand(
                "a variable store needs a boot ROM and lpc.fwcfg=qemu".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u8) -> PciSlot {
        PciSlot {
            bus: 0,
            slot: n,
            func: 0,
        }
    }

    #[test]
    fn every_protocol_set_key_is_accepted() {
        for key in vmm_protocol::command::SET_KEYS {
            let value = match *key {
                "lpc.fwcfg" => "qemu",
                "uuid" => "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
                _ => "true",
            };
            PlatformOptions::default().set(key, value).unwrap();
        }
        assert!(matches!(
            PlatformOptions::default().set("x86.strictmsr", "true"),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn options_take_bhyves_spellings() {
        let mut o = PlatformOptions::default();
        o.set("rtc.use_localtime", "No").unwrap();
        o.set("x86.mptable", "off").unwrap();
        o.set("lpc.fwcfg", "qemu").unwrap();
        assert_eq!(
            o,
            PlatformOptions {
                rtc_localtime: false,
                mptable: false,
                fwcfg: true,
                uuid: None,
            }
        );
        o.set("lpc.fwcfg", "bhyve").unwrap();
        assert!(!o.fwcfg);
        for (k, v) in [("x86.mptable", "maybe"), ("lpc.fwcfg", "uefi")] {
            assert_eq!(o.set(k, v).unwrap_err().errno(), libc::EINVAL);
        }
    }

    /// bhyve -U: the hyphenated form only, either case; anything else is
    /// EINVAL and leaves the UUID as it was.
    #[test]
    fn a_uuid_takes_freebsds_one_form() {
        let mut o = PlatformOptions::default();
        o.set("uuid", "6BA7B810-9dad-11d1-80b4-00c04fd430c8")
            .unwrap();
        let want = [
            0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4,
            0x30, 0xc8,
        ];
        assert_eq!(o.uuid, Some(want));
        for bad in [
            "",
            "6ba7b8109dad11d180b400c04fd430c8",
            "{6ba7b810-9dad-11d1-80b4-00c04fd430c8}",
            "urn:uuid:6ba7b810-9dad-11d1-80b4-00c04fd430c8",
            "6ba7b810-9dad-11d1-80b4-00c04fd430cg",
            "6ba7b810-9dad-11d1-80b4-00c04fd430c8-",
            "6ba7b81-09dad-11d1-80b4-00c04fd430c8",
        ] {
            assert_eq!(
                o.set("uuid", bad).unwrap_err().errno(),
                libc::EINVAL,
                "{bad}"
            );
            assert_eq!(o.uuid, Some(want), "{bad}");
        }
    }

    #[test]
    fn run_needs_something_to_boot() {
        let mut c = VmConfig::default();
        assert_eq!(c.validate().unwrap_err().errno(), libc::EINVAL);
        c.bootrom = Some(1 << 20);
        c.validate().unwrap();
    }

    #[test]
    fn kernel_must_be_bzimage_or_elf() {
        let mut c = VmConfig::default();
        assert_eq!(
            c.set_kernel(vec![0; 4096]).unwrap_err().errno(),
            libc::EINVAL
        );
        assert!(c.kernel.is_none());
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little-endian
        elf[18] = 62; // x86-64
        c.set_kernel(elf).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn initrd_limit_follows_memory() {
        let mut c = VmConfig::default();
        assert_eq!(c.initrd_limit(), DEFAULT_MEMORY);
        c.memory = 64 << 30;
        assert_eq!(c.initrd_limit(), MAX_KERNEL * 4);
    }

    #[test]
    fn devices_are_bounded_and_replace_by_slot() {
        let mut c = VmConfig::default();
        let max = u8::try_from(MAX_DEVICES).unwrap();
        for n in 0..max {
            c.check_device_room(slot(n)).unwrap();
            c.add_device(slot(n), PciEmulation::HostBridge);
        }
        assert_eq!(
            c.check_device_room(slot(max)).unwrap_err().errno(),
            libc::EINVAL
        );
        c.check_device_room(slot(3)).unwrap();
        c.add_device(slot(3), PciEmulation::Lpc);
        assert_eq!(c.pci.len(), MAX_DEVICES);
        assert!(matches!(c.pci.last(), Some((s, PciEmulation::Lpc)) if *s == slot(3)));
        c.detach();
        assert!(c.pci.is_empty());
    }
}
