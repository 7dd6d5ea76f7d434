//! vmmfs: FreeBSD's vmm device files and access control, on Linux, in FUSE.

mod cgroup;
mod control;
mod creds;
mod devlinks;
mod engine;
mod error;
mod fds;
mod fs;
mod handover;
mod jails;
mod nodes;
mod policy;
mod received;
mod registry;
mod sched;
mod sd;
mod service;
#[cfg(test)]
mod service_tests;
mod state;
mod vmstate;
mod worker;

use clap::{Args, Parser, Subcommand};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "vmmfs",
    version,
    about = "FreeBSD's vmm device files and access control for KVM, in FUSE"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Args)]
struct DaemonArgs {
    /// Group that owns vmmctl on first start and every VM node.
    #[arg(long, default_value = "vmm")]
    group: String,
    /// Where ownership, modes and jail grants are kept.
    #[arg(long, default_value = "/var/lib/vmmfs")]
    state_dir: PathBuf,
    /// VMs per real user id (hw.vmm.maxvmms); default 4 x CPUs.
    #[arg(long)]
    max_vms_per_user: Option<usize>,
    /// vCPUs per VM (hw.vmm.maxcpu); default: the host's CPUs.
    #[arg(long)]
    max_cpus: Option<u16>,
    /// Guest memory (plus boot images) per real user id, e.g. 8G; default: the host's RAM.
    #[arg(long, value_parser = parse_size)]
    max_memory_per_user: Option<u64>,
    /// Make /dev/vmmctl, /dev/vmm and /dev/vmm.io links into the mount.
    #[arg(long)]
    dev_links: bool,
    /// uids (and gids) for VM worker processes, one per VM: FIRST-LAST or
    /// FIRST:COUNT; no account may have one.
    #[arg(long, default_value = "2147483648-2147549183", value_parser = worker::UidRange::parse)]
    worker_uids: worker::UidRange,
    /// The vmm-worker executable (default: beside vmmfs).
    #[arg(long)]
    worker_exe: Option<PathBuf>,
    /// Jailed workers kept ready, so that a create starts no process.
    #[arg(long, default_value_t = 2)]
    worker_spares: usize,
    /// Run VMs inside the daemon, without worker processes: no isolation
    /// between guests and the daemon. For comparison benchmarks only.
    #[arg(long)]
    in_process: bool,
    /// Let `set x-test-forbidden-syscall=1` make a worker call what its
    /// seccomp filter forbids (the conformance suite's check).
    #[arg(long, hide = true)]
    test_hooks: bool,
    /// Mount point.
    mountpoint: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Sub {
    /// Manage jails' allow.vmm and allow.vmm_ppt (a jail is a PID namespace).
    Jail {
        #[command(subcommand)]
        action: JailAction,
    },
}

#[derive(Subcommand)]
enum JailAction {
    /// Grant allow.vmm (with --ppt also allow.vmm_ppt) to the PID namespace of PID.
    Allow(JailArgs),
    /// Revoke allow.vmm and allow.vmm_ppt (with --ppt only allow.vmm_ppt).
    Revoke(JailArgs),
    /// List jails with grants.
    List {
        #[arg(long, default_value = "/var/lib/vmmfs")]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct JailArgs {
    /// A process in the jail, as seen from the host.
    #[arg(long)]
    pid: u32,
    /// allow.vmm_ppt (PCI passthrough) instead of allow.vmm.
    #[arg(long)]
    ppt: bool,
    #[arg(long, default_value = "/var/lib/vmmfs")]
    state_dir: PathBuf,
}

fn parse_size(s: &str) -> Result<u64, String> {
    vmm_protocol::command::parse_size(s).map_err(|e| e.0)
}

fn main() -> ExitCode {
    sd::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Sub::Jail { action }) => jail_command(action),
        None => daemon(cli.daemon),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vmmfs: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn jail_command(action: JailAction) -> Result<(), String> {
    let (dir, line) = match action {
        JailAction::Allow(a) => (
            a.state_dir,
            format!("allow {} {}", a.pid, if a.ppt { "ppt" } else { "vmm" }),
        ),
        JailAction::Revoke(a) => (
            a.state_dir,
            format!("revoke {} {}", a.pid, if a.ppt { "ppt" } else { "vmm" }),
        ),
        JailAction::List { state_dir } => (state_dir, "list".to_string()),
    };
    print!("{}", control::request(&dir, &line)?);
    Ok(())
}

fn group_id(name: &str) -> Result<u32, String> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!(
            "group '{name}' does not exist (create it with: groupadd {name})"
        )),
        Err(e) => Err(format!("looking up group '{name}': {e}")),
    }
}

