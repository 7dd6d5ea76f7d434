//! From bhyve's flat configuration to a VM plan: what to open and which
//! `vmm/NAME` commands to send. Pure (no I/O), so it is unit-tested.

use crate::config::Config;
use crate::error::{Error, Result};
pub use vmm_protocol::command::Topology;
use vmm_protocol::command::{Command, PciSlot};

/// Serial port back end (`lpc.comN.path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// The invoking process's stdin/stdout.
    Stdio,
    /// A tty (or any file) opened read-write as the invoking user.
    Path(String),
    /// `tcp=[IP:]PORT`: bhyve listens there (loopback unless an address is
    /// given) and relays one client at a time to the port.
    Tcp(String),
}

/// Network back end of a virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// User-mode NAT (passt), with `hostfwd` rules.
    Slirp { hostfwd: Vec<HostFwd>, open: bool },
    /// A Linux tap interface (`tapN`, or any name), via /dev/net/tun.
    Tap(String),
}

/// One `hostfwd=proto:hostaddr:hostport-guestaddr:guestport` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    pub host_addr: Option<String>,
    pub host_port: u16,
    pub guest_port: u16,
}

/// What a PCI device needs from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Nothing (hostbridge, lpc, virtio-rnd, virtio-console).
    None,
    /// A disk image or block device.
    Disk { path: String, ro: bool },
    /// A network back end.
    Net(NetBackend),
    /// PCI passthrough of host device bus/slot/function.
    Passthru { host: String },
    /// A virtio-console port: a UNIX socket bhyve listens on (`port1=PATH`).
    ConsolePort { path: String },
    /// AHCI ports in order: each a disk or a CD, its image and options.
    Ahci(Vec<AhciPort>),
}

/// One AHCI port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AhciPort {
    pub cd: bool,
    pub path: String,
    pub ro: bool,
    /// Engine options (`sectorsize=`, `ser=`, `nmrr=`, `nocache`...).
    pub options: Vec<String>,
}

/// One `-s` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub bus: u8,
    pub slot: u8,
    pub func: u8,
    pub emulation: String,
    pub backend: Backend,
    /// Options passed on to the engine (`ro`, `sectorsize=512`, `mac=...`).
    pub options: Vec<String>,
}

impl Device {
    /// The slot in the engine's command.
    pub fn pci_slot(&self) -> PciSlot {
        PciSlot {
            bus: self.bus,
            slot: self.slot,
            func: self.func,
        }
    }
}

/// Direct Linux boot (`linux.kernel`, `linux.initrd`, `linux.cmdline`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBoot {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    pub memsize: u64,
    /// The memory size as given (for the `memory` command).
    pub memsize_str: String,
    pub topology: Topology,
    pub bootrom: Option<String>,
    /// `lpc.bootvars`: the UEFI variable store file.
    pub bootvars: Option<String>,
    pub linux: Option<LinuxBoot>,
    pub com1: Option<Console>,
    pub com2: Option<Console>,
    pub com3: Option<Console>,
    pub com4: Option<Console>,
    pub devices: Vec<Device>,
    pub monitor: bool,
    pub destroy_on_poweroff: bool,
    /// Platform options sent as `set KEY=VALUE` (best effort).
    pub platform: Vec<(String, String)>,
}

/// Platform variables handed to the engine with `set`; the engine may ignore
/// those it has no use for.
const PLATFORM_VARS: &[&str] = &[
    "acpi_tables",
    "x86.vmexit_on_hlt",
    "x86.vmexit_on_pause",
    "x86.strictio",
    "x86.strictmsr",
    "x86.x2apic",
    "x86.mptable",
    "rtc.use_localtime",
    "virtio_msix",
    "memory.wired",
    "memory.guest_in_core",
    "uuid",
];

