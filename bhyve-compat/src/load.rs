//! bhyveload(8), Linux edition: create a VM and load a Linux kernel, initrd and
//! command line into it; `bhyve` (without a boot ROM) then runs it.

use crate::error::Error;
use crate::getopt::{getopt, Opt};
use crate::run::warnx;
use crate::vmmdev::VmmDev;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use std::os::fd::{AsRawFd, OwnedFd};
use vmm_protocol::command::Command;

/// Parsed bhyveload command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadArgs {
    pub mem: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub name: String,
}

/// bhyveload's usage text.
pub fn load_usage(prog: &str) -> String {
    format!(
        "usage: {prog} [-m mem-size] -k kernel [-i initrd] [-c cmdline]\n\
         \x20      {pad} [-e name=value] vmname\n",
        pad = " ".repeat(prog.len())
    )
}

/// What `-d DISK` gets: FreeBSD's bhyveload runs the FreeBSD loader from
/// the disk; this edition loads Linux kernels only, and a disk boots with
/// UEFI firmware instead.
pub fn disk_boot_message(disk: &str) -> String {
    format!(
        "-d {disk}: booting a disk through the FreeBSD loader is not supported; \
         boot it with UEFI firmware instead: bhyve -l bootrom,/usr/share/OVMF/OVMF_CODE_4M.fd,VARS \
         -s N,virtio-blk,{disk} ... (VARS: your copy of /usr/share/OVMF/OVMF_VARS_4M.fd; see bhyve(8), FIRMWARE)"
    )
}

/// Parse bhyveload's arguments. `Err(None)`: usage; `Err(Some(msg))`: message.
pub fn parse_load_args(args: &[String]) -> Result<LoadArgs, Option<String>> {
    let (opts, operands) = getopt(args, "c:d:e:i:k:m:h");
    let mut mem = 256u64 << 20;
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline: Option<String> = None;
    let mut env: Vec<String> = Vec::new();
    for o in opts {
        match o {
            Opt::Flag('m', Some(v)) => {
                mem = crate::memsize::parse_memsize(&v)
                    .ok_or_else(|| Some(format!("Invalid memsize '{v}'")))?;
            }
            Opt::Flag('d', Some(v)) => return Err(Some(disk_boot_message(&v))),
            Opt::Flag('k', Some(v)) => kernel = Some(v),
            Opt::Flag('i', Some(v)) => initrd = Some(v),
            Opt::Flag('c', Some(v)) => cmdline = Some(v),
            Opt::Flag('e', Some(v)) => env.push(v),
            Opt::Illegal(c) => return Err(Some(format!("illegal option -- {c}"))),
            Opt::MissingArg(c) => return Err(Some(format!("option requires an argument -- {c}"))),
            _ => return Err(None),
        }
    }
    let [name] = operands.as_slice() else {
        return Err(None);
    };
    let kernel = kernel.ok_or(None)?;
    if !env.is_empty() {
        let mut c = cmdline.unwrap_or_default();
        for e in env {
            if !c.is_empty() {
                c.push(' ');
            }
            c.push_str(&e);
        }
        cmdline = Some(c);
    }
    if cmdline.as_deref().is_some_and(|c| c.contains(['\n', '\0'])) {
        return Err(Some("invalid kernel command line".into()));
    }
    Ok(LoadArgs {
        mem,
        kernel,
        initrd,
        cmdline,
        name: name.clone(),
    })
}

fn open_ro(path: &str) -> Result<OwnedFd, Error> {
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys(format!("open {path}"), e))
}

/// Entry point of `bhyveload`; returns the exit status.
pub fn bhyveload_main(prog: &str, args: &[String]) -> i32 {
    let a = match parse_load_args(args) {
        Ok(a) => a,
        Err(msg) => {
            if let Some(m) = msg {
                warnx(prog, &m);
            }
            eprint!("{}", load_usage(prog));
            return 1;
        }
    };
    match load(&a) {
        Ok(()) => 0,
        Err(e) => {
            warnx(prog, &e.to_string());
            1
        }
    }
}

