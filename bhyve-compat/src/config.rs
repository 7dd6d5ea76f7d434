//! bhyve's configuration variables (`-o var=value`, `-k file`) and the legacy
//! option syntaxes (`-c`, `-l`, `-s`, `-m`) that set them, as in FreeBSD's
//! bhyve(8): every command-line option ends up as one or more `var=value`
//! entries of a flat configuration, and the VM is built from that.

use crate::error::Error;
use std::collections::BTreeMap;

/// The flat `var=value` configuration, in bhyve's variable names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    vars: BTreeMap<String, String>,
    /// FreeBSD keeps the configuration in nvlists, which list entries in the
    /// order they were added: a value set again moves to the end of its
    /// node, a node stays where its first value put it. `config.dump`
    /// prints in that order, so each variable and each node remembers when.
    seq: BTreeMap<String, u64>,
    nodes: BTreeMap<String, u64>,
    next: u64,
}

/// Emulations accepted by `-s`, in the order `-s help` lists them.
pub const PCI_EMULATIONS: &[&str] = &[
    "hostbridge",
    "amd_hostbridge",
    "lpc",
    "ahci",
    "ahci-cd",
    "ahci-hd",
    "passthru",
    "virtio-blk",
    "virtio-console",
    "virtio-net",
    "virtio-rnd",
];

/// Ports of one AHCI controller.
pub const AHCI_MAX_PORTS: usize = 32;

/// LPC devices accepted by `-l`, in the order `-l help` lists them.
pub const LPC_DEVICES: &[&str] = &["bootrom", "com1", "com2", "com3", "com4"];

impl Config {
    /// An empty configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// bhyve's defaults (`set_defaults()` in bhyverun.c).
    pub fn with_defaults() -> Self {
        let mut c = Self::new();
        c.set("acpi_tables", "false");
        c.set("acpi_tables_in_memory", "true");
        c.set("memory.size", "256M");
        c.set("x86.strictmsr", "true");
        c.set("lpc.fwcfg", "bhyve");
        c
    }

    /// Set `var` to `value`.
    pub fn set(&mut self, var: &str, value: &str) {
        self.next += 1;
        let mut at = 0;
        while let Some(i) = var[at..].find('.') {
            at += i + 1;
            self.nodes.entry(var[..at].to_string()).or_insert(self.next);
        }
        self.seq.insert(var.to_string(), self.next);
        self.vars.insert(var.to_string(), value.to_string());
    }

