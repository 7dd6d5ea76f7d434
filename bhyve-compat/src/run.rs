//! bhyve's life cycle on vmmfs: create or open the VM, configure it, run it,
//! wait for the exit status; monitor mode (-M) with a parent that keeps the
//! vmmctl descriptor and a child per guest boot.

use crate::cli::{lpc_help, parse_bhyve_args, pci_help, usage_text, Invocation};
use crate::error::{Error, Result};
use crate::plan::{plan, Console, Plan};
use crate::resources::{commands, open_resources, Resources};
use crate::term;
use crate::vmmdev::{Ctl, VmHandle, VmmDev, Wake};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe, ForkResult, Pid};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use vmm_protocol::command::Command;

/// Print "PROG: MSG" on stderr (warnx).
pub fn warnx(prog: &str, msg: &str) {
    // In raw mode a bare "\n" does not return the carriage.
    let cr = if term::is_raw() { "\r" } else { "" };
    let _ = writeln!(std::io::stderr(), "{prog}: {msg}{cr}");
}

fn handled_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        s.add(sig);
    }
    s
}

/// Entry point of `bhyve`; returns the exit status.
pub fn bhyve_main(prog: &str, args: &[String]) -> i32 {
    let inv = match parse_bhyve_args(args, &|p| std::fs::read_to_string(p)) {
        Ok(i) => i,
        Err(Error::Usage(msg)) => {
            if let Some(m) = msg {
                warnx(prog, &m);
            }
            eprint!("{}", usage_text(prog));
            return 1;
        }
        Err(e) => {
            warnx(prog, &e.to_string());
            return e.bhyve_status();
        }
    };
    let cfg = match inv {
        Invocation::Help => {
            eprint!("{}", usage_text(prog));
            return 0;
        }
        Invocation::ListPci => {
            print!("{}", pci_help());
            return 0;
        }
        Invocation::ListLpc => {
            print!("{}", lpc_help());
            return 0;
        }
        Invocation::Dump(cfg) => {
            print!("{}", cfg.dump());
            return 1;
        }
        Invocation::Run(cfg) => cfg,
    };
    for (var, what) in [
        ("gdb.port", "-G (debug server)"),
        ("vcpu.0.cpuset", "-p (vCPU pinning)"),
    ] {
        if cfg.get(var).is_some() {
            warnx(prog, &format!("{what} is not supported here; ignored"));
        }
    }
    let p = match plan(&cfg) {
        Ok(p) => p,
        Err(Error::Usage(_)) => {
            eprint!("{}", usage_text(prog));
            return 1;
        }
        Err(e) => {
            warnx(prog, &e.to_string());
            return e.bhyve_status();
        }
    };
    // As FreeBSD's setproctitle: `ps` shows "bhyve: NAME" (prog and the
    // arguments were read above).
    crate::proctitle::set(&format!("bhyve: {}", p.name));
    let code = match run(prog, &p) {
        Ok(code) => code,
        Err(e) => {
            warnx(prog, &e.to_string());
            e.bhyve_status()
        }
    };
    term::restore();
    code
}

/// A VM we are running: whether we created it (and so must remove it on a
/// set-up failure), and whether it is configured already.
struct Vm {
    handle: VmHandle,
    created: bool,
    configured: bool,
}

fn create_or_open(prog: &str, dev: &VmmDev, ctl: &Ctl, p: &Plan) -> Result<Vm> {
    let mut created = false;
    if p.self_booting() {
        match ctl.create(&p.name, p.monitor) {
            Ok(()) => created = true,
            Err(Errno::EEXIST) => {}
            Err(Errno::EPERM) if !p.monitor => return Err(Error::Unprivileged),
            Err(Errno::EPERM) => return Err(Error::sys("vm_create", Errno::EPERM)),
            Err(e) => return Err(Error::create(e)),
        }
    }
    let handle = match dev.open_vm(&p.name) {
        Ok(h) => h,
        Err(e) => {
            if created {
                let _ = ctl.destroy(&p.name);
            } else if e == Errno::ENOENT && !p.self_booting() {
                // bhyve's do_open: no VM prepared by bhyveload and nothing to boot.
                return Err(Error::NoBootrom);
            }
            return Err(Error::Other(format!(
                "vm_open: {} could not be opened: {}",
                p.name,
                crate::error::strerror(e)
            )));
        }
    };
    let vm = Vm {
        handle,
        created,
        configured: false,
    };
    if !created {
        // An existing VM (EEXIST, or prepared by bhyveload): reuse it.
        let st = vm
            .handle
            .status()
            .map_err(|e| Error::sys(format!("vm_open: {}", p.name), e))?;
        match st.state() {
            "running" => {
                return Err(Error::Other(format!(
                    "vm_open: {} is already running",
                    p.name
                )))
            }
            "exited" => vm.handle.command(&Command::Reinit)?,
            "destroyed" => return Err(Error::sys(format!("vm_open: {}", p.name), Errno::ENXIO)),
            _ => {}
        }
        log::debug!("reusing existing VM {} ({st:?})", p.name);
        let _ = prog;
    }
    Ok(vm)
}

