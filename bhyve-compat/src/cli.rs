//! bhyve's command line (getopt, as FreeBSD's bhyverun.c) into a [`Config`].

use crate::config::{Config, LPC_DEVICES, PCI_EMULATIONS};
use crate::error::{Error, Result};
use crate::getopt::{getopt, Opt};

/// bhyve's option string (FreeBSD 15 amd64, plus nothing of our own).
pub const BHYVE_OPTSTRING: &str = "aehuwxACDHIMPSWYk:o:p:G:c:s:m:n:l:K:U:";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// `-h`: usage on stderr, exit 0.
    Help,
    /// `-s help`: list PCI emulations, exit 0.
    ListPci,
    /// `-l help`: list LPC devices, exit 0.
    ListLpc,
    /// `-o config.dump=1`: print the configuration, exit 1.
    Dump(Config),
    /// Run a VM.
    Run(Config),
}

/// bhyve's usage text for program name `prog`.
pub fn usage_text(prog: &str) -> String {
    let pad = " ".repeat(prog.len());
    format!(
        "Usage: {prog} [-AaCDeHhMPSuWwxY]\n\
         \x20      {pad} [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]\n\
         \x20      {pad} [-G port] [-k config_file] [-l lpc] [-m mem] [-o var=value]\n\
         \x20      {pad} [-p vcpu:hostcpu] [-s pci] [-U uuid] vmname\n\
         \x20      -A: create ACPI tables\n\
         \x20      -a: local apic is in xAPIC mode (deprecated)\n\
         \x20      -C: include guest memory in core file\n\
         \x20      -c: number of CPUs and/or topology specification\n\
         \x20      -D: destroy on power-off\n\
         \x20      -e: exit on unhandled I/O access\n\
         \x20      -G: start a debug server\n\
         \x20      -H: vmexit from the guest on HLT\n\
         \x20      -h: help\n\
         \x20      -k: key=value flat config file\n\
         \x20      -K: PS2 keyboard layout\n\
         \x20      -l: LPC device configuration\n\
         \x20      -M: monitor mode\n\
         \x20      -m: memory size\n\
         \x20      -o: set config 'var' to 'value'\n\
         \x20      -P: vmexit from the guest on pause\n\
         \x20      -p: pin 'vcpu' to 'hostcpu'\n\
         \x20      -S: guest memory cannot be swapped\n\
         \x20      -s: <slot,driver,configinfo> PCI slot config\n\
         \x20      -U: UUID\n\
         \x20      -u: RTC keeps UTC time\n\
         \x20      -W: force virtio to use single-vector MSI\n\
         \x20      -w: ignore unimplemented MSRs\n\
         \x20      -x: local APIC is in x2APIC mode\n\
         \x20      -Y: disable MPtable generation\n"
    )
}

/// `-s help` output.
pub fn pci_help() -> String {
    PCI_EMULATIONS.iter().map(|e| format!("{e}\n")).collect()
}

/// `-l help` output.
pub fn lpc_help() -> String {
    LPC_DEVICES.iter().map(|e| format!("{e}\n")).collect()
}

/// bhyve's `strncmp(optarg, "help", strlen(optarg)) == 0`.
fn is_help(arg: &str) -> bool {
    "help".starts_with(arg)
}

fn pincpu(cfg: &mut Config, opt: &str) -> std::result::Result<(), ()> {
    let (v, p) = opt.split_once(':').ok_or(())?;
    let vcpu: u32 = v.parse().map_err(|_| ())?;
    let pcpu: u32 = p.parse().map_err(|_| ())?;
    let key = format!("vcpu.{vcpu}.cpuset");
    let val = match cfg.get(&key) {
        Some(old) => format!("{old},{pcpu}"),
        None => pcpu.to_string(),
    };
    cfg.set(&key, &val);
    Ok(())
}

/// `-n id,size,cpus[,domain_policy]`: a guest NUMA domain, whose size
/// overrides `-m`. This engine gives the guest one memory domain (and no
/// SRAT), so one domain (any id) is accepted; a second is refused.
fn numa_domain(cfg: &mut Config, arg: &str) -> Result<()> {
    let bad = || Error::BadOption(format!("invalid NUMA domain configuration '{arg}'"));
    let mut toks = arg.splitn(4, ',');
    let id: u32 = toks.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let size = toks.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
    let cpus = toks.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
    if let Some(other) = cfg
        .children("domains")
        .into_iter()
        .filter_map(|(k, _)| k.split('.').next().map(str::to_string))
        .find(|d| *d != id.to_string())
    {
        return Err(Error::BadOption(format!(
            "NUMA domain {id}: only one domain is supported here (domain {other} is configured)"
        )));
    }
    cfg.set(&format!("domains.{id}.size"), size);
    cfg.set(&format!("domains.{id}.cpus"), cpus);
    if let Some(p) = toks.next() {
        cfg.set(&format!("domains.{id}.domain_policy"), p);
    }
    cfg.set("memory.size", size);
    Ok(())
}