fn parse_int(var: &str, v: &str, min: u32, max: u32) -> Result<u32> {
    let bad = || Error::Config(format!("Invalid value for {var}: '{v}'"));
    let n = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(h, 16).map_err(|_| bad())?
    } else {
        v.parse::<u32>().map_err(|_| bad())?
    };
    if n < min || n > max {
        return Err(bad());
    }
    Ok(n)
}

/// bhyve's `calc_topology`.
pub fn topology(cfg: &Config) -> Result<Topology> {
    let get = |k: &str| -> Result<Option<u32>> {
        cfg.get(k)
            .map(|v| parse_int(k, v, 1, u32::from(u16::MAX)))
            .transpose()
    };
    let cpus = get("cpus")?;
    let cores = get("cores")?.unwrap_or(1);
    let threads = get("threads")?.unwrap_or(1);
    let sockets = get("sockets")?.unwrap_or(cpus.unwrap_or(1));
    let n = u64::from(sockets) * u64::from(cores) * u64::from(threads);
    let too_high = || Error::Config(format!("Computed number of vCPUs too high: {n}"));
    let vcpus = u16::try_from(n).map_err(|_| too_high())?;
    if let Some(c) = cpus {
        if u64::from(c) != n {
            return Err(Error::Config(format!(
                "Topology ({sockets} sockets, {cores} cores, {threads} threads) does not match {c} vCPUs"
            )));
        }
    }
    // Each factor is at least 1, so none exceeds their product.
    let fit = |v: u32| u16::try_from(v).map_err(|_| too_high());
    Ok(Topology {
        cpus: vcpus,
        sockets: fit(sockets)?,
        cores: fit(cores)?,
        threads: fit(threads)?,
    })
}

/// Parse `hostfwd` rules: `proto:hostaddr:hostport-guestaddr:guestport`,
/// several separated by `;`.
pub fn parse_hostfwd(s: &str) -> Result<Vec<HostFwd>> {
    let mut out = Vec::new();
    for rule in s.split(';').filter(|r| !r.is_empty()) {
        let bad = || Error::Config(format!("slirp: invalid hostfwd rule '{rule}'"));
        let (host, guest) = rule.split_once('-').ok_or_else(bad)?;
        let mut h = host.splitn(3, ':');
        let proto = h.next().ok_or_else(bad)?;
        let haddr = h.next().ok_or_else(bad)?;
        let hport = h.next().ok_or_else(bad)?;
        let udp = match proto {
            "tcp" | "" => false,
            "udp" => true,
            _ => return Err(bad()),
        };
        let (_gaddr, gport) = guest.rsplit_once(':').ok_or_else(bad)?;
        let host_port: u16 = hport.parse().map_err(|_| bad())?;
        let guest_port: u16 = gport.parse().map_err(|_| bad())?;
        if host_port == 0 || guest_port == 0 {
            return Err(bad());
        }
        out.push(HostFwd {
            udp,
            host_addr: (!haddr.is_empty()).then(|| haddr.to_string()),
            host_port,
            guest_port,
        });
    }
    Ok(out)
}

fn check_token(var: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == ',') {
        return Err(Error::Config(format!("Invalid value for {var}: '{v}'")));
    }
    Ok(())
}