fn configure(prog: &str, vm: &mut Vm, p: &Plan, res: &Resources) -> Result<()> {
    let mut with_memory = true;
    if !vm.created {
        if let Ok(st) = vm.handle.status() {
            if st.memory() == Some(p.memsize) {
                with_memory = false;
            }
        }
    }
    for c in commands(p, res, with_memory) {
        match vm.handle.command(&c.cmd) {
            Ok(()) => {}
            // An engine without the option says EOPNOTSUPP and the VM runs
            // without it; a value it refuses (EINVAL: `-U` that is no UUID)
            // ends bhyve, as bhyve's own checks do.
            Err(e) if c.optional && e.errno() == Some(Errno::EOPNOTSUPP) => {
                log::info!("ignored: {e}")
            }
            Err(e) if !vm.created && matches!(e.errno(), Some(Errno::EBUSY | Errno::EEXIST)) => {
                warnx(prog, &format!("warning: existing VM: {e}"));
            }
            Err(e) => return Err(e),
        }
    }
    vm.configured = true;
    Ok(())
}

/// Run the guest until it stops; `parent` is the monitor's pipe (hang-up =
/// parent died), `sig` the signal descriptor of a single-process bhyve.
fn run_guest(
    prog: &str,
    vm: &mut Vm,
    p: &Plan,
    res: &Resources,
    parent: Option<BorrowedFd<'_>>,
    sig: Option<&SignalFd>,
) -> Result<i32> {
    if !vm.configured {
        configure(prog, vm, p, res)?;
    }
    crate::resources::start_console_relays(res);
    vm.handle.command(&Command::Run)?;
    let mut extra: Vec<BorrowedFd<'_>> = Vec::new();
    if let Some(pp) = parent {
        extra.push(pp);
    }
    if let Some(s) = sig {
        extra.push(s.as_fd());
    }
    let sig_index = sig.map(|_| extra.len() - 1);
    loop {
        let wake = vm
            .handle
            .wait(&extra, 1000)
            .map_err(|e| Error::sys("poll", e))?;
        match wake {
            Wake::Extra(i) if Some(i) == sig_index => {
                if let Some(s) = sig {
                    if let Ok(Some(info)) = s.read_signal() {
                        if info.ssi_signo == Signal::SIGTERM as u32 {
                            let _ = vm.handle.command(&Command::PowerOff);
                        } else {
                            let _ = vm.handle.command(&Command::ForcePowerOff);
                            return Ok(4);
                        }
                    }
                }
            }
            Wake::Extra(_) => {
                // The monitor's pipe: the parent is gone.
                let _ = vm.handle.command(&Command::ForcePowerOff);
                return Ok(4);
            }
            Wake::Vm | Wake::Timeout => {}
        }
        match vm.handle.status() {
            Ok(st) => match st.state() {
                "exited" => {
                    if let Some(c) = st.vars.get("cause") {
                        // An error exit (status 4): say why, as bhyve does
                        // for a VM that stops on an error.
                        warnx(prog, &format!("vm {}: {c}", p.name));
                    }
                    return Ok(st.exit_status().unwrap_or(4));
                }
                "destroyed" => {
                    warnx(prog, &format!("VM {} was destroyed", p.name));
                    return Ok(4);
                }
                _ => {}
            },
            Err(Errno::ENXIO) => {
                warnx(prog, &format!("VM {} was destroyed", p.name));
                return Ok(4);
            }
            Err(e) => return Err(Error::sys("read status", e)),
        }
    }
}

fn open_ctl(dev: &VmmDev) -> Result<Ctl> {
    dev.open_ctl()
        .map_err(|e| Error::open_ctl(&dev.ctl_path(), dev.dir(), e))
}

fn block_signals() -> Result<SignalFd> {
    let set = handled_signals();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| Error::sys("sigprocmask", e))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| Error::sys("signalfd", e))
}

