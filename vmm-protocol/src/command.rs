//! The `vmm/NAME` command language: one command per line.
//!
//! Descriptors are named by the client's own descriptor numbers; the caller
//! supplies an [`FdSource`] that turns such a number into a descriptor the
//! engine owns (vmmfs: the descriptors the client sent over the hand-over
//! socket, see [`crate::handover`]).

use crate::{ParseError, Result};
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};

/// Turns a descriptor number of the client into a descriptor of our own.
pub trait FdSource {
    /// Take a copy of the client's descriptor `client_fd`.
    fn take(&mut self, client_fd: i32) -> std::io::Result<OwnedFd>;
}

/// An [`FdSource`] for callers in the engine's own process (embedders, tests,
/// benchmarks): descriptors handed over by value and named by their numbers.
#[derive(Debug, Default)]
pub struct OwnedFds(Vec<OwnedFd>);

impl OwnedFds {
    /// Hand over `fd`; returns the number that names it in a command.
    pub fn add(&mut self, fd: OwnedFd) -> i32 {
        let n = fd.as_raw_fd();
        self.0.push(fd);
        n
    }
}

impl From<Vec<OwnedFd>> for OwnedFds {
    fn from(fds: Vec<OwnedFd>) -> Self {
        OwnedFds(fds)
    }
}

impl FdSource for OwnedFds {
    fn take(&mut self, client_fd: i32) -> std::io::Result<OwnedFd> {
        let i = self
            .0
            .iter()
            .position(|f| f.as_raw_fd() == client_fd)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))?;
        Ok(self.0.remove(i))
    }
}

/// The descriptors one command names, by the client's labels (vmmfs: what
/// the client handed over; a VM worker: what came with the daemon's
/// request). A label may be taken twice (`com1 4 4`: one socket both ways);
/// each take gets its own descriptor of the file.
#[derive(Debug, Default)]
pub struct Labelled(Vec<(i32, OwnedFd)>);

impl Labelled {
    pub fn add(&mut self, label: i32, fd: OwnedFd) {
        self.0.push((label, fd));
    }

    pub fn into_inner(self) -> Vec<OwnedFd> {
        self.0.into_iter().map(|(_, fd)| fd).collect()
    }
}

impl FdSource for Labelled {
    fn take(&mut self, label: i32) -> std::io::Result<OwnedFd> {
        self.0
            .iter()
            .find(|(n, _)| *n == label)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF))?
            .1
            .try_clone()
    }
}

/// A PCI slot as bhyve writes it: `slot`, `slot:func` or `bus:slot:func`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciSlot {
    pub bus: u8,
    pub slot: u8,
    pub func: u8,
}

/// vCPU topology (bhyve `-c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub cpus: u16,
    pub sockets: u16,
    pub cores: u16,
    pub threads: u16,
}

/// Which serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComPort {
    Com1,
    Com2,
    Com3,
    Com4,
}

impl ComPort {
    /// Every port, in order.
    pub const ALL: [ComPort; 4] = [ComPort::Com1, ComPort::Com2, ComPort::Com3, ComPort::Com4];

    /// 1 for COM1 and so on.
    pub fn number(self) -> usize {
        self as usize + 1
    }
}

/// The `set` keys the engine acts on. A client does not send others: each
/// would cost a round trip to be refused (EOPNOTSUPP). bhyve's other
/// configuration variables are accepted by bhyve-compat and have no effect.
pub const SET_KEYS: &[&str] = &["lpc.fwcfg", "rtc.use_localtime", "uuid", "x86.mptable"];

/// One parsed command. Descriptor fields hold the client's descriptor numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `memory SIZE`: guest RAM in bhyve's `-m` syntax.
    Memory(u64),
    /// `cpus N [sockets=S] [cores=C] [threads=T]`.
    Cpus(Topology),
    /// `bootrom FD`: a flat image mapped just below 4 GiB.
    Bootrom(i32),
    /// `bootvars FD`: UEFI variable store (bhyve's VARS file), a writable
    /// flash mapped just below the boot ROM; guest writes go back to it.
    BootVars(i32),
    /// `kernel FD`: bzImage or ELF vmlinux for direct Linux boot.
    Kernel(i32),
    /// `initrd FD`.
    Initrd(i32),
    /// `cmdline TEXT`: kernel command line (rest of the line).
    Cmdline(String),
    /// `com1 FD_IN FD_OUT` / `com2 FD_IN FD_OUT`.
    Serial {
        port: ComPort,
        input: i32,
        output: i32,
    },
    /// `device SLOT EMULATION [OPTIONS]`: bhyve `-s`; options are bhyve's comma list,
    /// with descriptors given as `fd=N`.
    Device {
        slot: PciSlot,
        emulation: String,
        options: Vec<String>,
    },
    /// `set KEY=VALUE`: a platform option (bhyve -o style); the engine
    /// accepts the keys of [`SET_KEYS`].
    Set { key: String, value: String },
    /// `run`: start the vCPUs.
    Run,
    /// `reinit`: reset vCPUs and devices, keep VM and memory (bhyve's vm_reinit).
    Reinit,
    /// `reset`: force a reset now (bhyvectl --force-reset).
    Reset,
    /// `poweroff`: ask the guest to power off (ACPI power button), like SIGTERM to bhyve.
    PowerOff,
    /// `force-poweroff`: stop the guest now (bhyvectl --force-poweroff).
    ForcePowerOff,
    /// `suspend`: stop the guest with exit status 5.
    Suspend,
}

