//! Host resources a VM uses (boot ROM, kernel, disks, consoles, network back
//! ends), opened as the invoking user *before* the VM is created, and the
//! `vmm/NAME` commands that hand their descriptors to the daemon.

use crate::error::{Error, Result};
use crate::plan::{Backend, Console, NetBackend, Plan};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use vmm_protocol::command::{ComPort, Command as VmmCommand};

/// A serial port's descriptors.
#[derive(Debug)]
pub enum ConsoleFds {
    /// fds 0 and 1.
    Stdio,
    /// One read-write descriptor.
    File(OwnedFd),
}

impl ConsoleFds {
    fn pair(&self) -> (RawFd, RawFd) {
        match self {
            ConsoleFds::Stdio => (0, 1),
            ConsoleFds::File(f) => (f.as_raw_fd(), f.as_raw_fd()),
        }
    }
}

/// Everything opened for a plan; descriptors stay open for bhyve's lifetime.
#[derive(Debug, Default)]
pub struct Resources {
    pub bootrom: Option<OwnedFd>,
    /// The UEFI variable store (`-l bootrom,ROM,VARS`), opened read-write.
    pub bootvars: Option<OwnedFd>,
    pub kernel: Option<OwnedFd>,
    pub initrd: Option<OwnedFd>,
    pub com1: Option<ConsoleFds>,
    pub com2: Option<ConsoleFds>,
    pub com3: Option<ConsoleFds>,
    pub com4: Option<ConsoleFds>,
    /// Per device of the plan (same order): its descriptor, if it has one.
    pub devices: Vec<Option<OwnedFd>>,
    /// Per device: the descriptors of its AHCI ports (none for others).
    pub ports: Vec<Vec<OwnedFd>>,
    /// Helper processes (passt), ended when bhyve ends.
    pub helpers: Vec<Child>,
    /// virtio-console ports: the socket bhyve listens on and its end of the
    /// socket pair whose other end is the device's descriptor.
    pub console_ports: Vec<(OwnedFd, OwnedFd)>,
}