/// Parse bhyve's arguments (without argv\[0\]). `read_file` reads `-k` files
/// (as the invoking user).
pub fn parse_bhyve_args(
    args: &[String],
    read_file: &dyn Fn(&str) -> std::io::Result<String>,
) -> Result<Invocation> {
    let mut cfg = Config::with_defaults();
    let (opts, operands) = getopt(args, BHYVE_OPTSTRING);
    for o in opts {
        let (c, arg) = match o {
            Opt::Illegal(c) => return Err(Error::Usage(Some(format!("illegal option -- {c}")))),
            Opt::MissingArg(c) => {
                return Err(Error::Usage(Some(format!(
                    "option requires an argument -- {c}"
                ))))
            }
            Opt::Flag(c, a) => (c, a.unwrap_or_default()),
        };
        match c {
            'a' => cfg.set("x86.x2apic", "false"),
            'A' => cfg.set("acpi_tables", "true"),
            'C' => cfg.set("memory.guest_in_core", "true"),
            'D' => cfg.set("destroy_on_poweroff", "true"),
            'e' => cfg.set("x86.strictio", "true"),
            'G' => {
                let a = match arg.strip_prefix('w') {
                    Some(rest) => {
                        cfg.set("gdb.wait", "true");
                        rest.to_string()
                    }
                    None => arg.clone(),
                };
                match a.rsplit_once(':') {
                    Some((addr, port)) => {
                        cfg.set("gdb.address", addr);
                        cfg.set("gdb.port", port);
                    }
                    None => cfg.set("gdb.port", &a),
                }
            }
            'h' => return Ok(Invocation::Help),
            'H' => cfg.set("x86.vmexit_on_hlt", "true"),
            'I' => {}
            'k' => {
                let text = read_file(&arg).map_err(|e| {
                    Error::io(format!("Failed to open configuration file {arg}"), &e)
                })?;
                cfg.parse_file_text(&arg, &text)?;
            }
            'K' => cfg.set("keyboard.layout", &arg),
            'l' => {
                if is_help(&arg) {
                    return Ok(Invocation::ListLpc);
                }
                cfg.parse_lpc(&arg)?;
            }
            'm' => cfg.set("memory.size", &arg),
            'n' => numa_domain(&mut cfg, &arg)?,
            'M' => cfg.set("monitor", "true"),
            'o' => {
                if !cfg.parse_option(&arg) {
                    return Err(Error::BadOption(format!(
                        "invalid configuration option '{arg}'"
                    )));
                }
            }
            'p' => pincpu(&mut cfg, &arg).map_err(|()| {
                Error::BadOption(format!("invalid vcpu pinning configuration '{arg}'"))
            })?,
            'c' => cfg.parse_topology(&arg)?,
            'P' => cfg.set("x86.vmexit_on_pause", "true"),
            's' => {
                if is_help(&arg) {
                    return Ok(Invocation::ListPci);
                }
                cfg.parse_pci_slot(&arg)?;
            }
            'S' => cfg.set("memory.wired", "true"),
            'u' => cfg.set("rtc.use_localtime", "false"),
            'U' => cfg.set("uuid", &arg),
            'w' => cfg.set("x86.strictmsr", "false"),
            'W' => cfg.set("virtio_msix", "false"),
            'x' => cfg.set("x86.x2apic", "true"),
            'Y' => cfg.set("x86.mptable", "false"),
            other => return Err(Error::Usage(Some(format!("illegal option -- {other}")))),
        }
    }
    if operands.len() > 1 {
        return Err(Error::Usage(None));
    }
    if let Some(n) = operands.first() {
        cfg.set("name", n);
    }
    if cfg.get("name").is_none() {
        return Err(Error::Usage(None));
    }
    if cfg.get_bool("config.dump", false)? {
        return Ok(Invocation::Dump(cfg));
    }
    Ok(Invocation::Run(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation> {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_bhyve_args(&v, &|p| match p {
            "good.conf" => Ok("memory.size=1G\n# x\nlpc.com1.path=stdio\n".into()),
            "bad.conf" => Ok("junk\n".into()),
            _ => Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
        })
    }

    fn cfg(args: &[&str]) -> Config {
        match parse(args).unwrap() {
            Invocation::Run(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn typical_command_line() {
        let c = cfg(&[
            "-AHP",
            "-M",
            "-c",
            "2",
            "-m",
            "64M",
            "-l",
            "com1,stdio",
            "-l",
            "bootrom,/rom.bin",
            "-s",
            "0,hostbridge",
            "-s",
            "3,virtio-blk,/d.img",
            "-D",
            "-u",
            "-w",
            "-x",
            "-e",
            "vm1",
        ]);
        assert_eq!(c.get("name"), Some("vm1"));
        assert_eq!(c.get("monitor"), Some("true"));
        assert_eq!(c.get("cpus"), Some("2"));
        assert_eq!(c.get("memory.size"), Some("64M"));
        assert_eq!(c.get("lpc.bootrom"), Some("/rom.bin"));
        assert_eq!(c.get("destroy_on_poweroff"), Some("true"));
        assert_eq!(c.get("acpi_tables"), Some("true"));
        assert_eq!(c.get("x86.vmexit_on_hlt"), Some("true"));
        assert_eq!(c.get("x86.strictmsr"), Some("false"));
        assert_eq!(c.get("rtc.use_localtime"), Some("false"));
        assert_eq!(c.get("pci.0.3.0.path"), Some("/d.img"));
    }

    #[test]
    fn config_vars_and_files() {
        let c = cfg(&[
            "-k",
            "good.conf",
            "-o",
            "cpus=2",
            "-o",
            "linux.kernel=/k",
            "-o",
            "linux.cmdline=console=ttyS0 root=/dev/vda",
            "-o",
            "name=fromvar",
        ]);
        assert_eq!(c.get("memory.size"), Some("1G"));
        assert_eq!(c.get("linux.cmdline"), Some("console=ttyS0 root=/dev/vda"));
        assert_eq!(c.get("name"), Some("fromvar"));
        let e = parse(&["-k", "missing.conf", "vm"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Failed to open configuration file missing.conf: No such file or directory"
        );
        assert_eq!(e.bhyve_status(), 4);
        assert_eq!(
            parse(&["-k", "bad.conf", "vm"]).unwrap_err().bhyve_status(),
            4
        );
    }

    #[test]
    fn help_and_listing() {
        assert_eq!(parse(&["-h"]).unwrap(), Invocation::Help);
        assert_eq!(parse(&["-s", "help"]).unwrap(), Invocation::ListPci);
        assert_eq!(parse(&["-l", "help"]).unwrap(), Invocation::ListLpc);
        assert!(pci_help().contains("virtio-blk\n"));
        assert!(lpc_help().contains("com1\n"));
        assert!(matches!(
            parse(&["-o", "config.dump=1", "vm"]).unwrap(),
            Invocation::Dump(_)
        ));
    }

    /// FreeBSD prints its nvlist configuration in insertion order: defaults
    /// first, a value set again at the end of its node, nodes where their
    /// first value put them, the name last.
    #[test]
    fn config_dump_in_freebsd_order() {
        let Invocation::Dump(c) = parse(&[
            "-c",
            "2",
            "-m",
            "1G",
            "-s",
            "0,hostbridge",
            "-s",
            "31,lpc",
            "-l",
            "com1,stdio",
            "-o",
            "config.dump=1",
            "vm1",
        ])
        .unwrap() else {
            panic!("not a dump")
        };
        assert_eq!(
            c.dump(),
            "acpi_tables=false\n\
             acpi_tables_in_memory=true\n\
             memory.size=1G\n\
             x86.strictmsr=true\n\
             lpc.fwcfg=bhyve\n\
             lpc.com1.path=stdio\n\
             cpus=2\n\
             pci.0.0.0.device=hostbridge\n\
             pci.0.31.0.device=lpc\n\
             config.dump=1\n\
             name=vm1\n"
        );
    }

    #[test]
    fn numa_domains() {
        let Invocation::Run(c) = parse(&["-m", "1G", "-n", "0,512M,0-1", "vm"]).unwrap() else {
            panic!()
        };
        assert_eq!(c.get("memory.size"), Some("512M"));
        assert_eq!(c.get("domains.0.cpus"), Some("0-1"));
        assert!(parse(&["-n", "0,512M,0", "-n", "1,512M,1", "vm"]).is_err());
        assert!(parse(&["-n", "0,512M", "vm"]).is_err());
        assert!(parse(&["-n", "x,512M,0", "vm"]).is_err());
    }

    #[test]
    fn usage_errors() {
        for args in [&[][..], &["-z", "vm"], &["-m"], &["vm1", "vm2"], &["-A"]] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.bhyve_status(), 1, "{args:?}");
        }
        assert_eq!(
            parse(&["-c", "bogus=1", "vm"]).unwrap_err().bhyve_status(),
            64
        );
        assert_eq!(
            parse(&["-l", "com9,stdio", "vm"])
                .unwrap_err()
                .bhyve_status(),
            64
        );
        assert_eq!(
            parse(&["-o", "novalue", "vm"]).unwrap_err().bhyve_status(),
            64
        );
        assert_eq!(parse(&["-p", "x", "vm"]).unwrap_err().bhyve_status(), 64);
        assert_eq!(
            parse(&["-s", "3,nonesuch", "vm"])
                .unwrap_err()
                .bhyve_status(),
            4
        );
        let u = usage_text("bhyve");
        assert!(u.starts_with("Usage: bhyve [-AaCDeHhMPSuWwxY]\n"));
        assert!(u.contains("\n             [-c [[cpus=]numcpus]"));
    }

    #[test]
    fn gdb_and_pinning() {
        let c = cfg(&["-G", "w127.0.0.1:1234", "-p", "0:1", "-p", "0:2", "vm"]);
        assert_eq!(c.get("gdb.wait"), Some("true"));
        assert_eq!(c.get("gdb.address"), Some("127.0.0.1"));
        assert_eq!(c.get("gdb.port"), Some("1234"));
        assert_eq!(c.get("vcpu.0.cpuset"), Some("1,2"));
    }
}