/// Check the mount point: a live vmmfs there is refused (a second daemon
/// would hide the first one's VMs); a stale mount of a dead daemon is cleared.
fn check_mountpoint(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("mount point {} is not a directory", path.display())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            log::warn!(
                "{}: stale FUSE mount of a dead daemon; detaching it",
                path.display()
            );
            return nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| format!("cannot detach stale mount {}: {e}", path.display()));
        }
        Err(e) => return Err(format!("mount point {}: {e}", path.display())),
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // "... MOUNTPOINT OPTIONS - FSTYPE SOURCE ...": vmmfs mounts as type
    // fuse (or fuse.vmmfs through fusermount) with source "vmmfs".
    let ours = info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        let fstype = sep.and_then(|i| f.get(i + 1)).copied().unwrap_or("");
        let source = sep.and_then(|i| f.get(i + 2)).copied().unwrap_or("");
        f.get(4).copied() == canonical.to_str()
            && fstype.starts_with("fuse")
            && (source == "vmmfs" || fstype == "fuse.vmmfs")
    });
    // A dead daemon's mount may still answer stat from cached attributes;
    // listing it asks the daemon, and a dead connection says ENOTCONN.
    if ours
        && std::fs::read_dir(&canonical)
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(libc::ENOTCONN)
    {
        log::warn!(
            "{}: stale vmmfs mount of a dead daemon; detaching it",
            canonical.display()
        );
        return nix::mount::umount2(&canonical, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| format!("cannot detach stale mount {}: {e}", canonical.display()));
    }
    if ours {
        return Err(format!(
            "{} is already a vmmfs mount of a running daemon (stop it first)",
            canonical.display()
        ));
    }
    Ok(())
}

/// One daemon per state directory: an exclusive lock held for the daemon's life.
fn lock_state_dir(dir: &Path) -> Result<OwnedFd, String> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let fd = OwnedFd::from(file);
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "another vmmfs daemon (pid {}) uses the state directory {}",
            holder.trim(),
            dir.display()
        ));
    }
    let _ = nix::unistd::ftruncate(&fd, 0);
    let _ = nix::unistd::write(&fd, format!("{}\n", std::process::id()).as_bytes());
    Ok(fd)
}

fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb << 10)
}

/// Bind `vmm.sock` inside the mount (the kernel asks our mknod for the node)
/// and listen.
fn bind_socket(mountpoint: &Path) -> Result<OwnedFd, String> {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let path = mountpoint.join(vmm_protocol::handover::SOCKET_NAME);
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let addr = UnixAddr::new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    bind(sock.as_raw_fd(), &addr).map_err(|e| format!("binding {}: {e}", path.display()))?;
    listen(&sock, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| format!("listen: {e}"))?;
    Ok(sock)
}

fn daemon(args: DaemonArgs) -> Result<(), String> {
    let mountpoint = args
        .mountpoint
        .clone()
        .ok_or("a mount point is required (see --help)")?;
    let gid = group_id(&args.group)?;
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing: load the fuse module (modprobe fuse)".into());
    }
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("{}: {e}", args.state_dir.display()))?;
    let _lock = lock_state_dir(&args.state_dir)?;
    check_mountpoint(&mountpoint)?;
    let mountpoint =
        std::fs::canonicalize(&mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let nofile = fds::raise_nofile();
    let max_cpus = args
        .max_cpus
        .unwrap_or(u16::try_from(cpus).unwrap_or(u16::MAX))
        .max(1);
    let limits = policy::Limits {
        max_vms_per_user: args.max_vms_per_user.unwrap_or(4 * cpus),
        max_fds: nofile,
        max_memory_per_user: args.max_memory_per_user.unwrap_or_else(host_memory),
        max_cpus,
    };
    let config = service::Config {
        group: gid,
        limits: limits.clone(),
        workers: cpus.clamp(2, 4),
    };
    // Signals go to the main thread; block them before any thread exists
    // (threads inherit the mask): a SIGTERM while starting then waits for the
    // clean shutdown instead of killing the process in another thread. The
    // worker engine starts threads and its zygote, so this comes first.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    let jails =
        Arc::new(jails::Jails::new().map_err(|e| format!("reading own PID namespace: {e}"))?);
    let store = state::StateStore::new(&args.state_dir);
    let daemon = Daemon {
        signals,
        mountpoint,
        state_dir: args.state_dir.clone(),
        dev_links: args.dev_links,
        group: args.group.clone(),
        gid,
        limits,
        nofile,
    };
    if args.in_process {
        log::warn!("--in-process: every VM runs inside the daemon, with no isolation");
        let service =
            service::Service::new(engine::Kvm, config, store, jails).map_err(|e| e.to_string())?;
        return serve(service, daemon);
    }
    let vms = vmstate::VmStore::open(&args.state_dir)
        .map_err(|e| format!("{}/vms: {e}", args.state_dir.display()))?;
    let reserved = vms
        .load_all()
        .into_iter()
        .filter_map(|(_, r)| r.ok().map(|r| r.worker.uid))
        .collect();
    let workers = start_workers(&args, max_cpus, vms.dir(), reserved)?;
    let service =
        service::Service::new(workers, config, store, jails).map_err(|e| e.to_string())?;
    // Before the mount: a VM left by an earlier daemon is back (or, if it
    // was destroy-on-close, gone) when its node can first be seen.
    let adopted = service.adopt_all(vms);
    if adopted > 0 {
        log::info!("adopted {adopted} VM(s) left running by an earlier daemon");
    }
    serve(service, daemon)
}