fn device_from(cfg: &Config, b: u8, s: u8, f: u8, emul: &str) -> Result<Device> {
    let node = format!("pci.{b}.{s}.{f}");
    let mut options = Vec::new();
    let mut backend = Backend::None;
    let children = cfg.children(&node);
    let get = |k: &str| {
        children
            .iter()
            .find(|(ck, _)| ck == k)
            .map(|(_, v)| v.as_str())
    };
    let mut consumed: Vec<&str> = vec!["device"];
    match emul {
        "virtio-blk" => {
            let path = get("path").ok_or_else(|| {
                Error::Config(format!(
                    "virtio-blk: backing device required (pci slot {b}:{s}:{f})"
                ))
            })?;
            let ro = cfg.get_bool(&format!("{node}.ro"), false)?;
            backend = Backend::Disk {
                path: path.to_string(),
                ro,
            };
            consumed.extend(["path", "ro"]);
        }
        "virtio-net" => {
            let be = get("backend").ok_or_else(|| {
                Error::Config(format!(
                    "virtio-net: backend required (pci slot {b}:{s}:{f})"
                ))
            })?;
            consumed.extend(["backend", "hostfwd", "open"]);
            if be == "slirp" {
                backend = Backend::Net(NetBackend::Slirp {
                    hostfwd: get("hostfwd")
                        .map(parse_hostfwd)
                        .transpose()?
                        .unwrap_or_default(),
                    open: cfg.get_bool(&format!("{node}.open"), false)?,
                });
            } else if be.starts_with("tap") || be.starts_with("vmnet") {
                if be.len() > 15 {
                    return Err(Error::Config(format!(
                        "virtio-net: invalid tap name '{be}'"
                    )));
                }
                backend = Backend::Net(NetBackend::Tap(be.to_string()));
            } else {
                return Err(Error::Config(format!(
                    "virtio-net: unsupported backend '{be}' (slirp and tap are supported)"
                )));
            }
        }
        "virtio-console" => {
            // FreeBSD's ports are port.N.name/port.N.path (up to 16, with
            // names the guest sees through the multiport feature); this
            // engine's device has one port, whatever its name.
            let mut ports: Vec<&str> = children
                .iter()
                .filter_map(|(k, v)| {
                    let n = k.strip_prefix("port.")?.strip_suffix(".path")?;
                    n.parse::<u32>().ok().map(|_| v.as_str())
                })
                .collect();
            if ports.len() > 1 {
                return Err(Error::Config(format!(
                    "virtio-console: {} ports configured, one per device is supported (pci slot {b}:{s}:{f})",
                    ports.len()
                )));
            }
            if let Some(path) = ports.pop() {
                backend = Backend::ConsolePort {
                    path: path.to_string(),
                };
            }
            let port_keys: Vec<&str> = children
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| k.starts_with("port."))
                .collect();
            consumed.extend(port_keys);
        }
        "ahci" | "ahci-hd" | "ahci-cd" => {
            let mut ports = Vec::new();
            for n in 0..crate::config::AHCI_MAX_PORTS {
                let pn = format!("port.{n}");
                let pget = |k: &str| get(&format!("{pn}.{k}"));
                let Some(ty) = pget("type") else { break };
                let cd = match ty {
                    "hd" => false,
                    "cd" => true,
                    _ => {
                        return Err(Error::Config(format!(
                            "ahci: pci slot {b}:{s}:{f} port {n}: unknown type \"{ty}\""
                        )))
                    }
                };
                let path = pget("path").ok_or_else(|| {
                    Error::Config(format!(
                        "ahci: pci slot {b}:{s}:{f} port {n}: backing device required"
                    ))
                })?;
                let ro = cd || cfg.get_bool(&format!("{node}.{pn}.ro"), false)?;
                let mut options = Vec::new();
                for (k, v) in children
                    .iter()
                    .filter_map(|(k, v)| k.strip_prefix(&format!("{pn}.")).map(|k| (k, v)))
                {
                    match k {
                        "type" | "path" | "ro" => {}
                        "nocache" | "direct" | "nodelete" | "sync" => options.push(k.to_string()),
                        "sectorsize" | "ser" | "nmrr" => {
                            check_token(k, v)?;
                            options.push(format!("{k}={v}"));
                        }
                        // bootindex: UEFI firmware boots in its own order here.
                        "bootindex" => {}
                        other => {
                            return Err(Error::Config(format!(
                                "ahci: pci slot {b}:{s}:{f} port {n}: unknown option \"{other}\""
                            )))
                        }
                    }
                }
                ports.push(AhciPort {
                    cd,
                    path: path.to_string(),
                    ro,
                    options,
                });
            }
            if ports.is_empty() {
                return Err(Error::Config(format!(
                    "ahci: pci slot {b}:{s}:{f}: no ports configured"
                )));
            }
            let keys: Vec<&str> = children
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| k.starts_with("port."))
                .collect();
            consumed.extend(keys);
            backend = Backend::Ahci(ports);
        }
        "passthru" => {
            let host =
                if let (Some(hb), Some(hs), Some(hf)) = (get("bus"), get("slot"), get("func")) {
                    format!("{hb}/{hs}/{hf}")
                } else if let Some(p) = get("pptdev") {
                    p.to_string()
                } else {
                    return Err(Error::Config(format!(
                        "passthru: missing host device (pci slot {b}:{s}:{f})"
                    )));
                };
            consumed.extend(["bus", "slot", "func", "pptdev"]);
            backend = Backend::Passthru { host };
        }
        _ => {}
    }
    for (k, v) in &children {
        if consumed.contains(&k.as_str()) || k.contains('.') {
            continue;
        }
        check_token(&format!("{node}.{k}"), v)?;
        if v == "true" {
            options.push(k.clone());
        } else {
            options.push(format!("{k}={v}"));
        }
    }
    if let Backend::Disk { ro: true, .. } = backend {
        options.insert(0, "ro".into());
    }
    Ok(Device {
        bus: b,
        slot: s,
        func: f,
        emulation: emul.to_string(),
        backend,
        options,
    })
}

