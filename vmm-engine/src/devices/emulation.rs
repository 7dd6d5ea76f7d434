//! What a `device` command may name, resolved at configuration time: the
//! options parsed and checked, then the descriptors they name taken.

use super::{ahci, virtio};
use crate::error::{Error, Result};
use std::os::fd::OwnedFd;
use std::sync::Arc;

fn bad(msg: String) -> Error {
    Error::InvalidCommand(msg)
}

/// Emulation a `device` command may name, resolved at configuration time
/// (descriptors are taken then and kept across runs).
#[derive(Debug, Clone)]
pub enum PciEmulation {
    HostBridge,
    Lpc,
    VirtioBlk(virtio::blk::BlkConfig),
    VirtioNet(virtio::net::NetConfig),
    VirtioRnd,
    VirtioConsole(virtio::console::ConsoleConfig),
    Ahci(ahci::AhciConfig),
}

impl PciEmulation {
    /// Map a bhyve emulation name without options (tests, simple devices).
    pub fn parse(name: &str) -> Option<PciEmulation> {
        match name {
            "hostbridge" | "amd_hostbridge" => Some(PciEmulation::HostBridge),
            "lpc" => Some(PciEmulation::Lpc),
            "virtio-rnd" => Some(PciEmulation::VirtioRnd),
            _ => None,
        }
    }

    /// Resolve `device SLOT EMULATION OPTIONS`: descriptors (`fd=N`) are
    /// taken through `take`. `vm` and `slot` seed the default MAC.
    pub fn configure(
        vm: &str,
        slot: &str,
        emulation: &str,
        options: &[String],
        take: &mut dyn FnMut(i32) -> Result<OwnedFd>,
    ) -> Result<PciEmulation> {
        let o = Options::new(emulation, options);
        Ok(match emulation {
            "hostbridge" | "amd_hostbridge" => PciEmulation::HostBridge,
            "lpc" => PciEmulation::Lpc,
            "virtio-rnd" => PciEmulation::VirtioRnd,
            "virtio-blk" => PciEmulation::VirtioBlk(o.virtio_blk(take)?),
            "virtio-net" => PciEmulation::VirtioNet(o.virtio_net(vm, slot, take)?),
            "virtio-console" => PciEmulation::VirtioConsole(o.virtio_console(take)?),
            "ahci" | "ahci-hd" | "ahci-cd" => {
                PciEmulation::Ahci(ahci::AhciConfig::configure(emulation, options, take)?)
            }
            "passthru" => {
                return Err(Error::Unsupported(
                    "PCI passthrough needs an IOMMU; this engine cannot assign devices".into(),
                ))
            }
            other => return Err(Error::Unsupported(format!("device emulation '{other}'"))),
        })
    }
}

/// A device's `key[=value]` options, and the descriptors they name.
struct Options<'a> {
    emulation: &'a str,
    kv: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Options<'a> {
    fn new(emulation: &'a str, options: &'a [String]) -> Options<'a> {
        let kv = options
            .iter()
            .map(|o| match o.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (o.as_str(), None),
            })
            .collect();
        Options { emulation, kv }
    }

    fn get(&self, k: &str) -> Option<&'a str> {
        self.kv.iter().find(|(x, _)| *x == k).and_then(|(_, v)| *v)
    }

    fn has(&self, k: &str) -> bool {
        self.kv.iter().any(|(x, _)| *x == k)
    }

    /// Log the options this engine does not act on (bhyve accepts them).
    fn known(&self, list: &[&str]) {
        for (k, _) in &self.kv {
            if !list.contains(k) {
                log::warn!("{}: option '{k}' ignored", self.emulation);
            }
        }
    }

    fn fd_num(&self, s: &str) -> Result<i32> {
        s.parse::<i32>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| bad(format!("{}: bad descriptor '{s}'", self.emulation)))
    }

    fn need_fd(&self) -> Result<&'a str> {
        self.get("fd")
            .ok_or_else(|| bad(format!("{}: fd=N required", self.emulation)))
    }

    fn virtio_blk(
        &self,
        take: &mut dyn FnMut(i32) -> Result<OwnedFd>,
    ) -> Result<virtio::blk::BlkConfig> {
        self.known(&[
            "fd",
            "ro",
            "sectorsize",
            "nocache",
            "direct",
            "sync",
            "nodelete",
        ]);
        let sector_size = match self.get("sectorsize") {
            None => None,
            Some(s) => {
                let l = s.split('/').next().unwrap_or("");
                match l.parse::<u32>() {
                    Ok(n) if n.is_power_of_two() && (512..=32768).contains(&n) => Some(n),
                    _ => return Err(bad(format!("virtio-blk: bad sectorsize '{s}'"))),
                }
            }
        };
        // Options are checked before the descriptor is taken.
        let file = take(self.fd_num(self.need_fd()?)?)?;
        let ro = self.has("ro") || crate::files::opened_read_only(&file);
        Ok(virtio::blk::BlkConfig {
            file: Arc::new(file),
            ro,
            sector_size,
            discard: !self.has("nodelete"),
        })
    }

    fn virtio_net(
        &self,
        vm: &str,
        slot: &str,
        take: &mut dyn FnMut(i32) -> Result<OwnedFd>,
    ) -> Result<virtio::net::NetConfig> {
        self.known(&["fd", "slirp", "tap", "mac", "mtu", "open", "hostfwd"]);
        let backend = if self.has("slirp") {
            virtio::net::NetBackend::Slirp
        } else if self.has("tap") {
            virtio::net::NetBackend::Tap
        } else {
            return Err(bad("virtio-net: backend slirp or tap required".into()));
        };
        let mac = match self.get("mac") {
            Some(m) => virtio::net::parse_mac(m)
                .ok_or_else(|| bad(format!("virtio-net: bad mac '{m}'")))?,
            None => virtio::net::default_mac(vm, slot),
        };
        let fd = take(self.fd_num(self.need_fd()?)?)?;
        Ok(virtio::net::NetConfig {
            backend,
            fd: Arc::new(fd),
            mac,
        })
    }

    /// `fd=N` (both ways) or `fd=IN:OUT`.
    fn virtio_console(
        &self,
        take: &mut dyn FnMut(i32) -> Result<OwnedFd>,
    ) -> Result<virtio::console::ConsoleConfig> {
        self.known(&["fd"]);
        let spec = self.need_fd()?;
        let (input, output) = match spec.split_once(':') {
            Some((i, o)) => {
                let (i, o) = (self.fd_num(i)?, self.fd_num(o)?);
                let a = Arc::new(take(i)?);
                let b = if o == i {
                    a.clone()
                } else {
                    Arc::new(take(o)?)
                };
                (a, b)
            }
            None => {
                let a = Arc::new(take(self.fd_num(spec)?)?);
                (a.clone(), a)
            }
        };
        Ok(virtio::console::ConsoleConfig { input, output })
    }
}
