//! vmmfs: FreeBSD's vmm device files and access control, on Linux, in FUSE.

mod control;
mod creds;
mod devlinks;
mod error;
mod fdpass;
mod fs;
mod nodes;
mod registry;
mod service;
mod state;

use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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
    /// Make /dev/vmmctl, /dev/vmm and /dev/vmm.io links into the mount.
    #[arg(long)]
    dev_links: bool,
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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

/// Check the mount point; a stale mount of a dead daemon is cleared.
fn check_mountpoint(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("mount point {} is not a directory", path.display())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            log::warn!(
                "{}: stale FUSE mount of a dead daemon; detaching it",
                path.display()
            );
            nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| format!("cannot detach stale mount {}: {e}", path.display()))
        }
        Err(e) => Err(format!("mount point {}: {e}", path.display())),
    }
}

fn daemon(args: DaemonArgs) -> Result<(), String> {
    let mountpoint = args
        .mountpoint
        .ok_or("a mount point is required (see --help)")?;
    let gid = group_id(&args.group)?;
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing: load the fuse module (modprobe fuse)".into());
    }
    check_mountpoint(&mountpoint)?;
    let mountpoint =
        std::fs::canonicalize(&mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let config = service::Config {
        group: gid,
        max_vms_per_user: args.max_vms_per_user.unwrap_or(4 * cpus),
    };
    let host = creds::host_namespace().map_err(|e| format!("reading own PID namespace: {e}"))?;
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("{}: {e}", args.state_dir.display()))?;
    let store = state::StateStore::new(&args.state_dir);
    let service =
        Arc::new(service::Service::new(config.clone(), store, host).map_err(|e| e.to_string())?);

    // Signals go to one thread, which unmounts; block them everywhere else first.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;

    let fs = fs::VmmFs::new(service.clone());
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
    options.n_threads = Some(4);
    options.clone_fd = true;
    let mut session = fuser::Session::new(fs, &mountpoint, &options)
        .map_err(|e| format!("mounting on {}: {e}", mountpoint.display()))?;
    let control = control::serve(service.clone(), &args.state_dir)
        .map_err(|e| format!("control socket: {e}"))?;
    let links = if args.dev_links {
        Some(
            devlinks::DevLinks::create(Path::new("/dev"), &mountpoint).map_err(|e| {
                let _ = session.unmount();
                e.to_string()
            })?,
        )
    } else {
        None
    };
    let mut unmounter = session.unmount_callable();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                log::info!("{sig:?}: unmounting");
            }
            if let Err(e) = unmounter.unmount() {
                log::error!("unmount: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    log::info!(
        "vmmfs mounted on {} (group {} = {gid}, {} VMs per user, state in {})",
        mountpoint.display(),
        args.group,
        config.max_vms_per_user,
        args.state_dir.display()
    );
    let run = session.run();
    drop(links);
    let _ = std::fs::remove_file(control);
    service.shutdown();
    log::info!("vmmfs stopped");
    run.map_err(|e| format!("FUSE session: {e}"))
}
