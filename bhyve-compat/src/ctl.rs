//! bhyvectl(8): the subset that makes sense on vmmfs.

use crate::error::Error;
use crate::run::warnx;
use crate::vmmdev::VmmDev;
use nix::errno::Errno;
use vmm_protocol::command::Command;

/// Parsed bhyvectl command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtlArgs {
    pub vm: Option<String>,
    pub cpu: Option<String>,
    pub create: bool,
    pub destroy: bool,
    pub get_stats: bool,
    pub force_reset: bool,
    pub force_poweroff: bool,
    pub get_memmap: bool,
    pub get_all: bool,
}

/// Open vmmctl, or say why not.
fn open_ctl(prog: &str, dev: &VmmDev) -> Option<crate::vmmdev::Ctl> {
    dev.open_ctl()
        .map_err(|e| {
            warnx(
                prog,
                &Error::open_ctl(&dev.ctl_path(), dev.dir(), e).to_string(),
            )
        })
        .ok()
}

/// bhyvectl's usage text.
pub fn ctl_usage(prog: &str) -> String {
    format!(
        "Usage: {prog} --vm=<vmname>\n\
         \x20      [--cpu=<vcpu_number>]\n\
         \x20      [--create]\n\
         \x20      [--destroy]\n\
         \x20      [--get-all]\n\
         \x20      [--get-stats]\n\
         \x20      [--get-memmap]\n\
         \x20      [--force-reset]\n\
         \x20      [--force-poweroff]\n"
    )
}

/// Parse bhyvectl's long options (getopt_long: `--opt=value` or `--opt value`,
/// unambiguous prefixes accepted). Errors are the messages to print before
/// the usage text.
pub fn parse_ctl_args(args: &[String]) -> Result<CtlArgs, String> {
    const WITH_ARG: &[&str] = &["vm", "cpu"];
    const FLAGS: &[&str] = &[
        "create",
        "destroy",
        "get-stats",
        "force-reset",
        "force-poweroff",
        "get-memmap",
        "get-all",
    ];
    let mut a = CtlArgs::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(body) = arg.strip_prefix("--") else {
            return Err(format!("unrecognized argument '{arg}'"));
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let all: Vec<&str> = WITH_ARG.iter().chain(FLAGS.iter()).copied().collect();
        let matched: Vec<&str> = if all.contains(&name) {
            vec![name]
        } else {
            all.iter()
                .copied()
                .filter(|o| !name.is_empty() && o.starts_with(name))
                .collect()
        };
        let opt = match matched.as_slice() {
            [one] => *one,
            [] => return Err(format!("unrecognized option '{arg}'")),
            _ => return Err(format!("option '{arg}' is ambiguous")),
        };
        if WITH_ARG.contains(&opt) {
            let v = match value {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("option '--{opt}' requires an argument"))?
                }
            };
            match opt {
                "vm" => a.vm = Some(v),
                _ => a.cpu = Some(v),
            }
        } else {
            if value.is_some() {
                return Err(format!("option '--{opt}' doesn't allow an argument"));
            }
            match opt {
                "create" => a.create = true,
                "destroy" => a.destroy = true,
                "get-stats" => a.get_stats = true,
                "force-reset" => a.force_reset = true,
                "force-poweroff" => a.force_poweroff = true,
                "get-memmap" => a.get_memmap = true,
                _ => a.get_all = true,
            }
        }
        i += 1;
    }
    Ok(a)
}

fn vm_open_failed(name: &str, e: Errno) -> i32 {
    eprintln!(
        "vm_open: {name} could not be opened: {}",
        crate::error::strerror(e)
    );
    1
}