/// What the mounted daemon needs besides its service.
struct Daemon {
    /// SIGTERM and SIGINT, blocked in every thread.
    signals: nix::sys::signal::SigSet,
    mountpoint: PathBuf,
    state_dir: PathBuf,
    dev_links: bool,
    group: String,
    gid: u32,
    limits: policy::Limits,
    nofile: u64,
}

/// The worker engine, after checking its uid range and executable.
fn start_workers(
    args: &DaemonArgs,
    max_cpus: u16,
    sockets: &Path,
    reserved: Vec<u32>,
) -> Result<worker::Workers, String> {
    let taken = args.worker_uids.collisions();
    if let Some((name, uid)) = taken.first() {
        return Err(format!(
            "--worker-uids includes uid {uid} of account '{name}' ({} account(s) in all): \
             choose a range no account uses",
            taken.len()
        ));
    }
    let exe = match &args.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("locating vmmfs: {e}"))?
            .with_file_name("vmm-worker"),
    };
    if !exe.is_file() {
        return Err(format!(
            "{} is missing (install vmm-worker beside vmmfs or give --worker-exe)",
            exe.display()
        ));
    }
    let pids = u64::from(max_cpus) + worker::WORKER_EXTRA_THREADS + 8;
    let cgroups = match cgroup::Cgroups::detect(pids) {
        Ok(c) => Some(c),
        Err(why) => {
            log::warn!("no cgroup per VM: {why}; workers stay in the daemon's cgroup");
            None
        }
    };
    let r = args.worker_uids;
    log::info!(
        "VMs run in jailed worker processes ({}), uids {}-{}",
        exe.display(),
        r.first,
        u64::from(r.first) + u64::from(r.count) - 1
    );
    worker::Workers::new(
        worker::WorkerConfig {
            exe,
            uids: r,
            max_cpus,
            test_hooks: args.test_hooks,
            prefork: args.worker_spares,
            sockets: Some(sockets.to_path_buf()),
            reserved,
        },
        cgroups,
    )
    .map_err(|e| format!("/dev/kvm: {e}"))
}

fn serve<E: engine::Engine>(service: Arc<service::Service<E>>, d: Daemon) -> Result<(), String> {
    let Daemon {
        signals,
        mountpoint,
        state_dir,
        dev_links,
        group,
        gid,
        limits,
        nofile,
    } = d;

    let socket_bound = Arc::new(AtomicBool::new(false));
    let fs = fs::VmmFs::new(service.clone(), socket_bound);
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName("vmmfs".into()),
        fuser::MountOption::Subtype("vmmfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
        fuser::MountOption::NoAtime,
    ];
    options.acl = fuser::SessionACL::All;
    // FUSE threads only validate and enqueue; work runs elsewhere.
    options.n_threads = Some(4);
    options.clone_fd = true;
    let session = fuser::Session::new(fs, &mountpoint, &options)
        .map_err(|e| format!("mounting on {}: {e}", mountpoint.display()))?;
    let session = session.spawn().map_err(|e| format!("FUSE session: {e}"))?;
    let detach = || {
        let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
    };
    let listener = bind_socket(&mountpoint).inspect_err(|_| detach())?;
    service
        .handover()
        .set_own_dev(received::mount_dev(&mountpoint));
    {
        let (h, svc) = (service.handover().clone(), service.clone());
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || h.serve(listener, svc))
            .map_err(|e| e.to_string())?;
    }
    let control = control::serve(service.clone(), &state_dir)
        .map_err(|e| format!("control socket: {e}"))
        .inspect_err(|_| detach())?;
    let links = if dev_links {
        Some(
            devlinks::DevLinks::create(Path::new("/dev"), &mountpoint).map_err(|e| {
                detach();
                e.to_string()
            })?,
        )
    } else {
        None
    };
    log::info!(
        "vmmfs mounted on {} (group {} = {gid}, {} VMs per user, {} vCPUs per VM, {} MiB \
         per user, {nofile} descriptors of which {} are root's reserve, state in {})",
        mountpoint.display(),
        group,
        limits.max_vms_per_user,
        limits.max_cpus,
        limits.max_memory_per_user >> 20,
        policy::ROOT_RESERVE_FDS,
        state_dir.display()
    );
    sd::ready(&format!("serving {}", mountpoint.display()));
    let sig = signals
        .wait()
        .map_err(|e| format!("waiting for signals: {e}"))?;
    log::info!("{sig:?}: destroying every VM and unmounting");
    sd::stopping();
    // Everything goes within 5 s: VMs get 3 s to be torn down; a second
    // signal cuts that short.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            log::info!("second signal: exiting now");
            let _ = tx.send(());
        }
    });
    let svc = service.clone();
    std::thread::spawn(move || {
        if !svc.shutdown(Duration::from_secs(3)) {
            log::warn!(
                "some VMs are still being torn down (a client's hung file?); exiting anyway"
            );
        }
        let _ = tx2.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(4));
    let _session = session;
    detach();
    drop(links);
    let _ = std::fs::remove_file(control);
    log::info!("vmmfs stopped");
    // Exit without unwinding: threads may be inside clients' hung files, and
    // the FUSE connection must close with the process.
    std::process::exit(0)
}