fn run(prog: &str, p: &Plan) -> Result<i32> {
    let dev = VmmDev::from_env();
    // Everything the guest uses is opened first, as the invoking user.
    let res = open_resources(p)?;
    let sig = block_signals()?;
    let ctl = open_ctl(&dev)?;
    let mut vm = create_or_open(prog, &dev, &ctl, p)?;
    if [&p.com1, &p.com2, &p.com3, &p.com4]
        .iter()
        .any(|c| **c == Some(Console::Stdio))
    {
        term::enter_stdio().map_err(|e| Error::sys("tcsetattr", e))?;
    }
    let result = if p.monitor {
        monitor(prog, &ctl, &mut vm, p, &res, &sig)
    } else {
        run_guest(prog, &mut vm, p, &res, None, Some(&sig))
    };
    term::restore();
    match result {
        Ok(status) => {
            if status == 1 && p.destroy_on_poweroff {
                let _ = ctl.destroy(&p.name);
            }
            Ok(status)
        }
        Err(e) => {
            if vm.created {
                let _ = ctl.destroy(&p.name);
            } else if vm
                .handle
                .status()
                .map(|s| s.state() == "running")
                .unwrap_or(false)
            {
                let _ = vm.handle.command(&Command::ForcePowerOff);
            }
            Err(e)
        }
    }
}

fn pidfd_open(pid: Pid) -> Result<OwnedFd> {
    // SAFETY: plain syscall; on success it returns a new descriptor we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if r < 0 {
        return Err(Error::sys("pidfd_open", Errno::last()));
    }
    // A descriptor is an int; anything else is not one we could own.
    let fd = RawFd::try_from(r).map_err(|_| Error::sys("pidfd_open", Errno::EBADF))?;
    // SAFETY: fd is a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Monitor mode: fork a child per boot; reinit and fork again on reboot.
fn monitor(
    prog: &str,
    ctl: &Ctl,
    vm: &mut Vm,
    p: &Plan,
    res: &Resources,
    sig: &SignalFd,
) -> Result<i32> {
    let (pipe_r, pipe_w) = pipe().map_err(|e| Error::sys("pipe", e))?;
    loop {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: bhyve is single-threaded here; the child only performs
        // async-signal-safe-enough work (no locks held across fork) and exits.
        match unsafe { fork() }.map_err(|e| Error::sys("fork", e))? {
            ForkResult::Child => {
                term::forget();
                // SAFETY: closing the child's copy of the pipe's write end.
                unsafe { libc::close(std::os::fd::AsRawFd::as_raw_fd(&pipe_w)) };
                // The parent alone holds the vmmctl descriptor.
                // SAFETY: closing our copy of the inherited vmmctl descriptor;
                // the Ctl value is never used again in this process.
                unsafe { libc::close(std::os::fd::AsRawFd::as_raw_fd(&ctl.as_fd())) };
                let mut unblock = handled_signals();
                unblock.remove(Signal::SIGTERM);
                let _ =
                    nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&unblock), None);
                let code = match run_guest(prog, vm, p, res, Some(pipe_r.as_fd()), None) {
                    Ok(s) => s,
                    Err(e) => {
                        warnx(prog, &e.to_string());
                        e.bhyve_status()
                    }
                };
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().flush();
                // SAFETY: leave the forked child without running the parent's
                // exit-time cleanups (terminal restore, helper kills).
                unsafe { libc::_exit(code) };
            }
            ForkResult::Parent { child } => {
                // The child configured the VM (or failed trying).
                vm.configured = true;
                let status = wait_child(child, vm, sig)?;
                match status {
                    ChildEnd::Exited(0) => {
                        vm.handle.command(&Command::Reinit)?;
                        continue;
                    }
                    ChildEnd::Exited(s) => return Ok(s),
                    ChildEnd::Signaled => {
                        if vm
                            .handle
                            .status()
                            .map(|s| s.state() == "running")
                            .unwrap_or(false)
                        {
                            let _ = vm.handle.command(&Command::ForcePowerOff);
                        }
                        return Ok(4);
                    }
                    ChildEnd::Interrupted => {
                        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                        let _ = waitpid(child, None);
                        let _ = vm.handle.command(&Command::ForcePowerOff);
                        return Ok(4);
                    }
                }
            }
        }
    }
}

enum ChildEnd {
    Exited(i32),
    Signaled,
    Interrupted,
}

fn wait_child(child: Pid, vm: &Vm, sig: &SignalFd) -> Result<ChildEnd> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let pidfd = pidfd_open(child)?;
    loop {
        let mut fds = [
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(sig.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::sys("poll", e)),
        }
        let sig_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        let child_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if sig_ready {
            while let Ok(Some(info)) = sig.read_signal() {
                if info.ssi_signo == Signal::SIGTERM as u32 {
                    let _ = vm.handle.command(&Command::PowerOff);
                } else {
                    return Ok(ChildEnd::Interrupted);
                }
            }
        }
        if child_ready {
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(ChildEnd::Exited(code)),
                    Ok(WaitStatus::Signaled(..)) => return Ok(ChildEnd::Signaled),
                    Ok(_) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(Error::sys("waitpid", e)),
                }
            }
        }
    }
}