/// Entry point of `bhyvectl`; returns the exit status.
pub fn bhyvectl_main(prog: &str, args: &[String]) -> i32 {
    let a = match parse_ctl_args(args) {
        Ok(a) => a,
        Err(msg) => {
            warnx(prog, &msg);
            eprint!("{}", ctl_usage(prog));
            return 1;
        }
    };
    let Some(name) = a.vm.clone() else {
        eprint!("{}", ctl_usage(prog));
        return 1;
    };
    let actions = [a.create, a.destroy, a.force_reset, a.force_poweroff]
        .iter()
        .filter(|b| **b)
        .count();
    if actions > 1 {
        warnx(
            prog,
            "--create, --destroy, --force-reset and --force-poweroff are mutually exclusive",
        );
        return 1;
    }
    let dev = VmmDev::from_env();
    if a.create {
        let Some(ctl) = open_ctl(prog, &dev) else {
            return 1;
        };
        if let Err(e) = ctl.create(&name, false) {
            let msg = match e {
                Errno::EPERM => format!("vm_create: {}", Error::Unprivileged),
                e => Error::create(e).to_string(),
            };
            warnx(prog, &msg);
            return 1;
        }
    }
    let vm = match dev.open_vm(&name) {
        Ok(vm) => vm,
        Err(e) => {
            if let Some(missing) = Error::daemon_missing(&dev.ctl_path(), dev.dir()) {
                warnx(prog, &missing.to_string());
                return 1;
            }
            return vm_open_failed(&name, e);
        }
    };
    let mut rc = 0;
    if a.get_stats || a.get_all {
        match vm.status() {
            Ok(st) => {
                for (k, v) in &st.vars {
                    // FreeBSD's VMM statistic, which managers grep for.
                    if k == "resident" {
                        println!("{:<40}\t{v}", "Resident memory");
                    } else {
                        println!("{k}\t{v}");
                    }
                }
            }
            Err(e) => {
                warnx(prog, &Error::sys("vm_get_stats", e).to_string());
                rc = 1;
            }
        }
    }
    if a.get_memmap || a.get_all {
        match dev.segments(&name) {
            Ok(segs) => {
                println!("{:<4}{:<20}Name", "ID", "Length");
                for (i, (seg, len)) in segs.iter().enumerate() {
                    println!("{:<4}{:<20}{}", i, format!("{len:#x}"), seg);
                }
            }
            Err(e) => {
                warnx(prog, &Error::sys("vm_get_memmap", e).to_string());
                rc = 1;
            }
        }
    }
    for (flag, cmd, what) in [
        (a.force_reset, Command::Reset, "vm_reset"),
        (
            a.force_poweroff,
            Command::ForcePowerOff,
            "vm_force_poweroff",
        ),
    ] {
        if flag {
            if let Err(e) = vm.command(&cmd) {
                let desc = e
                    .errno()
                    .map(crate::error::strerror)
                    .unwrap_or_else(|| e.to_string());
                warnx(prog, &format!("{what}: {desc}"));
                rc = 1;
            }
        }
    }
    drop(vm);
    if a.destroy {
        let Some(ctl) = open_ctl(prog, &dev) else {
            return 1;
        };
        if let Err(e) = ctl.destroy(&name) {
            warnx(prog, &format!("vm_destroy: {}", crate::error::strerror(e)));
            rc = 1;
        }
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<CtlArgs, String> {
        parse_ctl_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn long_options() {
        let a = p(&["--vm=vm1", "--get-stats", "--force-reset"]).unwrap();
        assert_eq!(a.vm.as_deref(), Some("vm1"));
        assert!(a.get_stats && a.force_reset && !a.destroy);
        let a = p(&["--vm", "vm2", "--destroy"]).unwrap();
        assert_eq!(a.vm.as_deref(), Some("vm2"));
        assert!(a.destroy);
        let a = p(&["--vm=x", "--get-mem"]).unwrap();
        assert!(a.get_memmap);
        assert!(p(&["--vm"]).is_err());
        assert!(p(&["--bogus"]).is_err());
        assert!(p(&["--get"]).is_err());
        assert!(p(&["--destroy=yes"]).is_err());
        assert!(p(&["vm1"]).is_err());
        assert!(p(&["--"]).is_err());
        assert!(ctl_usage("bhyvectl").starts_with("Usage: bhyvectl --vm=<vmname>\n"));
    }
}
