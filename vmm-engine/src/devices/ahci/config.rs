//! A controller's ports as the device command gives them (`ahci-hd`,
//! `ahci-cd`, `ahci,hd:...,cd:...` with per-port options), checked and
//! resolved to descriptors.

use super::regs::MAX_PORTS;
use super::transfer::PortConfig;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// The ports of one controller, in port order.
#[derive(Debug, Clone)]
pub struct AhciConfig {
    pub ports: Vec<PortConfig>,
}

fn bad(msg: String) -> crate::error::Error {
    crate::error::Error::InvalidCommand(msg)
}

/// One port's options as given, before its descriptor is taken.
struct PortSpec {
    cd: bool,
    fd: Option<i32>,
    ro: bool,
    sector_size: (u32, u32),
    serial: Option<String>,
    nmrr: u16,
}

impl PortSpec {
    fn new(cd: bool) -> PortSpec {
        PortSpec {
            cd,
            fd: None,
            ro: cd,
            sector_size: (512, 512),
            serial: None,
            nmrr: 0,
        }
    }

    /// Apply option `o` (`k[=v]`) of `emulation` to this port.
    fn set(
        &mut self,
        emulation: &str,
        o: &str,
        k: &str,
        v: Option<&str>,
    ) -> crate::error::Result<()> {
        match (k, v) {
            ("fd", Some(n)) => {
                self.fd = Some(
                    n.parse::<i32>()
                        .ok()
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| bad(format!("{emulation}: bad descriptor '{n}'")))?,
                )
            }
            ("ro", None) => self.ro = true,
            ("sectorsize", Some(s)) => {
                let (l, ph) = s.split_once('/').unwrap_or((s, s));
                let ok = |x: &str| {
                    x.parse::<u32>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (512..=32768).contains(n))
                };
                match (ok(l), ok(ph)) {
                    (Some(l), Some(ph)) if ph >= l => self.sector_size = (l, ph),
                    _ => return Err(bad(format!("{emulation}: bad sectorsize '{s}'"))),
                }
            }
            ("ser", Some(s)) => {
                if s.len() > 20 || !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad(format!("{emulation}: bad serial '{s}'")));
                }
                self.serial = Some(s.to_string());
            }
            ("nmrr", Some(s)) => {
                self.nmrr = s
                    .parse()
                    .map_err(|_| bad(format!("{emulation}: bad nmrr '{s}'")))?
            }
            // Host caching choices of bhyve's block interface.
            ("nocache" | "direct" | "sync" | "nodelete", None) => {
                log::warn!("{emulation}: option '{k}' ignored")
            }
            _ => return Err(bad(format!("{emulation}: unknown option '{o}'"))),
        }
        Ok(())
    }

    /// Take the port's descriptor: port `i` of the controller.
    fn open(
        self,
        emulation: &str,
        i: usize,
        take: &mut dyn FnMut(i32) -> crate::error::Result<OwnedFd>,
    ) -> crate::error::Result<PortConfig> {
        let n = self
            .fd
            .ok_or_else(|| bad(format!("{emulation}: port {i}: fd=N required")))?;
        let file = take(n)?;
        let ro = self.ro || crate::files::opened_read_only(&file);
        Ok(PortConfig {
            file: Arc::new(file),
            cd: self.cd,
            ro,
            sector_size: if self.cd {
                (2048, 2048)
            } else {
                self.sector_size
            },
            serial: self.serial.unwrap_or_else(|| format!("BHYVE-{i:04}")),
            nmrr: self.nmrr,
        })
    }
}

impl AhciConfig {
    /// `device S ahci port=hd,fd=N[,ro][,sectorsize=L[/P]][,ser=S][,nmrr=R],port=cd,fd=M...`;
    /// `ahci-hd` and `ahci-cd` take one port's options without `port=`.
    /// Options are checked before descriptors are taken.
    pub fn configure(
        emulation: &str,
        options: &[String],
        take: &mut dyn FnMut(i32) -> crate::error::Result<OwnedFd>,
    ) -> crate::error::Result<AhciConfig> {
        let mut specs: Vec<PortSpec> = match emulation {
            "ahci-hd" => vec![PortSpec::new(false)],
            "ahci-cd" => vec![PortSpec::new(true)],
            _ => Vec::new(),
        };
        for o in options {
            let (k, v) = match o.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (o.as_str(), None),
            };
            if k == "port" {
                if emulation != "ahci" {
                    return Err(bad(format!("{emulation}: one port, no port= option")));
                }
                let cd = match v {
                    Some("hd") => false,
                    Some("cd") => true,
                    _ => return Err(bad(format!("ahci: bad port type '{o}'"))),
                };
                if specs.len() >= MAX_PORTS {
                    return Err(bad(format!("ahci: at most {MAX_PORTS} ports")));
                }
                specs.push(PortSpec::new(cd));
                continue;
            }
            let Some(p) = specs.last_mut() else {
                return Err(bad(format!("ahci: option '{o}' before any port=")));
            };
            p.set(emulation, o, k, v)?;
        }
        if specs.is_empty() {
            return Err(bad(format!("{emulation}: no port")));
        }
        let ports = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.open(emulation, i, take))
            .collect::<crate::error::Result<Vec<_>>>()?;
        Ok(AhciConfig { ports })
    }
}