fn console(cfg: &Config, port: &str) -> Option<Console> {
    cfg.get(&format!("lpc.{port}.path")).map(|p| {
        if p == "stdio" {
            Console::Stdio
        } else if let Some(a) = p.strip_prefix("tcp=") {
            Console::Tcp(a.to_string())
        } else {
            Console::Path(p.to_string())
        }
    })
}

/// Build the plan; errors carry bhyve's messages and exit statuses.
pub fn plan(cfg: &Config) -> Result<Plan> {
    let name = cfg.get("name").ok_or(Error::Usage(None))?.to_string();
    let topology = topology(cfg)?;
    let memsize_str = cfg.get("memory.size").unwrap_or("256M").to_string();
    let memsize = crate::memsize::parse_memsize(&memsize_str)
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::BadOption(format!("invalid memsize '{memsize_str}'")))?;
    let bootrom = cfg.get("lpc.bootrom").map(String::from);
    let bootvars = cfg.get("lpc.bootvars").map(String::from);
    if bootvars.is_some() && bootrom.is_none() {
        return Err(Error::Config("lpc.bootvars requires lpc.bootrom".into()));
    }
    let linux = cfg.get("linux.kernel").map(|k| LinuxBoot {
        kernel: k.to_string(),
        initrd: cfg.get("linux.initrd").map(String::from),
        cmdline: cfg.get("linux.cmdline").map(String::from),
    });
    if linux.is_none() && (cfg.get("linux.initrd").is_some() || cfg.get("linux.cmdline").is_some())
    {
        return Err(Error::Config(
            "linux.initrd and linux.cmdline require linux.kernel".into(),
        ));
    }
    if linux.is_some() && bootrom.is_some() {
        return Err(Error::Config(
            "lpc.bootrom and linux.kernel are mutually exclusive".into(),
        ));
    }
    let [com1, com2, com3, com4] = ["com1", "com2", "com3", "com4"].map(|c| console(cfg, c));
    // One port may have stdio; FreeBSD names the second that asks for it.
    for (i, c) in [&com2, &com3, &com4].into_iter().enumerate() {
        let earlier = [&com1, &com2, &com3][..=i]
            .iter()
            .any(|e| **e == Some(Console::Stdio));
        if *c == Some(Console::Stdio) && earlier {
            return Err(Error::Config(format!(
                "Unable to initialize backend 'stdio' for LPC device com{}: stdio is already in use",
                i + 2
            )));
        }
    }
    let mut devices = Vec::new();
    for (k, emul) in cfg.children("pci") {
        let Some(prefix) = k.strip_suffix(".device") else {
            continue;
        };
        let nums: Vec<u8> = prefix
            .split('.')
            .map(|p| p.parse::<u8>().ok())
            .collect::<Option<_>>()
            .unwrap_or_default();
        let [b, s, f] = nums.as_slice() else {
            return Err(Error::Config(format!("invalid PCI config node pci.{k}")));
        };
        if *s > 31 || *f > 7 {
            return Err(Error::Config(format!("invalid PCI config node pci.{k}")));
        }
        if !crate::config::PCI_EMULATIONS.contains(&emul.as_str()) {
            return Err(Error::Config(format!(
                "pci slot {b}:{s}:{f}: unknown device \"{emul}\""
            )));
        }
        devices.push(device_from(cfg, *b, *s, *f, &emul)?);
    }
    devices.sort_by_key(|d| (d.bus, d.slot, d.func));
    let mut platform = Vec::new();
    for var in PLATFORM_VARS {
        if let Some(v) = cfg.get(var) {
            check_token(var, v)?;
            platform.push((var.to_string(), v.to_string()));
        }
    }
    // A boot ROM here is UEFI firmware built for QEMU's fw_cfg (OVMF):
    // the engine has QEMU's interface only, so FreeBSD's default
    // lpc.fwcfg=bhyve gets it too.
    if bootrom.is_some() {
        platform.push(("lpc.fwcfg".into(), "qemu".into()));
    }
    Ok(Plan {
        name,
        memsize,
        memsize_str,
        topology,
        bootrom,
        bootvars,
        linux,
        com1,
        com2,
        com3,
        com4,
        devices,
        monitor: cfg.get_bool("monitor", false)?,
        destroy_on_poweroff: cfg.get_bool("destroy_on_poweroff", false)?,
        platform,
    })
}