fn load(a: &LoadArgs) -> Result<(), Error> {
    let kernel = open_ro(&a.kernel)?;
    let initrd = a.initrd.as_deref().map(open_ro).transpose()?;
    let dev = VmmDev::from_env();
    let ctl = dev
        .open_ctl()
        .map_err(|e| Error::open_ctl(&dev.ctl_path(), dev.dir(), e))?;
    let created = match ctl.create(&a.name, false) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(Errno::EPERM) => {
            return Err(Error::Other(format!("vm_create: {}", Error::Unprivileged)))
        }
        Err(e) => return Err(Error::create(e)),
    };
    let result = (|| {
        let vm = dev.open_vm(&a.name).map_err(|e| {
            Error::Other(format!(
                "vm_open: {} could not be opened: {}",
                a.name,
                crate::error::strerror(e)
            ))
        })?;
        let st = vm
            .status()
            .map_err(|e| Error::sys(format!("vm_open: {}", a.name), e))?;
        match st.state() {
            "running" => {
                return Err(Error::Other(format!("vm {} is running", a.name)));
            }
            "exited" => vm.command(&Command::Reinit)?,
            _ => {}
        }
        vm.command(&Command::Memory(a.mem))?;
        vm.command(&Command::Kernel(kernel.as_raw_fd()))?;
        if let Some(i) = &initrd {
            vm.command(&Command::Initrd(i.as_raw_fd()))?;
        }
        if let Some(c) = &a.cmdline {
            vm.command(&Command::Cmdline(c.clone()))?;
        }
        Ok(())
    })();
    if result.is_err() && created {
        let _ = ctl.destroy(&a.name);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<LoadArgs, Option<String>> {
        parse_load_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// FreeBSD's `bhyveload -d disk.img vm` (vmrun.sh, vm-bhyve's
    /// loader=bhyveload) gets a message that points to UEFI boot.
    #[test]
    fn disk_boot_points_to_uefi() {
        let msg = p(&["-m", "1G", "-d", "/vm/disk.img", "vm1"])
            .unwrap_err()
            .unwrap();
        assert!(msg.starts_with(
            "-d /vm/disk.img: booting a disk through the FreeBSD loader is not supported"
        ));
        assert!(msg.contains("bhyve -l bootrom,/usr/share/OVMF/OVMF_CODE_4M.fd,VARS"));
        // Sizes as FreeBSD's expand_number.
        assert_eq!(p(&["-m", "1GB", "-k", "k", "vm"]).unwrap().mem, 1 << 30);
        assert_eq!(
            p(&["-m", "0x20000000", "-k", "k", "vm"]).unwrap().mem,
            512 << 20
        );
    }

    #[test]
    fn arguments() {
        let a = p(&[
            "-m",
            "512M",
            "-k",
            "/boot/vmlinuz",
            "-i",
            "/boot/initrd",
            "-c",
            "console=ttyS0",
            "-e",
            "quiet",
            "vm1",
        ])
        .unwrap();
        assert_eq!(a.mem, 512 << 20);
        assert_eq!(a.kernel, "/boot/vmlinuz");
        assert_eq!(a.initrd.as_deref(), Some("/boot/initrd"));
        assert_eq!(a.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(a.name, "vm1");
        let a = p(&["-k", "k", "vm"]).unwrap();
        assert_eq!(a.mem, 256 << 20);
        assert_eq!(p(&["vm"]), Err(None));
        assert_eq!(p(&["-k", "k"]), Err(None));
        assert_eq!(p(&["-k", "k", "a", "b"]), Err(None));
        assert_eq!(p(&["-h"]), Err(None));
        assert!(matches!(p(&["-m", "lots", "-k", "k", "vm"]), Err(Some(_))));
        assert!(matches!(p(&["-z", "vm"]), Err(Some(_))));
        assert!(load_usage("bhyveload").starts_with("usage: bhyveload [-m mem-size] -k kernel"));
    }
}