/// Parse a size in bhyve's `-m` syntax: a number of bytes or with K/M/G/T suffix.
/// A bare number below 1024 means MiB, as bhyve does.
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || ParseError(format!("bad size '{s}'"));
    let s = s.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    // Digits only: u64's parser would also take a leading '+'.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let n = if shift == 0 && n < 1024 {
        n.checked_shl(20).ok_or_else(bad)?
    } else {
        n
    };
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes == 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// Parse a PCI slot: `S`, `S:F` or `B:S:F` (decimal, as bhyve).
pub fn parse_slot(s: &str) -> Result<PciSlot> {
    let bad = || ParseError(format!("bad PCI slot '{s}'"));
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| p.parse::<u8>().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let (bus, slot, func) = match parts.as_slice() {
        [s] => (0, *s, 0),
        [s, f] => (0, *s, *f),
        [b, s, f] => (*b, *s, *f),
        _ => return Err(bad()),
    };
    if slot > 31 || func > 7 {
        return Err(bad());
    }
    Ok(PciSlot { bus, slot, func })
}

fn parse_fd(s: Option<&str>) -> Result<i32> {
    let s = s.ok_or_else(|| ParseError("missing descriptor number".into()))?;
    match s.parse::<i32>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(ParseError(format!("bad descriptor number '{s}'"))),
    }
}

fn parse_topology(args: &[&str]) -> Result<Topology> {
    let bad = |a: &str| ParseError(format!("bad cpus argument '{a}'"));
    let mut t = Topology {
        cpus: 0,
        sockets: 0,
        cores: 1,
        threads: 1,
    };
    let mut explicit_cpus = false;
    for a in args {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k, v),
            None => ("cpus", *a),
        };
        let v: u16 = v.parse().map_err(|_| bad(a))?;
        match k {
            "cpus" => {
                t.cpus = v;
                explicit_cpus = true;
            }
            "sockets" => t.sockets = v,
            "cores" => t.cores = v,
            "threads" => t.threads = v,
            _ => return Err(bad(a)),
        }
    }
    if explicit_cpus && t.cpus == 0 {
        return Err(ParseError("vCPU count out of range".into()));
    }
    // Products of three u16s are computed in u64: cores=2 threads=32768
    // must be "out of range", not an overflow (a panic in debug builds).
    let per_socket = u64::from(t.cores) * u64::from(t.threads);
    if t.sockets == 0 {
        t.sockets = if t.cpus == 0 {
            1
        } else {
            // At most cpus, so it fits in a u16 (the fallback is unreachable).
            u16::try_from((u64::from(t.cpus) / per_socket.max(1)).max(1)).unwrap_or(t.cpus)
        };
    }
    let slots = u64::from(t.sockets) * per_socket;
    if t.cpus == 0 {
        t.cpus = u16::try_from(slots).unwrap_or(u16::MAX);
    }
    if t.cpus == 0 || t.cores == 0 || t.threads == 0 || t.cpus > 255 {
        return Err(ParseError("vCPU count out of range".into()));
    }
    if slots < u64::from(t.cpus) {
        return Err(ParseError("topology smaller than vCPU count".into()));
    }
    Ok(t)
}

impl Command {
    /// The client descriptor labels this command names, in order: what the
    /// client must hand over before sending it (see [`crate::handover`]).
    /// Device options name them as `fd=N` or `fd=IN:OUT`; malformed numbers
    /// are left for the device to refuse.
    pub fn descriptors(&self) -> Vec<i32> {
        match self {
            Command::Bootrom(n)
            | Command::BootVars(n)
            | Command::Kernel(n)
            | Command::Initrd(n) => vec![*n],
            Command::Serial { input, output, .. } => {
                if input == output {
                    vec![*input]
                } else {
                    vec![*input, *output]
                }
            }
            Command::Device { options, .. } => {
                let mut out = Vec::new();
                for v in options.iter().filter_map(|o| o.strip_prefix("fd=")) {
                    for n in v.split(':').filter_map(|n| n.parse::<i32>().ok()) {
                        if n >= 0 && !out.contains(&n) {
                            out.push(n);
                        }
                    }
                }
                out
            }
            _ => Vec::new(),
        }
    }

