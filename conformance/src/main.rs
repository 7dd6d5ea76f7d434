//! vmmfs conformance suite: a real mount, real users and groups, real PID
//! namespaces; one case per SPEC.md row; prints a conformance table.
//!
//! `conformance [--vmmfs PATH] [--bhyve-dir DIR] [--guests DIR] [--allow-skip]
//! [--only GROUP]... [--keep-log]`
//! runs the suite (as root); `conformance probe ...` is the probe run in
//! child processes (see probe.rs).

mod attack;
mod attack_probes;
mod bhyve;
mod cases;
mod errno;
mod harness;
mod ioctl;
mod isolation;
mod lines;
mod probe;
mod suite;
mod table;
mod tools;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

const USAGE: &str = "\
usage: conformance [--vmmfs PATH] [--bhyve-dir DIR] [--guests DIR] [--allow-skip]
                   [--only GROUP]... [--keep-log] [--list]
       conformance probe ...   (internal: one operation as another user)
Runs the vmmfs end-to-end conformance suite. Must run as root; needs /dev/fuse,
/dev/kvm, the group 'vmm' and users vmmtest1, vmmtest2 (members) and vmmtest3
(not a member): `sudo scripts/setup` creates them.
  --vmmfs PATH   daemon binary (default: vmmfs next to this executable)
  --bhyve-dir DIR  where bhyve, bhyvectl, bhyveload are (default: next to this
                 executable); the suite runs copies in its temporary directory
  --guests DIR   built test guests (make -C vmm-engine/guests OUT=DIR), readable
                 by the test users (default: built into the temporary directory)
  --allow-skip   exit 0 when /dev/fuse or /dev/kvm is missing (never with CI=true)
  --only GROUP   run only groups whose name contains GROUP (repeatable)
  --keep-log     keep the daemon log even if every case passes
  --list         list the groups";

struct Options {
    vmmfs: Option<PathBuf>,
    bhyve_dir: Option<PathBuf>,
    guests: Option<PathBuf>,
    allow_skip: bool,
    only: Vec<String>,
    keep_log: bool,
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut o =
        Options { vmmfs: None, bhyve_dir: None, guests: None, allow_skip: false, only: Vec::new(), keep_log: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--vmmfs" => o.vmmfs = Some(it.next().ok_or("--vmmfs needs a path")?.into()),
            "--bhyve-dir" => o.bhyve_dir = Some(it.next().ok_or("--bhyve-dir needs a directory")?.into()),
            "--guests" => o.guests = Some(it.next().ok_or("--guests needs a directory")?.into()),
            "--allow-skip" => o.allow_skip = true,
            "--only" => o.only.push(it.next().ok_or("--only needs a group")?.clone()),
            "--keep-log" => o.keep_log = true,
            "--list" => {
                for (name, _) in cases::GROUPS {
                    println!("{name}");
                }
                return Ok(None);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(Some(o))
}

extern "C" fn on_signal(_: libc::c_int) {
    cases::INTERRUPTED.store(true, Ordering::SeqCst);
}

fn fatal(msg: &str) -> i32 {
    eprintln!("conformance: ERROR: {msg}");
    2
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false)
}

fn run(o: Options) -> i32 {
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 {
        return fatal("must run as root (it mounts, switches users and creates PID namespaces)");
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let missing: Vec<&str> = ["/dev/fuse", "/dev/kvm"].into_iter().filter(|d| !Path::new(d).exists()).collect();
    if !missing.is_empty() {
        let bar = "*".repeat(72);
        eprintln!("{bar}\n* conformance: {} missing: cannot run the suite", missing.join(" and "));
        if ci {
            eprintln!("* CI=true: this is a failure\n{bar}");
            return 1;
        }
        eprintln!("* SKIPPED: no conformance case ran\n{bar}");
        println!("SKIPPED ({} missing)", missing.join(", "));
        return if o.allow_skip { 0 } else { 1 };
    }
    for tool in ["unshare", "nsenter", "fusermount3"] {
        if !on_path(tool) {
            return fatal(&format!("'{tool}' not found in PATH (util-linux, fuse3: run scripts/setup)"));
        }
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fatal(&format!("current_exe: {e}")),
    };
    let vmmfs = o.vmmfs.clone().unwrap_or_else(|| exe.parent().unwrap_or(Path::new(".")).join("vmmfs"));
    if !vmmfs.is_file() {
        return fatal(&format!("vmmfs binary {} not found (build it, or pass --vmmfs PATH)", vmmfs.display()));
    }
    let users = match harness::Users::check() {
        Ok(u) => u,
        Err(e) => return fatal(&e),
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut env = match harness::Env::new(exe, vmmfs, users) {
        Ok(e) => e,
        Err(e) => return fatal(&e),
    };
    // The tools run with the temporary directory as working directory.
    let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    if let Some(d) = &o.bhyve_dir {
        env.bhyve_dir = absolute(d);
    }
    // The probes exec the tools as vmmtest*: copies in the temporary
    // directory, which they can traverse wherever the build is (a 0700 home).
    match stage_tools(&env) {
        Ok(dir) => env.bhyve_dir = dir,
        Err(e) => return fatal(&e),
    }
    env.guests = o.guests.as_ref().map(absolute);
    eprintln!("conformance: mount {} state {} log {}", env.mount.display(), env.state_dir.display(), env.log.display());
    if let Err(e) = env.start() {
        env.keep_log();
        return fatal(&format!("cannot start vmmfs: {e}"));
    }
    let rows = {
        let mut suite = suite::Suite::new(&mut env, o.only);
        cases::run_all(&mut suite);
        suite.rows
    };
    let failed = rows.iter().any(|r| !r.passed());
    if failed || o.keep_log {
        env.keep_log();
    }
    drop(env);
    print!("{}", table::render(&rows));
    if failed || rows.is_empty() {
        1
    } else {
        0
    }
}

/// Copy bhyve, bhyvectl and bhyveload from `env.bhyve_dir` (those that
/// exist) into `BASE/bin` (root's, mode 0755) and check, by running one as
/// vmmtest1 with no privilege left, that the test users can execute them.
fn stage_tools(env: &harness::Env) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = env.base.join("bin");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let mut staged = Vec::new();
    for tool in ["bhyve", "bhyvectl", "bhyveload"] {
        let from = env.bhyve_dir.join(tool);
        if !from.is_file() {
            continue;
        }
        let to = dir.join(tool);
        std::fs::copy(&from, &to).map_err(|e| format!("copying {}: {e}", from.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        staged.push(to);
    }
    let Some(tool) = staged.first() else {
        // The bhyve groups report the missing tools themselves.
        return Ok(dir);
    };
    let out = std::process::Command::new(&env.exe)
        .args(["probe", "--user", harness::MEMBER1, "exec"])
        .arg(tool)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", env.exe.display()))?;
    if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("(vmmfs)") {
        return Err(format!(
            "{} cannot execute {} ({}; {}): is {} mounted noexec?",
            harness::MEMBER1,
            tool.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            env.base.display()
        ));
    }
    Ok(dir)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("probe") {
        std::process::exit(probe::main(&args[1..], attack_probes::probe));
    }
    if args.first().map(String::as_str) == Some("setid-helper") {
        std::process::exit(attack_probes::setid_helper(&args[1..]));
    }
    let code = match parse(&args) {
        Ok(Some(o)) => run(o),
        Ok(None) => 0,
        Err(e) => {
            eprintln!("conformance: {e}\n{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