impl Drop for Resources {
    fn drop(&mut self) {
        for h in &mut self.helpers {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

fn open_ro(path: &str) -> std::result::Result<OwnedFd, Errno> {
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
}

fn open_console(path: &str) -> Result<OwnedFd> {
    open(
        path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::sys(format!("open {path}"), e))
}

/// Open a disk image read-write, falling back to read-only as bhyve's
/// block_if does; returns the descriptor and whether it is read-only.
fn open_disk(path: &str, ro: bool) -> Result<(OwnedFd, bool)> {
    let bad = |e| Error::sys(format!("Could not open backing file: {path}"), e);
    if ro {
        return open_ro(path).map(|f| (f, true)).map_err(bad);
    }
    match open(path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()) {
        Ok(f) => Ok((f, false)),
        Err(first) => match open_ro(path) {
            Ok(f) => Ok((f, true)),
            Err(_) => Err(bad(first)),
        },
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attach to tap interface `name` through /dev/net/tun (needs a persistent tap
/// owned by the user, or CAP_NET_ADMIN).
fn open_tap(name: &str) -> Result<OwnedFd> {
    let fail = |e| Error::sys(format!("open of tap device {name} failed"), e);
    let fd = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    let n = name.len().min(15);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes) we own for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(fail(Errno::last()));
    }
    Ok(fd)
}

/// Start passt (user-mode NAT, runs as the invoking user) on one end of a
/// socketpair; the other end goes to the VM.
/// Without `open`, outbound traffic is restricted as far as passt allows:
/// its sockets are bound to 127.0.0.1 (`-o`), so the guest reaches the host's
/// own addresses (the gateway 10.0.2.2 is the host's loopback) but nothing
/// beyond the host; hostfwd rules (inbound) are unaffected. passt has no
/// switch that refuses outbound connections outright.
fn start_slirp(
    hostfwd: &[crate::plan::HostFwd],
    open: bool,
    helpers: &mut Vec<Child>,
) -> Result<OwnedFd> {
    let (ours, theirs) = stream_pair("slirp")?;
    // The child's copy must survive exec: dup it without CLOEXEC.
    let theirs_raw = nix::unistd::dup(&theirs).map_err(|e| Error::sys("slirp: dup", e))?;
    let mut cmd = Command::new("passt");
    cmd.args(["-f", "-q", "-1", "-F"])
        .arg(theirs_raw.as_raw_fd().to_string())
        .args(["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2"])
        .args(["--dns-forward", "10.0.2.3"])
        .args(if open {
            &[][..]
        } else {
            &["-o", "127.0.0.1"][..]
        })
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for r in hostfwd {
        let spec = match &r.host_addr {
            Some(a) => format!("{a}/{}:{}", r.host_port, r.guest_port),
            None => format!("{}:{}", r.host_port, r.guest_port),
        };
        if r.udp {
            udp.push(spec);
        } else {
            tcp.push(spec);
        }
    }
    for t in tcp {
        cmd.args(["-t", &t]);
    }
    for u in udp {
        cmd.args(["-u", &u]);
    }
    if !hostfwd.iter().any(|r| !r.udp) {
        cmd.args(["-t", "none"]);
    }
    if !hostfwd.iter().any(|r| r.udp) {
        cmd.args(["-u", "none"]);
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("slirp: cannot start passt", &e))?;
    drop(theirs_raw);
    drop(theirs);
    helpers.push(child);
    Ok(ours)
}

/// A virtio-console port as bhyve makes it: a UNIX socket listening at
/// `path` (created as the invoking user; a stale socket there is replaced).
/// Returns the listener, bhyve's end of a socket pair and the device's end.
fn console_port(path: &str) -> Result<(OwnedFd, OwnedFd, OwnedFd)> {
    use std::os::unix::fs::FileTypeExt;
    let fail =
        |e: std::io::Error| Error::io(format!("virtio-console: cannot listen on {path}"), &e);
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(fail)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(fail)?;
    let (ours, device) = stream_pair("virtio-console")?;
    Ok((OwnedFd::from(listener), ours, device))
}

/// A serial port on TCP (`tcp=[IP:]PORT`): a socket listening at the
/// address, loopback when only a port is given, opened by bhyve as the
/// invoking user; like a console port it is relayed to the device's end of
/// a socket pair, one client at a time.
fn tcp_console(addr: &str) -> std::result::Result<(OwnedFd, OwnedFd, OwnedFd), String> {
    let spec = match addr.strip_prefix(':').unwrap_or(addr) {
        p if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() => format!("127.0.0.1:{p}"),
        _ => addr.to_string(),
    };
    let sa: std::net::SocketAddr = spec
        .parse()
        .map_err(|_| "expected IP:PORT or PORT".to_string())?;
    let listener = std::net::TcpListener::bind(sa).map_err(|e| e.to_string())?;
    let (ours, device) = stream_pair("tcp console").map_err(|e| e.to_string())?;
    Ok((OwnedFd::from(listener), ours, device))
}

/// A connected pair of UNIX stream sockets (close-on-exec): bhyve's end and
/// the end a device or helper gets.
fn stream_pair(what: &str) -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::sys(format!("{what}: socketpair"), e))
}

/// Relay between a console port's listening socket and the device: one
/// client at a time; while nobody is connected the guest's output is
/// dropped (as bhyve does). Runs on a thread of the process that runs the
/// guest, until that process ends.
pub fn start_console_relays(res: &Resources) {
    for (listener, ours) in &res.console_ports {
        let (Ok(l), Ok(o)) = (listener.try_clone(), ours.try_clone()) else {
            continue;
        };
        let _ = std::thread::Builder::new()
            .name("vtcon-relay".into())
            .spawn(move || console_relay(l, o));
    }
}

fn console_relay(listener: OwnedFd, guest: OwnedFd) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, FromRawFd};
    // A UNIX or a TCP listener: accept(2) serves both, and a socket reads
    // and writes as a file.
    let mut guest = std::fs::File::from(guest);
    let mut client: Option<std::fs::File> = None;
    let mut buf = [0u8; 4096];
    loop {
        let other = match &client {
            Some(c) => c.as_fd(),
            None => listener.as_fd(),
        };
        let mut fds = [
            PollFd::new(guest.as_fd(), PollFlags::POLLIN),
            PollFd::new(other, PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let (g, o) = (fds[0].any().unwrap_or(false), fds[1].any().unwrap_or(false));
        if g {
            match guest.read(&mut buf) {
                Ok(0) | Err(_) => return, // the device (the VM) is gone
                Ok(n) => {
                    if let Some(c) = &mut client {
                        if c.write_all(&buf[..n]).is_err() {
                            client = None;
                        }
                    }
                }
            }
        }
        if o {
            match &mut client {
                None => {
                    client = nix::sys::socket::accept4(
                        listener.as_raw_fd(),
                        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                    )
                    .ok()
                    // SAFETY: accept4 returned a new descriptor we own.
                    .map(|fd| unsafe { std::fs::File::from_raw_fd(fd) })
                }
                Some(c) => match c.read(&mut buf) {
                    Ok(0) | Err(_) => client = None,
                    Ok(n) => {
                        if guest.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                },
            }
        }
    }
}

/// VFIO: open /dev/vfio/vfio and the device's group as the user, then report
/// that this engine has no passthrough.
fn passthru(host: &str) -> Result<OwnedFd> {
    let ctl = "/dev/vfio/vfio";
    open(ctl, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys(format!("failed to open {ctl}"), e))?;
    let parts: Vec<&str> = host.split('/').collect();
    if let [b, s, f] = parts.as_slice() {
        let (b, s, f): (u32, u32, u32) = (
            b.parse().unwrap_or(0),
            s.parse().unwrap_or(0),
            f.parse().unwrap_or(0),
        );
        let link = format!("/sys/bus/pci/devices/0000:{b:02x}:{s:02x}.{f:x}/iommu_group");
        if let Ok(target) = std::fs::read_link(&link) {
            if let Some(group) = target.file_name().and_then(|g| g.to_str()) {
                let gpath = format!("/dev/vfio/{group}");
                open(
                    gpath.as_str(),
                    OFlag::O_RDWR | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| Error::sys(format!("failed to open {gpath}"), e))?;
            }
        }
    }
    Err(Error::Config(format!(
        "passthru {host}: PCI passthrough is not supported by this engine"
    )))
}

/// Open every resource of `plan` as the invoking user.
pub fn open_resources(plan: &Plan) -> Result<Resources> {
    let mut r = Resources::default();
    if let Some(rom) = &plan.bootrom {
        r.bootrom = Some(open_ro(rom).map_err(|e| {
            Error::Config(format!(
                "Error opening bootrom \"{rom}\": {}",
                crate::error::strerror(e)
            ))
        })?);
    }
    if let Some(vars) = &plan.bootvars {
        let fd = open(
            vars.as_str(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        r.bootvars = Some(fd.map_err(|e| {
            Error::Config(format!(
                "Error opening bootvars \"{vars}\": {}",
                crate::error::strerror(e)
            ))
        })?);
    }
    if let Some(l) = &plan.linux {
        r.kernel =
            Some(open_ro(&l.kernel).map_err(|e| Error::sys(format!("open {}", l.kernel), e))?);
        if let Some(i) = &l.initrd {
            r.initrd = Some(open_ro(i).map_err(|e| Error::sys(format!("open {i}"), e))?);
        }
    }
    for (name, port, con) in [
        ("com1", &mut r.com1, &plan.com1),
        ("com2", &mut r.com2, &plan.com2),
        ("com3", &mut r.com3, &plan.com3),
        ("com4", &mut r.com4, &plan.com4),
    ] {
        *port = match con {
            None => None,
            Some(Console::Stdio) => Some(ConsoleFds::Stdio),
            Some(Console::Path(p)) => Some(ConsoleFds::File(open_console(p)?)),
            Some(Console::Tcp(a)) => {
                let (listener, ours, device) = tcp_console(a).map_err(|e| {
                    Error::Config(format!(
                        "Unable to initialize backend 'tcp={a}' for LPC device {name}: {e}"
                    ))
                })?;
                r.console_ports.push((listener, ours));
                Some(ConsoleFds::File(device))
            }
        };
    }
    for d in &plan.devices {
        let mut ports = Vec::new();
        if let Backend::Ahci(ps) = &d.backend {
            for p in ps {
                ports.push(open_disk(&p.path, p.ro)?.0);
            }
        }
        r.ports.push(ports);
        let fd = match &d.backend {
            Backend::None | Backend::Ahci(_) => None,
            Backend::Disk { path, ro } => Some(open_disk(path, *ro)?.0),
            Backend::Net(NetBackend::Tap(name)) => Some(open_tap(name)?),
            Backend::Net(NetBackend::Slirp { hostfwd, open }) => {
                Some(start_slirp(hostfwd, *open, &mut r.helpers)?)
            }
            Backend::Passthru { host } => Some(passthru(host)?),
            Backend::ConsolePort { path } => {
                let (listener, ours, device) = console_port(path)?;
                r.console_ports.push((listener, ours));
                Some(device)
            }
        };
        r.devices.push(fd);
    }
    Ok(r)
}

/// One command for the VM; `optional` ones an engine may not know (EOPNOTSUPP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCommand {
    pub cmd: VmmCommand,
    pub optional: bool,
}

/// The configuration commands for `plan` with the descriptors of `res`.
/// `with_memory`: include `memory` (false when the VM already has memory, as
/// prepared by bhyveload).
pub fn commands(plan: &Plan, res: &Resources, with_memory: bool) -> Vec<VmCommand> {
    let mut out = Vec::new();
    let mut push = |cmd: VmmCommand, optional: bool| out.push(VmCommand { cmd, optional });
    if with_memory {
        push(VmmCommand::Memory(plan.memsize), false);
    }
    push(plan.cpus_command(), false);
    // Only keys the engine acts on; bhyve's others have no effect here and
    // are not worth a refused round trip each.
    for (k, v) in plan
        .platform
        .iter()
        .filter(|(k, _)| vmm_protocol::command::SET_KEYS.contains(&k.as_str()))
    {
        push(
            VmmCommand::Set {
                key: k.clone(),
                value: v.clone(),
            },
            true,
        );
    }
    if let Some(fd) = &res.bootrom {
        push(VmmCommand::Bootrom(fd.as_raw_fd()), false);
    }
    if let Some(fd) = &res.bootvars {
        push(VmmCommand::BootVars(fd.as_raw_fd()), false);
    }
    if let Some(fd) = &res.kernel {
        push(VmmCommand::Kernel(fd.as_raw_fd()), false);
    }
    if let Some(fd) = &res.initrd {
        push(VmmCommand::Initrd(fd.as_raw_fd()), false);
    }
    if let Some(c) = plan.linux.as_ref().and_then(|l| l.cmdline.as_ref()) {
        push(VmmCommand::Cmdline(c.clone()), false);
    }
    for (port, con) in [
        (ComPort::Com1, &res.com1),
        (ComPort::Com2, &res.com2),
        (ComPort::Com3, &res.com3),
        (ComPort::Com4, &res.com4),
    ] {
        if let Some(c) = con {
            let (input, output) = c.pair();
            push(
                VmmCommand::Serial {
                    port,
                    input,
                    output,
                },
                false,
            );
        }
    }
    for (i, (d, fd)) in plan.devices.iter().zip(res.devices.iter()).enumerate() {
        let mut options: Vec<String> = Vec::new();
        if let (Backend::Ahci(ps), Some(fds)) = (&d.backend, res.ports.get(i)) {
            for (p, fd) in ps.iter().zip(fds) {
                options.push(format!("port={}", if p.cd { "cd" } else { "hd" }));
                options.push(format!("fd={}", fd.as_raw_fd()));
                if p.ro {
                    options.push("ro".into());
                }
                options.extend(p.options.iter().cloned());
            }
        }
        if let Backend::Net(nb) = &d.backend {
            options.push(
                match nb {
                    NetBackend::Slirp { .. } => "slirp",
                    NetBackend::Tap(_) => "tap",
                }
                .into(),
            );
        }
        if let Some(fd) = fd {
            options.push(format!("fd={}", fd.as_raw_fd()));
        }
        options.extend(d.options.iter().cloned());
        push(
            VmmCommand::Device {
                slot: d.pci_slot(),
                // ahci-hd and ahci-cd are one-port controllers: the engine's
                // ahci with that port.
                emulation: match d.backend {
                    Backend::Ahci(_) => "ahci".into(),
                    _ => d.emulation.clone(),
                },
                options,
            },
            false,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn command_lines() {
        let mut c = Config::with_defaults();
        c.set("name", "vm1");
        c.set("memory.size", "64M");
        c.set("lpc.com1.path", "stdio");
        c.set("acpi_tables", "true");
        c.set("rtc.use_localtime", "false");
        c.parse_pci_slot("0,hostbridge").unwrap();
        c.parse_pci_slot("4,virtio-rnd").unwrap();
        let plan = crate::plan::plan(&c).unwrap();
        let mut res = open_resources(&plan).unwrap();
        res.bootrom = Some(open_ro("/dev/null").unwrap());
        let fd = res.bootrom.as_ref().unwrap().as_raw_fd();
        let lines: Vec<String> = commands(&plan, &res, true)
            .into_iter()
            .map(|c| c.cmd.to_string())
            .collect();
        assert_eq!(
            lines,
            vec![
                "memory 64M".to_string(),
                "cpus 1 sockets=1 cores=1 threads=1".into(),
                // acpi_tables and the default x86.strictmsr: the engine has
                // no use for them, so they are not sent.
                "set rtc.use_localtime=false".into(),
                format!("bootrom {fd}"),
                "com1 0 1".into(),
                "device 0:0:0 hostbridge".into(),
                "device 0:4:0 virtio-rnd".into(),
            ]
        );
        let lines = commands(&plan, &res, false);
        assert!(!matches!(lines[0].cmd, VmmCommand::Memory(_)));
    }

    #[test]
    fn unopenable_resources_fail_with_os_error() {
        let mut c = Config::with_defaults();
        c.set("name", "vm1");
        c.set("lpc.bootrom", "/nonexistent/rom");
        let plan = crate::plan::plan(&c).unwrap();
        let e = open_resources(&plan).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Error opening bootrom \"/nonexistent/rom\": No such file or directory"
        );
        let mut c = Config::with_defaults();
        c.set("name", "vm1");
        c.parse_pci_slot("3,virtio-blk,/nonexistent/disk").unwrap();
        let plan = crate::plan::plan(&c).unwrap();
        let e = open_resources(&plan).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not open backing file: /nonexistent/disk: No such file or directory"
        );
        assert_eq!(e.bhyve_status(), 4);
    }
}