    /// `config.dump`: every variable as `name=value`, in FreeBSD's order.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        self.dump_node("", &mut out);
        out
    }

    fn dump_node(&self, prefix: &str, out: &mut String) {
        // (order, name, is a node)
        let mut items: Vec<(u64, &str, bool)> = Vec::new();
        for (k, n) in self.seq.iter().filter(|(k, _)| k.starts_with(prefix)) {
            if !k[prefix.len()..].contains('.') {
                items.push((*n, k, false));
            }
        }
        for (k, n) in self.nodes.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let rest = &k[prefix.len()..];
            if !rest.is_empty() && rest.find('.') == Some(rest.len() - 1) {
                items.push((*n, k, true));
            }
        }
        items.sort();
        for (_, k, node) in items {
            if node {
                self.dump_node(k, out);
            } else if let Some(v) = self.vars.get(k) {
                out.push_str(&format!("{k}={v}\n"));
            }
        }
    }

    /// The value of `var`.
    pub fn get(&self, var: &str) -> Option<&str> {
        self.vars.get(var).map(String::as_str)
    }

    /// Remove `var`.
    pub fn unset(&mut self, var: &str) {
        self.seq.remove(var);
        self.vars.remove(var);
    }

    /// A boolean variable, as bhyve's `get_config_bool_default`: true/false,
    /// yes/no, on/off, 1/0.
    pub fn get_bool(&self, var: &str, default: bool) -> Result<bool, Error> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => parse_bool(v).ok_or_else(|| {
                Error::Config(format!("Invalid value {v} for boolean variable {var}"))
            }),
        }
    }

    /// All variables under `prefix.` (returned without the prefix).
    pub fn children(&self, prefix: &str) -> Vec<(String, String)> {
        let p = format!("{prefix}.");
        self.vars
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
            .collect()
    }

    /// Every variable, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `-o var=value`: false when there is no `=` or the value is empty
    /// (bhyve's `parse_config_option`).
    pub fn parse_option(&mut self, option: &str) -> bool {
        match option.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                self.set(k, v);
                true
            }
            _ => false,
        }
    }

    /// `-k file`: `var=value` lines; `#` comments and empty lines skipped.
    pub fn parse_file_text(&mut self, path: &str, text: &str) -> Result<(), Error> {
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !self.parse_option(line) {
                return Err(Error::Config(format!(
                    "{path} line {}: invalid config option '{line}'",
                    i + 1
                )));
            }
        }
        Ok(())
    }

    /// `-c [[cpus=]n][,sockets=n][,cores=n][,threads=n]`.
    pub fn parse_topology(&mut self, opt: &str) -> Result<(), Error> {
        let bad = || Error::BadOption(format!("invalid cpu topology '{opt}'"));
        if opt.is_empty() {
            for k in ["sockets", "cores", "threads", "cpus"] {
                self.set(k, "1");
            }
            return Ok(());
        }
        for tok in opt.split(',') {
            if let Some(v) = tok.strip_prefix("cpus=") {
                self.set("cpus", v);
            } else if let Some(v) = tok.strip_prefix("sockets=") {
                self.set("sockets", v);
            } else if let Some(v) = tok.strip_prefix("cores=") {
                self.set("cores", v);
            } else if let Some(v) = tok.strip_prefix("threads=") {
                self.set("threads", v);
            } else if tok.contains('=') {
                return Err(bad());
            } else {
                self.set("cpus", tok);
            }
        }
        Ok(())
    }

    /// `-l device[,conf]`: `com1,stdio`, `com2,/dev/pts/3`, `bootrom,FILE[,VARS]`.
    pub fn parse_lpc(&mut self, opt: &str) -> Result<(), Error> {
        let bad = || Error::BadOption(format!("invalid lpc device configuration '{opt}'"));
        let (dev, rest) = match opt.split_once(',') {
            Some((d, r)) => (d, Some(r)),
            None => (opt, None),
        };
        let lower = dev.to_ascii_lowercase();
        match lower.as_str() {
            "bootrom" => {
                // As FreeBSD's lpc_device_parse: ROM, then the variable file
                // unless it is already a key=value option (fwcfg=qemu), then
                // options of the lpc node.
                let mut toks = rest.map(|r| r.split(',')).into_iter().flatten();
                let rom = toks
                    .next()
                    .ok_or_else(|| Error::Config(format!("invalid bootrom option \"{opt}\"")))?;
                self.set("lpc.bootrom", rom);
                for (i, t) in toks.enumerate() {
                    if i == 0 && !t.contains('=') {
                        self.set("lpc.bootvars", t);
                    } else if !t.is_empty() {
                        set_kv(self, "lpc", t);
                    }
                }
                Ok(())
            }
            "com1" | "com2" | "com3" | "com4" => {
                let path = rest.filter(|r| !r.is_empty()).ok_or_else(bad)?;
                self.set(&format!("lpc.{lower}.path"), path);
                Ok(())
            }
            _ => Err(bad()),
        }
    }

    /// `-s slot,emulation[,conf]`; errors carry bhyve's message.
    pub fn parse_pci_slot(&mut self, opt: &str) -> Result<(), Error> {
        let bad = || Error::Config(format!("Invalid PCI slot info field \"{opt}\""));
        let mut parts = opt.splitn(3, ',');
        let slot = parts.next().unwrap_or("");
        let emul = parts.next().ok_or_else(bad)?;
        let conf = parts.next();
        let (b, s, f) = parse_bsf(slot).ok_or_else(bad)?;
        if emul.is_empty() {
            return Err(bad());
        }
        if !PCI_EMULATIONS.contains(&emul) {
            return Err(Error::Config(format!(
                "pci slot {b}:{s}:{f}: unknown device \"{emul}\""
            )));
        }
        let node = format!("pci.{b}.{s}.{f}");
        if self.get(&format!("{node}.device")).is_some() {
            return Err(Error::Config(format!(
                "pci slot {b}:{s}:{f} already occupied!"
            )));
        }
        self.set(&format!("{node}.device"), emul);
        if let Some(conf) = conf {
            legacy_pci_config(self, &node, emul, conf).map_err(|()| bad())?;
        }
        Ok(())
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// A PCI address as bhyve writes it: `slot`, `slot:func` or `bus:slot:func`.
pub fn parse_bsf(s: &str) -> Option<(u8, u8, u8)> {
    let nums: Vec<u32> = s
        .split(':')
        .map(|p| p.parse::<u32>().ok())
        .collect::<Option<_>>()?;
    let (b, sl, f) = match nums.as_slice() {
        [sl] => (0, *sl, 0),
        [sl, f] => (0, *sl, *f),
        [b, sl, f] => (*b, *sl, *f),
        _ => return None,
    };
    let (b, sl, f) = (
        u8::try_from(b).ok()?,
        u8::try_from(sl).ok()?,
        u8::try_from(f).ok()?,
    );
    if sl > 31 || f > 7 {
        return None;
    }
    Some((b, sl, f))
}

/// Convert a legacy `-s` configuration string into `pci.B.S.F.*` variables, as
/// the per-device `pe_legacy_config` hooks of bhyve do.
fn legacy_pci_config(cfg: &mut Config, node: &str, emul: &str, conf: &str) -> Result<(), ()> {
    let mut toks = conf.split(',');
    match emul {
        "virtio-blk" => {
            // path[,opt[=val]]...
            let path = toks.next().unwrap_or("");
            if !path.is_empty() {
                cfg.set(&format!("{node}.path"), path);
            }
        }
        "virtio-net" => {
            // backend[,opt[=val]]...
            let backend = toks.next().unwrap_or("");
            if !backend.is_empty() {
                if backend.contains('=') {
                    set_kv(cfg, node, backend);
                } else {
                    cfg.set(&format!("{node}.backend"), backend);
                }
            }
        }
        "passthru" => {
            // B/S/F or pptN or key=value list
            let first = toks.next().unwrap_or("");
            if first.contains('=') {
                set_kv(cfg, node, first);
            } else {
                let v: Vec<&str> = first.split('/').collect();
                if let [b, s, f] = v.as_slice() {
                    cfg.set(&format!("{node}.bus"), b);
                    cfg.set(&format!("{node}.slot"), s);
                    cfg.set(&format!("{node}.func"), f);
                } else {
                    cfg.set(&format!("{node}.pptdev"), first);
                }
            }
        }
        "ahci" => {
            // FreeBSD's legacy AHCI syntax: ports in order, each "hd:" or
            // "cd:" then a block device (path, options) up to the next one.
            let mut rest = conf;
            let mut n = 0;
            while !rest.is_empty() {
                let (ty, body) = if let Some(b) = rest.strip_prefix("hd:") {
                    ("hd", b)
                } else if let Some(b) = rest.strip_prefix("cd:") {
                    ("cd", b)
                } else {
                    ("hd", rest)
                };
                let next = [body.find(",hd:"), body.find(",cd:")]
                    .into_iter()
                    .flatten()
                    .min();
                let (this, after) = match next {
                    Some(i) => (&body[..i], &body[i + 1..]),
                    None => (body, ""),
                };
                let port = format!("{node}.port.{n}");
                cfg.set(&format!("{port}.type"), ty);
                block_config(cfg, &port, this);
                rest = after;
                n += 1;
            }
            return Ok(());
        }
        "ahci-hd" | "ahci-cd" => {
            let port = format!("{node}.port.0");
            cfg.set(&format!("{port}.type"), &emul[5..]);
            block_config(cfg, &port, conf);
            return Ok(());
        }
        "virtio-console" => {
            // NAME=PATH per port, as FreeBSD's vtcon legacy syntax: port N
            // becomes port.N.name and port.N.path (port1=... is just a name).
            for (i, t) in toks.by_ref().enumerate() {
                let (name, path) = t.split_once('=').ok_or(())?;
                cfg.set(&format!("{node}.port.{i}.name"), name);
                cfg.set(&format!("{node}.port.{i}.path"), path);
            }
        }
        _ => {}
    }
    for t in toks {
        set_kv(cfg, node, t);
    }
    Ok(())
}

/// FreeBSD's blockif_legacy_config: a path, then options.
fn block_config(cfg: &mut Config, node: &str, conf: &str) {
    let mut toks = conf.split(',');
    if let Some(path) = toks.next().filter(|p| !p.is_empty()) {
        cfg.set(&format!("{node}.path"), path);
    }
    for t in toks {
        set_kv(cfg, node, t);
    }
}

fn set_kv(cfg: &mut Config, node: &str, tok: &str) {
    if tok.is_empty() {
        return;
    }
    match tok.split_once('=') {
        Some((k, v)) => cfg.set(&format!("{node}.{k}"), v),
        None => cfg.set(&format!("{node}.{tok}"), "true"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_files() {
        let mut c = Config::new();
        assert!(c.parse_option("memory.size=1G"));
        assert_eq!(c.get("memory.size"), Some("1G"));
        assert!(c.parse_option("linux.cmdline=console=ttyS0 quiet"));
        assert_eq!(c.get("linux.cmdline"), Some("console=ttyS0 quiet"));
        assert!(!c.parse_option("novalue"));
        assert!(!c.parse_option("empty="));
        assert!(!c.parse_option("=x"));
        c.parse_file_text("f", "# comment\n\ncpus=2\nlpc.com1.path=stdio\n")
            .unwrap();
        assert_eq!(c.get("cpus"), Some("2"));
        assert_eq!(c.get("lpc.com1.path"), Some("stdio"));
        let e = c.parse_file_text("f", "cpus=2\nbogus\n").unwrap_err();
        assert_eq!(e.to_string(), "f line 2: invalid config option 'bogus'");
    }

    #[test]
    fn topology() {
        let mut c = Config::new();
        c.parse_topology("4").unwrap();
        assert_eq!(c.get("cpus"), Some("4"));
        let mut c = Config::new();
        c.parse_topology("cpus=4,sockets=2,cores=2").unwrap();
        assert_eq!(c.get("sockets"), Some("2"));
        assert_eq!(c.get("cores"), Some("2"));
        assert!(Config::new().parse_topology("bogus=1").is_err());
        let mut c = Config::new();
        c.parse_topology("").unwrap();
        assert_eq!(c.get("cpus"), Some("1"));
    }

    #[test]
    fn lpc() {
        let mut c = Config::new();
        c.parse_lpc("com1,stdio").unwrap();
        c.parse_lpc("COM2,/dev/pts/4").unwrap();
        c.parse_lpc("bootrom,/x/rom.bin").unwrap();
        assert_eq!(c.get("lpc.com1.path"), Some("stdio"));
        assert_eq!(c.get("lpc.com2.path"), Some("/dev/pts/4"));
        assert_eq!(c.get("lpc.bootrom"), Some("/x/rom.bin"));
        c.parse_lpc("bootrom,rom,vars").unwrap();
        assert_eq!(c.get("lpc.bootvars"), Some("vars"));
        assert!(c.parse_lpc("com1").is_err());
        c.parse_lpc("com4,tcp=127.0.0.1:5555").unwrap();
        assert_eq!(c.get("lpc.com4.path"), Some("tcp=127.0.0.1:5555"));
        assert!(c.parse_lpc("com5,stdio").is_err());
        assert_eq!(
            c.parse_lpc("bootrom").unwrap_err().to_string(),
            "invalid bootrom option \"bootrom\""
        );
        let mut c = Config::new();
        c.parse_lpc("bootrom,/r,fwcfg=qemu").unwrap();
        assert_eq!(
            (c.get("lpc.bootvars"), c.get("lpc.fwcfg")),
            (None, Some("qemu"))
        );
        c.parse_lpc("bootrom,/r,/v,fwcfg=bhyve").unwrap();
        assert_eq!(
            (c.get("lpc.bootvars"), c.get("lpc.fwcfg")),
            (Some("/v"), Some("bhyve"))
        );
        assert!(c.parse_lpc("").is_err());
    }

    #[test]
    fn pci_slots() {
        let mut c = Config::new();
        c.parse_pci_slot("0,hostbridge").unwrap();
        c.parse_pci_slot("1:0,lpc").unwrap();
        c.parse_pci_slot("3,virtio-blk,/tmp/d.img,ro,sectorsize=512")
            .unwrap();
        c.parse_pci_slot("0:4:1,virtio-net,slirp,hostfwd=tcp::2222-:22")
            .unwrap();
        c.parse_pci_slot("5,virtio-net,tap0").unwrap();
        c.parse_pci_slot("6,passthru,2/0/0").unwrap();
        assert_eq!(c.get("pci.0.0.0.device"), Some("hostbridge"));
        assert_eq!(c.get("pci.0.1.0.device"), Some("lpc"));
        assert_eq!(c.get("pci.0.3.0.path"), Some("/tmp/d.img"));
        assert_eq!(c.get("pci.0.3.0.ro"), Some("true"));
        assert_eq!(c.get("pci.0.3.0.sectorsize"), Some("512"));
        assert_eq!(c.get("pci.0.4.1.backend"), Some("slirp"));
        assert_eq!(c.get("pci.0.4.1.hostfwd"), Some("tcp::2222-:22"));
        assert_eq!(c.get("pci.0.5.0.backend"), Some("tap0"));
        assert_eq!(c.get("pci.0.6.0.bus"), Some("2"));
        let e = c.parse_pci_slot("3,virtio-rnd").unwrap_err();
        assert_eq!(e.to_string(), "pci slot 0:3:0 already occupied!");
        let e = c.parse_pci_slot("7,frobnicator").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pci slot 0:7:0: unknown device \"frobnicator\""
        );
        for bad in [
            "",
            "3",
            "x,virtio-rnd",
            "32,virtio-rnd",
            "1:8,lpc",
            "1:2:3:4,lpc",
            "9,",
        ] {
            assert!(c.parse_pci_slot(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bools() {
        let mut c = Config::new();
        c.set("a", "yes");
        c.set("b", "off");
        c.set("c", "maybe");
        assert!(c.get_bool("a", false).unwrap());
        assert!(!c.get_bool("b", true).unwrap());
        assert!(c.get_bool("c", true).is_err());
        assert!(c.get_bool("d", true).unwrap());
    }
}