    /// Whether the descriptor this command names is a boot image (read whole
    /// into the VM at configuration time, so it must be a regular file).
    pub fn is_image(&self) -> bool {
        matches!(
            self,
            Command::Bootrom(_) | Command::BootVars(_) | Command::Kernel(_) | Command::Initrd(_)
        )
    }
}

impl Command {
    /// Parse one command line (a trailing newline is allowed).
    pub fn parse(line: &str) -> Result<Command> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if line.contains('\n') || line.contains('\0') {
            return Err(ParseError("one command per write".into()));
        }
        let (verb, rest) = line
            .trim_start()
            .split_once(' ')
            .unwrap_or((line.trim(), ""));
        let args: Vec<&str> = rest.split_whitespace().collect();
        let arity = |n: usize| -> Result<()> {
            if args.len() == n {
                Ok(())
            } else {
                Err(ParseError(format!("'{verb}' takes {n} argument(s)")))
            }
        };
        let cmd = match verb {
            "memory" => {
                arity(1)?;
                Command::Memory(parse_size(args[0])?)
            }
            "cpus" => {
                if args.is_empty() {
                    return Err(ParseError("'cpus' needs a count".into()));
                }
                Command::Cpus(parse_topology(&args)?)
            }
            "bootrom" => {
                arity(1)?;
                Command::Bootrom(parse_fd(args.first().copied())?)
            }
            "bootvars" => {
                arity(1)?;
                Command::BootVars(parse_fd(args.first().copied())?)
            }
            "kernel" => {
                arity(1)?;
                Command::Kernel(parse_fd(args.first().copied())?)
            }
            "initrd" => {
                arity(1)?;
                Command::Initrd(parse_fd(args.first().copied())?)
            }
            "cmdline" => Command::Cmdline(rest.to_string()),
            "com1" | "com2" | "com3" | "com4" => {
                arity(2)?;
                Command::Serial {
                    port: ComPort::ALL[usize::from(verb.as_bytes()[3] - b'1')],
                    input: parse_fd(args.first().copied())?,
                    output: parse_fd(args.get(1).copied())?,
                }
            }
            "device" => {
                if args.len() < 2 || args.len() > 3 {
                    return Err(ParseError("usage: device SLOT EMULATION [OPTIONS]".into()));
                }
                Command::Device {
                    slot: parse_slot(args[0])?,
                    emulation: args[1].to_string(),
                    options: args
                        .get(2)
                        .map(|o| {
                            o.split(',')
                                .filter(|s| !s.is_empty())
                                .map(String::from)
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            }
            "set" => {
                arity(1)?;
                let (k, v) = args[0]
                    .split_once('=')
                    .ok_or_else(|| ParseError("usage: set KEY=VALUE".into()))?;
                Command::Set {
                    key: k.to_string(),
                    value: v.to_string(),
                }
            }
            "run" | "reinit" | "reset" | "poweroff" | "force-poweroff" | "suspend" => {
                arity(0)?;
                match verb {
                    "run" => Command::Run,
                    "reinit" => Command::Reinit,
                    "reset" => Command::Reset,
                    "poweroff" => Command::PowerOff,
                    "force-poweroff" => Command::ForcePowerOff,
                    _ => Command::Suspend,
                }
            }
            "" => return Err(ParseError("empty command".into())),
            other => return Err(ParseError(format!("unknown command '{other}'"))),
        };
        Ok(cmd)
    }
}

impl fmt::Display for PciSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.bus, self.slot, self.func)
    }
}