impl Plan {
    /// Whether bhyve creates and configures the VM itself (boot ROM or direct
    /// Linux boot). Otherwise the VM must exist, prepared by bhyveload(8).
    pub fn self_booting(&self) -> bool {
        self.bootrom.is_some() || self.linux.is_some()
    }

    /// `cpus` command.
    pub fn cpus_command(&self) -> Command {
        Command::Cpus(self.topology)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        let mut c = Config::with_defaults();
        c.set("name", "vm1");
        for (k, v) in pairs {
            c.set(k, v);
        }
        c
    }

    #[test]
    fn topology_like_bhyve() {
        let t = topology(&cfg(&[("cpus", "4")])).unwrap();
        assert_eq!((t.cpus, t.sockets, t.cores, t.threads), (4, 4, 1, 1));
        let t = topology(&cfg(&[("cpus", "4"), ("sockets", "2"), ("cores", "2")])).unwrap();
        assert_eq!((t.cpus, t.sockets, t.cores), (4, 2, 2));
        let t = topology(&cfg(&[("sockets", "2"), ("threads", "2")])).unwrap();
        assert_eq!(t.cpus, 4);
        let e = topology(&cfg(&[("cpus", "3"), ("sockets", "2")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Topology (2 sockets, 1 cores, 1 threads) does not match 3 vCPUs"
        );
        assert!(topology(&cfg(&[("cpus", "0")])).is_err());
        assert!(topology(&cfg(&[("cpus", "x")])).is_err());
        assert!(topology(&cfg(&[("cpus", "70000")])).is_err());
        assert!(topology(&cfg(&[("sockets", "300"), ("cores", "300")])).is_err());
        let t = topology(&cfg(&[])).unwrap();
        assert_eq!(t.cpus, 1);
    }

    #[test]
    fn devices_and_consoles() {
        let mut c = cfg(&[("lpc.com1.path", "stdio"), ("lpc.bootrom", "/r.bin")]);
        c.parse_pci_slot("0,hostbridge").unwrap();
        c.parse_pci_slot("3,virtio-blk,/d.img,ro,sectorsize=4096")
            .unwrap();
        c.parse_pci_slot("2,virtio-net,slirp,hostfwd=tcp:127.0.0.1:2222-:22;udp::53-:53")
            .unwrap();
        c.parse_pci_slot("4,virtio-net,tap7,mac=00:a0:98:00:00:01")
            .unwrap();
        c.parse_pci_slot("5,virtio-rnd").unwrap();
        let p = plan(&c).unwrap();
        assert_eq!(p.com1, Some(Console::Stdio));
        assert!(p.self_booting());
        assert_eq!(p.devices.len(), 5);
        assert_eq!(p.devices[0].emulation, "hostbridge");
        let net = &p.devices[1];
        assert_eq!(net.slot, 2);
        match &net.backend {
            Backend::Net(NetBackend::Slirp { hostfwd, .. }) => {
                assert_eq!(hostfwd.len(), 2);
                assert_eq!(hostfwd[0].host_addr.as_deref(), Some("127.0.0.1"));
                assert_eq!((hostfwd[0].host_port, hostfwd[0].guest_port), (2222, 22));
                assert!(hostfwd[1].udp);
            }
            other => panic!("{other:?}"),
        }
        let blk = &p.devices[2];
        assert_eq!(
            blk.backend,
            Backend::Disk {
                path: "/d.img".into(),
                ro: true
            }
        );
        assert_eq!(
            blk.options,
            vec!["ro".to_string(), "sectorsize=4096".to_string()]
        );
        assert_eq!(
            p.devices[3].backend,
            Backend::Net(NetBackend::Tap("tap7".into()))
        );
        assert_eq!(
            p.devices[3].options,
            vec!["mac=00:a0:98:00:00:01".to_string()]
        );
        assert_eq!(p.devices[4].pci_slot().to_string(), "0:5:0");
    }

    #[test]
    fn rejects() {
        let e = plan(&cfg(&[("memory.size", "lots")])).unwrap_err();
        assert_eq!(e.bhyve_status(), 64);
        assert!(plan(&cfg(&[
            ("lpc.com1.path", "stdio"),
            ("lpc.com2.path", "stdio")
        ]))
        .is_err());
        assert!(plan(&cfg(&[("linux.kernel", "/k"), ("lpc.bootrom", "/r")])).is_err());
        assert!(plan(&cfg(&[("linux.cmdline", "x")])).is_err());
        let mut c = cfg(&[]);
        c.parse_pci_slot("3,virtio-net,netgraph").unwrap();
        assert!(plan(&c).is_err());
        let mut c = cfg(&[]);
        c.parse_pci_slot("3,virtio-blk").unwrap();
        assert!(plan(&c).is_err());
        let mut c = cfg(&[]);
        c.parse_pci_slot("3,virtio-net,slirp,hostfwd=bogus")
            .unwrap();
        assert!(plan(&c).is_err());
        let mut c = Config::with_defaults();
        c.set("pci.0.40.0.device", "virtio-rnd");
        c.set("name", "x");
        assert!(plan(&c).is_err());
        let mut c = cfg(&[]);
        c.set("pci.0.3.0.device", "virtio-rnd");
        c.set("pci.0.3.0.evil", "a b");
        assert!(plan(&c).is_err());
    }

    #[test]
    fn linux_boot() {
        let p = plan(&cfg(&[
            ("linux.kernel", "/boot/vmlinuz"),
            ("linux.cmdline", "console=ttyS0 quiet"),
            ("cpus", "2"),
        ]))
        .unwrap();
        assert!(p.self_booting());
        assert_eq!(
            p.linux.as_ref().unwrap().cmdline.as_deref(),
            Some("console=ttyS0 quiet")
        );
        assert_eq!(
            p.cpus_command().to_string(),
            "cpus 2 sockets=2 cores=1 threads=1"
        );
        let p = plan(&cfg(&[])).unwrap();
        assert!(!p.self_booting());
        assert_eq!(p.memsize, 256 << 20);
    }

    #[test]
    fn console_port() {
        let mut c = cfg(&[]);
        c.parse_pci_slot("6,virtio-console,port1=/tmp/con.sock")
            .unwrap();
        let p = plan(&c).unwrap();
        assert_eq!(
            p.devices[0].backend,
            Backend::ConsolePort {
                path: "/tmp/con.sock".into()
            }
        );
        assert!(p.devices[0].options.is_empty());
        let mut c = cfg(&[]);
        c.parse_pci_slot("6,virtio-console,port1=/a,port2=/b")
            .unwrap();
        assert_eq!(plan(&c).unwrap_err().bhyve_status(), 4);
        // Any name, as FreeBSD's named ports; the -o form too.
        let mut c = cfg(&[]);
        c.parse_pci_slot("7,virtio-console,org.qemu.guest_agent.0=/run/qga.sock")
            .unwrap();
        assert_eq!(
            c.get("pci.0.7.0.port.0.name"),
            Some("org.qemu.guest_agent.0")
        );
        let p = plan(&c).unwrap();
        assert_eq!(
            p.devices[0].backend,
            Backend::ConsolePort {
                path: "/run/qga.sock".into()
            }
        );
        let c = cfg(&[
            ("pci.0.7.0.device", "virtio-console"),
            ("pci.0.7.0.port.3.name", "p"),
            ("pci.0.7.0.port.3.path", "/s"),
        ]);
        assert!(matches!(
            plan(&c).unwrap().devices[0].backend,
            Backend::ConsolePort { .. }
        ));
        // A port without a path is a bad slot.
        assert!(cfg(&[])
            .parse_pci_slot("7,virtio-console,justaname")
            .is_err());
    }

    /// FreeBSD's AHCI syntaxes: ports in order with their options; the
    /// one-port emulations.
    #[test]
    fn ahci_ports() {
        let mut c = cfg(&[]);
        c.parse_pci_slot("4,ahci,hd:/d.img,sectorsize=4096,ser=ABC,cd:/i.iso,hd:/e.img,ro")
            .unwrap();
        let p = plan(&c).unwrap();
        let Backend::Ahci(ports) = &p.devices[0].backend else {
            panic!("not ahci")
        };
        assert_eq!(ports.len(), 3);
        assert_eq!(
            (ports[0].cd, ports[0].path.as_str(), ports[0].ro),
            (false, "/d.img", false)
        );
        assert_eq!(ports[0].options, ["sectorsize=4096", "ser=ABC"]);
        assert!(ports[1].cd && ports[1].ro);
        assert!(ports[2].ro && !ports[2].cd);
        let mut c = cfg(&[]);
        c.parse_pci_slot("5,ahci-cd,/x.iso").unwrap();
        c.parse_pci_slot("6,ahci-hd,/y.img,nocache,direct").unwrap();
        let p = plan(&c).unwrap();
        assert!(matches!(&p.devices[0].backend, Backend::Ahci(v) if v[0].cd));
        assert!(
            matches!(&p.devices[1].backend, Backend::Ahci(v) if !v[0].cd && v[0].options == ["direct", "nocache"])
        );
        // No path, or an unknown option: bhyve's configuration errors.
        let mut c = cfg(&[]);
        c.parse_pci_slot("4,ahci-hd").unwrap();
        assert_eq!(plan(&c).unwrap_err().bhyve_status(), 4);
        let mut c = cfg(&[]);
        c.parse_pci_slot("4,ahci,hd:/d.img,bogus=1").unwrap();
        assert_eq!(plan(&c).unwrap_err().bhyve_status(), 4);
    }

    #[test]
    fn passthru_host() {
        let mut c = cfg(&[]);
        c.parse_pci_slot("6,passthru,2/0/0").unwrap();
        let p = plan(&c).unwrap();
        assert_eq!(
            p.devices[0].backend,
            Backend::Passthru {
                host: "2/0/0".into()
            }
        );
    }
}