impl fmt::Display for Command {
    /// The line that [`Command::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A bare number below 1024 would mean MiB: say megabytes when exact.
            Command::Memory(b) if b % (1 << 20) == 0 => write!(f, "memory {}M", b >> 20),
            Command::Memory(b) => write!(f, "memory {b}"),
            Command::Cpus(t) => {
                write!(
                    f,
                    "cpus {} sockets={} cores={} threads={}",
                    t.cpus, t.sockets, t.cores, t.threads
                )
            }
            Command::Bootrom(fd) => write!(f, "bootrom {fd}"),
            Command::BootVars(fd) => write!(f, "bootvars {fd}"),
            Command::Kernel(fd) => write!(f, "kernel {fd}"),
            Command::Initrd(fd) => write!(f, "initrd {fd}"),
            Command::Cmdline(text) => write!(f, "cmdline {text}"),
            Command::Serial {
                port,
                input,
                output,
            } => {
                write!(f, "com{} {input} {output}", port.number())
            }
            Command::Device {
                slot,
                emulation,
                options,
            } if options.is_empty() => {
                write!(f, "device {slot} {emulation}")
            }
            Command::Device {
                slot,
                emulation,
                options,
            } => {
                write!(f, "device {slot} {emulation} {}", options.join(","))
            }
            Command::Set { key, value } => write!(f, "set {key}={value}"),
            Command::Run => f.write_str("run"),
            Command::Reinit => f.write_str("reinit"),
            Command::Reset => f.write_str("reset"),
            Command::PowerOff => f.write_str("poweroff"),
            Command::ForcePowerOff => f.write_str("force-poweroff"),
            Command::Suspend => f.write_str("suspend"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_named_by_commands() {
        let d = |l: &str| Command::parse(l).unwrap().descriptors();
        assert_eq!(d("bootrom 5"), vec![5]);
        assert_eq!(d("com1 0 1"), vec![0, 1]);
        assert_eq!(d("com2 4 4"), vec![4]);
        assert_eq!(d("device 3 virtio-blk fd=7,ro"), vec![7]);
        assert_eq!(d("device 4 virtio-console fd=8:9"), vec![8, 9]);
        assert_eq!(d("device 4 virtio-net slirp,fd=x"), Vec::<i32>::new());
        assert_eq!(d("memory 64M"), Vec::<i32>::new());
        assert!(Command::parse("kernel 3").unwrap().is_image());
        assert!(!Command::parse("com1 0 1").unwrap().is_image());
    }

    #[test]
    fn sizes_follow_bhyve() {
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999999T").is_err());
        assert!(parse_size("9999999999T").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        for bad in ["", "M", "12X", "-5", "+5", " ", "5 M"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
    }

    #[test]
    fn commands_parse() {
        assert_eq!(
            Command::parse("memory 512M\n").unwrap(),
            Command::Memory(512 << 20)
        );
        assert_eq!(Command::parse("bootrom 5").unwrap(), Command::Bootrom(5));
        assert_eq!(Command::parse("bootvars 6").unwrap(), Command::BootVars(6));
        assert_eq!(Command::parse("bootvars 6").unwrap().descriptors(), vec![6]);
        assert_eq!(
            Command::parse("com1 0 1").unwrap(),
            Command::Serial {
                port: ComPort::Com1,
                input: 0,
                output: 1
            }
        );
        assert_eq!(
            Command::parse("cpus cpus=4 sockets=2 cores=2").unwrap(),
            Command::Cpus(Topology {
                cpus: 4,
                sockets: 2,
                cores: 2,
                threads: 1
            })
        );
        assert_eq!(
            Command::parse("device 3:0 virtio-blk fd=7,ro").unwrap(),
            Command::Device {
                slot: PciSlot {
                    bus: 0,
                    slot: 3,
                    func: 0
                },
                emulation: "virtio-blk".into(),
                options: vec!["fd=7".into(), "ro".into()],
            }
        );
        assert_eq!(
            Command::parse("cmdline console=ttyS0 quiet").unwrap(),
            Command::Cmdline("console=ttyS0 quiet".into())
        );
    }

    #[test]
    fn bad_commands_are_einval() {
        for bad in [
            "",
            "fly",
            "memory",
            "bootrom -1",
            "bootrom x",
            "run now",
            "device 40 hostbridge",
            "cpus 0",
            "cpus 300",
            "cpus sockets=0 cores=2 threads=32768",
            "cpus sockets=256 cores=256 threads=256",
            "com1 0",
            "run\nrun",
            "set novalue",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_round_trips() {
        for line in [
            "memory 512M",
            "memory 4096",
            "cpus 4 sockets=2 cores=2 threads=1",
            "bootrom 5",
            "bootvars 6",
            "kernel 6",
            "initrd 7",
            "cmdline console=ttyS0 root=/dev/vda",
            "com1 0 1",
            "com2 3 4",
            "com4 3 4",
            "device 0:3:0 virtio-blk fd=7,ro",
            "device 0:0:0 hostbridge",
            "set x86.x2apic=true",
            "run",
            "reinit",
            "reset",
            "poweroff",
            "force-poweroff",
            "suspend",
        ] {
            let cmd = Command::parse(line).unwrap();
            assert_eq!(cmd.to_string(), line);
            assert_eq!(Command::parse(&cmd.to_string()).unwrap(), cmd);
        }
    }
}
