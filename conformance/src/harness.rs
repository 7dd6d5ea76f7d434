//! The runner's machinery: the daemon under test, users, probes run as
//! other users or in PID namespaces, holders of transient VMs, jails.

use crate::lines;
use nix::unistd::{Group, User};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Group whose members may create VMs.
pub const GROUP: &str = "vmm";
/// Members of [`GROUP`].
pub const MEMBER1: &str = "vmmtest1";
pub const MEMBER2: &str = "vmmtest2";
/// Not a member.
pub const OUTSIDER: &str = "vmmtest3";
/// `--max-vms-per-user` of the daemon under test.
pub const MAX_VMS: usize = 3;

const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// A test user.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
}

/// The users and the group the suite needs.
#[derive(Debug, Clone)]
pub struct Users {
    pub vmm_gid: u32,
    pub m1: TestUser,
    pub m2: TestUser,
    pub out: TestUser,
}

fn in_group(u: &User, gid: u32) -> Result<bool, String> {
    let name = std::ffi::CString::new(u.name.as_str()).map_err(|e| e.to_string())?;
    let groups = nix::unistd::getgrouplist(&name, u.gid).map_err(|e| format!("getgrouplist {}: {e}", u.name))?;
    Ok(groups.iter().any(|g| g.as_raw() == gid))
}

impl Users {
    /// Check that the group and users exist with the right memberships.
    pub fn check() -> Result<Users, String> {
        let hint = "create them with `sudo scripts/setup` (CI: .ci/run does it)";
        let group = Group::from_name(GROUP)
            .map_err(|e| format!("getgrnam {GROUP}: {e}"))?
            .ok_or(format!("group '{GROUP}' does not exist; {hint}"))?;
        let gid = group.gid.as_raw();
        let get = |name: &str, member: bool| -> Result<TestUser, String> {
            let u = User::from_name(name)
                .map_err(|e| format!("getpwnam {name}: {e}"))?
                .ok_or(format!("user '{name}' does not exist; {hint}"))?;
            if u.uid.as_raw() == 0 {
                return Err(format!("user '{name}' must not be uid 0"));
            }
            if in_group(&u, gid)? != member {
                return Err(format!(
                    "user '{name}' must {}be a member of group '{GROUP}'; {hint}",
                    if member { "" } else { "not " }
                ));
            }
            Ok(TestUser { uid: u.uid.as_raw(), gid: u.gid.as_raw() })
        };
        Ok(Users { vmm_gid: gid, m1: get(MEMBER1, true)?, m2: get(MEMBER2, true)?, out: get(OUTSIDER, false)? })
    }
}

/// Where a probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The daemon's PID namespace.
    Host,
    /// A new PID namespace nobody granted anything (`unshare --pid --fork`).
    FreshJail,
    /// The PID namespace of this host pid (`nsenter --target PID --pid`).
    Jail(u32),
}

/// Who runs a probe, and where.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub user: Option<&'a str>,
    pub ruid: Option<u32>,
    pub place: Place,
}

impl<'a> Who<'a> {
    pub fn root() -> Who<'static> {
        Who { user: None, ruid: None, place: Place::Host }
    }
    pub fn user(name: &'a str) -> Who<'a> {
        Who { user: Some(name), ruid: None, place: Place::Host }
    }
    pub fn at(self, place: Place) -> Who<'a> {
        Who { place, ..self }
    }
    pub fn with_ruid(self, ruid: u32) -> Who<'a> {
        Who { ruid: Some(ruid), ..self }
    }
}

/// Wait for `child` at most `limit`; None if it is still running.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Send `sig` to `pid`, a process the suite started (or one of its
/// children); a number that is no pid_t is not signalled.
pub fn kill(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: sending a signal to a process we started.
    unsafe { libc::kill(pid, sig) };
}

/// Run `f` on a helper thread; None if it takes longer than `limit` (a hung
/// FUSE request must not hang the runner: the thread is abandoned).
pub fn timed<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// How long an in-process file-system operation of the runner may take.
const FS_TIMEOUT: Duration = Duration::from_secs(10);

/// SIGTERM `child`, wait up to 10 s, then SIGKILL.
pub fn kill_and_reap(child: &mut Child) {
    kill(child.id(), libc::SIGTERM);
    if wait_timeout(child, Duration::from_secs(10)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

/// File system type and all mount options (per-mount and super block) of the
/// mount at `path`, from /proc/self/mountinfo.
pub fn mount_options(path: &Path) -> Option<(String, Vec<String>)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let line = info.lines().rev().find(|l| l.split(' ').nth(4) == Some(&want))?;
    let (head, tail) = line.split_once(" - ")?;
    let mut opts: Vec<String> = head.split(' ').nth(5)?.split(',').map(String::from).collect();
    let mut t = tail.split(' ');
    let fstype = t.next()?.to_string();
    opts.extend(t.nth(1).unwrap_or("").split(',').map(String::from));
    Some((fstype, opts))
}

/// Last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A process holding a vmmctl descriptor with transient VMs on it.
pub struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Host pid of the probe (== the child for host holders).
    pub pid: u32,
}

impl Holder {
    /// SIGKILL the holder (host holders only: it is our direct child).
    pub fn sigkill(&mut self) {
        kill(self.pid, libc::SIGKILL);
        let _ = wait_timeout(&mut self.child, Duration::from_secs(5));
    }

    /// Let the holder close its descriptor and exit normally.
    pub fn release(&mut self) {
        drop(self.stdin.take());
        if wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.release();
    }
}

/// A running bhyve-compat tool (see [`Env::tool`]). On the host its pid is
/// the tool's own (the probe execs it); in a jail it is unshare's or
/// nsenter's.
pub struct Tool {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    /// Pipes (stdout, stderr) read to their end.
    closed: Arc<[AtomicBool; 2]>,
    status: Option<String>,
}

/// How long, after a tool exits, its output is awaited: a process it forked
/// (passt) may hold the pipes longer, and is not waited for.
const DRAIN: Duration = Duration::from_millis(500);

/// How a tool ended and what it printed.
#[derive(Debug, Clone)]
pub struct ToolEnd {
    /// `status N`, `signal N`, `TIMEOUT(Ns)` or a spawn failure.
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// `status N` or `signal N`.
pub fn exit_text(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{st}"),
    }
}

impl Tool {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Write to the tool's stdin (the guest's console with `com1,stdio`).
    pub fn send(&mut self, text: &str) {
        if let Some(i) = self.stdin.as_mut() {
            let _ = i.write_all(text.as_bytes());
            let _ = i.flush();
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Wait until stdout holds `n` copies of `what`; false after `limit` or
    /// if the tool exited first.
    pub fn wait_output(&mut self, what: &str, n: usize, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            if self.stdout().matches(what).count() >= n {
                return true;
            }
            if Instant::now() >= end || !self.running() {
                self.drain();
                return self.stdout().matches(what).count() >= n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.status = Some(exit_text(st));
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Wait at most `limit`: `status N`, `signal N`, or `TIMEOUT(Ns)` (the
    /// tool is then killed).
    pub fn wait(&mut self, limit: Duration) -> String {
        if let Some(s) = &self.status {
            return s.clone();
        }
        let s = match wait_timeout(&mut self.child, limit) {
            Some(st) => {
                self.drain();
                exit_text(st)
            }
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                format!("TIMEOUT({}s)", limit.as_secs())
            }
        };
        self.status = Some(s.clone());
        s
    }

    /// Wait (at most [`DRAIN`]) until what the tool wrote before it exited
    /// is read: both pipes at their end.
    fn drain(&self) {
        let end = Instant::now() + DRAIN;
        while !self.closed.iter().all(|c| c.load(Ordering::Acquire)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL the process we started (nothing else).
    pub fn sigkill(&mut self) {
        if self.status.is_none() {
            kill(self.child.id(), libc::SIGKILL);
        }
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether process `pid` is gone or a zombie within `limit`.
pub fn exited_within(pid: u32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(st) if st.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')) => return true,
            Ok(_) if Instant::now() >= end => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A long-lived PID namespace: `unshare --pid --fork sleep`; `pid` is the
/// host pid of the namespace's init.
pub struct Jail {
    unshare: Child,
    pub pid: u32,
}

impl Drop for Jail {
    fn drop(&mut self) {
        // Killing a namespace's init kills everything in it.
        kill(self.pid, libc::SIGKILL);
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn ppid_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may contain spaces; split after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The processes whose parent is `parent` (e.g. bhyve's monitor child).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| ppid_of(*pid) == Some(parent))
        .collect()
}

/// The PID namespace number of host process `pid`.
pub fn pidns_of(pid: u32) -> Option<u64> {
    pidns(&pid.to_string())
}

fn pidns(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok().map(|m| m.ino())
}

/// The test environment: temp dirs, the daemon, the users.
pub struct Env {
    pub exe: PathBuf,
    pub vmmfs: PathBuf,
    pub base: PathBuf,
    pub mount: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub users: Users,
    /// Directory of `bhyve`, `bhyvectl`, `bhyveload` (default: next to `exe`).
    pub bhyve_dir: PathBuf,
    /// World-readable directory of the built test guests (vmm-engine/guests);
    /// None: built on demand into `base`.
    pub guests: Option<PathBuf>,
    daemon: Option<Child>,
    keep_log: bool,
}

impl Env {
    /// Make the temp directories (the mount point's parent must be
    /// searchable by the test users).
    pub fn new(exe: PathBuf, vmmfs: PathBuf, users: Users) -> Result<Env, String> {
        let base = nix::unistd::mkdtemp("/tmp/vmmfs-conformance.XXXXXX").map_err(|e| format!("mkdtemp: {e}"))?;
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        let mount = base.join("mnt");
        let state_dir = base.join("state");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&mount, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        std::fs::create_dir(&state_dir).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
        let log = base.join("vmmfs.log");
        let bhyve_dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(Env {
            exe,
            vmmfs,
            base,
            mount,
            state_dir,
            log,
            users,
            bhyve_dir,
            guests: None,
            daemon: None,
            keep_log: false,
        })
    }

    pub fn ctl(&self) -> String {
        self.mount.join("vmmctl").to_string_lossy().into_owned()
    }
    pub fn vm(&self, name: &str) -> String {
        self.mount.join("vmm").join(name).to_string_lossy().into_owned()
    }
    pub fn seg(&self, name: &str) -> String {
        self.mount.join("vmm.io").join(format!("{name}.sysmem")).to_string_lossy().into_owned()
    }
    pub fn vm_dir(&self) -> String {
        self.mount.join("vmm").to_string_lossy().into_owned()
    }
    pub fn io_dir(&self) -> String {
        self.mount.join("vmm.io").to_string_lossy().into_owned()
    }

    /// Keep the daemon log (copied next to the temp dir) when cleaning up.
    pub fn keep_log(&mut self) {
        self.keep_log = true;
    }

    /// Start the daemon and wait for MOUNT/vmmctl.
    pub fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.vmmfs)
            .args(["--group", GROUP, "--state-dir"])
            .arg(&self.state_dir)
            .args(["--max-vms-per-user", &MAX_VMS.to_string()])
            // The worker-isolation group makes a worker call what its
            // seccomp filter forbids.
            .arg("--test-hooks")
            .arg(&self.mount)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.vmmfs.display()))?;
        let ctl = self.mount.join("vmmctl");
        let end = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "vmmfs exited ({st}) before mounting; log {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 20)
                ));
            }
            let probe_ctl = ctl.clone();
            if is_mounted(&self.mount) && timed(FS_TIMEOUT, move || probe_ctl.exists()).unwrap_or(false) {
                break;
            }
            if Instant::now() >= end {
                self.daemon = Some(child);
                self.stop();
                return Err(format!(
                    "{} did not appear within {MOUNT_TIMEOUT:?}; log:\n{}",
                    ctl.display(),
                    tail(&self.log, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(child);
        Ok(())
    }

    /// SIGTERM the daemon, wait, SIGKILL if needed; unmount if it left the mount.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            kill_and_reap(&mut child);
        }
        unmount(&self.mount);
    }

    /// SIGTERM the daemon once and wait at most `limit`: its exit and how
    /// long it took (`TIMEOUT` if it did not exit; it is then killed).
    pub fn terminate(&mut self, limit: Duration) -> (String, Duration) {
        let Some(mut child) = self.daemon.take() else {
            return ("no daemon".into(), Duration::ZERO);
        };
        let t0 = Instant::now();
        kill(child.id(), libc::SIGTERM);
        let r = match wait_timeout(&mut child, limit) {
            Some(st) => exit_text(st),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                format!("TIMEOUT({}s)", limit.as_secs())
            }
        };
        (r, t0.elapsed())
    }

    /// Stop and start again with the same state directory.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.start()
    }

    /// The daemon's process ID.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Whether the daemon is still running.
    pub fn daemon_alive(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn command(&self, who: Who, args: &[&str]) -> Command {
        let mut cmd = match who.place {
            Place::Host => Command::new(&self.exe),
            Place::FreshJail => {
                let mut c = Command::new("unshare");
                c.args(["--pid", "--fork", "--kill-child", "--"]).arg(&self.exe);
                c
            }
            Place::Jail(pid) => {
                let mut c = Command::new("nsenter");
                c.args(["--target", &pid.to_string(), "--pid", "--"]).arg(&self.exe);
                c
            }
        };
        cmd.arg("probe");
        if let Some(u) = who.user {
            cmd.args(["--user", u]);
        }
        if let Some(r) = who.ruid {
            cmd.args(["--ruid", &r.to_string()]);
        }
        cmd.args(args);
        cmd
    }

    /// Run a probe; the observed value: `OK ...`, the errno name of `ERR E...`,
    /// or a description of what went wrong with the probe itself.
    pub fn probe(&self, who: Who, args: &[&str]) -> String {
        self.probe_within(who, args, PROBE_TIMEOUT)
    }

    /// [`Env::probe`] for a long scenario: at most `limit`.
    pub fn probe_within(&self, who: Who, args: &[&str], limit: Duration) -> String {
        let mut child =
            match self.command(who, args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
                Ok(c) => c,
                Err(e) => return format!("PROBE-SPAWN-FAILED {e}"),
            };
        let Some(st) = wait_timeout(&mut child, limit) else {
            let _ = child.kill();
            let _ = child.wait();
            return format!("TIMEOUT({}s)", limit.as_secs());
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        if !st.success() {
            return format!("PROBE-FAILED({st}) {}", err.lines().next().unwrap_or(""));
        }
        observed(out.lines().next().unwrap_or("NO-OUTPUT"))
    }

    /// Start a holder: creates `names` (comma separated) destroy-on-close and
    /// waits. Err(observed) if it did not get READY.
    pub fn hold(&self, who: Who, names: &str, via: &str) -> Result<Holder, String> {
        self.start_ready(who, &["hold-create", &self.ctl(), names, via]).map(|(h, _)| h)
    }

    /// Start a probe that prints `READY PID [REST]` and then holds what it
    /// made until its stdin closes. Err(observed) if it did not get ready.
    pub fn start_ready(&self, who: Who, args: &[&str]) -> Result<(Holder, String), String> {
        let mut child = self
            .command(who, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("PROBE-SPAWN-FAILED {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_else(|_| "TIMEOUT".into());
        let mut holder = Holder { pid: child.id(), child, stdin };
        match line.trim().strip_prefix("READY ") {
            Some(rest) => {
                let (pid, more) = rest.split_once(' ').unwrap_or((rest, ""));
                if who.place == Place::Host {
                    holder.pid = pid.parse().unwrap_or(holder.pid);
                }
                Ok((holder, more.to_string()))
            }
            None => {
                let obs = if line.trim().is_empty() { "NO-OUTPUT".into() } else { observed(line.trim()) };
                holder.release();
                Err(obs)
            }
        }
    }

    /// Start a bhyve-compat tool (`bhyve`, `bhyvectl`, `bhyveload` from
    /// `bhyve_dir`) as `who`, with `VMM_DEV_DIR` at the mount: the probe
    /// switches user and place, then execs the tool. stdin is a pipe
    /// ([`Tool::send`]); stdout and stderr are collected.
    pub fn tool(&self, who: Who, tool: &str, args: &[&str]) -> Result<Tool, String> {
        let prog = self.bhyve_dir.join(tool);
        let prog = prog.to_string_lossy();
        let mut probe_args = vec!["exec", prog.as_ref()];
        probe_args.extend_from_slice(args);
        let mut child = self
            .command(who, &probe_args)
            .env("VMM_DEV_DIR", &self.mount)
            .current_dir(&self.base)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("SPAWN-FAILED {e}"))?;
        let stdin = child.stdin.take();
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let pipes: [(Box<dyn Read + Send>, _); 2] = [
            (Box::new(child.stdout.take().expect("piped")), out.clone()),
            (Box::new(child.stderr.take().expect("piped")), err.clone()),
        ];
        // The runner waits for end-of-file only so long ([`Tool::drain`]):
        // a process the tool forked (or the daemon) may keep copies of
        // these pipes.
        for (i, (mut pipe, buf)) in pipes.into_iter().enumerate() {
            let closed = closed.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    buf.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&b[..n]);
                }
                closed[i].store(true, Ordering::Release);
            });
        }
        Ok(Tool { child, stdin, out, err, closed, status: None })
    }

    /// Run a tool to its end (at most `limit`); see [`Env::tool`].
    pub fn run_tool(&self, who: Who, tool: &str, args: &[&str], limit: Duration) -> ToolEnd {
        match self.tool(who, tool, args) {
            Ok(mut t) => {
                let status = t.wait(limit);
                ToolEnd { status, stdout: t.stdout(), stderr: t.stderr() }
            }
            Err(e) => ToolEnd { status: e, stdout: String::new(), stderr: String::new() },
        }
    }

    /// A new long-lived PID namespace.
    pub fn jail(&self) -> Result<Jail, String> {
        let mut unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "sleep", "100000"])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let end = Instant::now() + Duration::from_secs(5);
        let host = pidns("self");
        loop {
            if let Some(pid) = children_of(unshare.id()).first().copied() {
                let ns = pidns(&pid.to_string());
                if ns.is_some() && ns != host {
                    return Ok(Jail { unshare, pid });
                }
            }
            if Instant::now() >= end || matches!(unshare.try_wait(), Ok(Some(_))) {
                let _ = unshare.kill();
                let _ = unshare.wait();
                return Err("unshare --pid --fork sleep: no child in a new PID namespace".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `vmmfs jail VERB --pid PID --state-dir DIR` as `who` (root by default):
    /// "OK" or a description of the failure.
    pub fn jail_cmd(&self, verb: &str, pid: u32, as_user: Option<&TestUser>) -> String {
        let mut cmd = Command::new(&self.vmmfs);
        match verb {
            "allow-ppt" => cmd.args(["jail", "allow", "--ppt"]),
            v => cmd.args(["jail", v]),
        };
        cmd.args(["--pid", &pid.to_string(), "--state-dir"]).arg(&self.state_dir);
        if let Some(u) = as_user {
            use std::os::unix::process::CommandExt;
            cmd.uid(u.uid).gid(u.gid);
        }
        match cmd.stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => "OK".into(),
            Ok(o) => {
                format!("FAILED({}) {}", o.status, String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or(""))
            }
            Err(e) => format!("SPAWN-FAILED {e}"),
        }
    }

    /// What `vmmfs jail list` prints (or why it failed).
    pub fn jail_list(&self) -> String {
        match Command::new(&self.vmmfs).args(["jail", "list", "--state-dir"]).arg(&self.state_dir).output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("SPAWN-FAILED {e}"),
        }
    }

    /// Whether `path` disappears within `limit` (seen by root on the host).
    pub fn gone_within(&self, path: &str, limit: Duration) -> String {
        let path = path.to_string();
        let wait = move || {
            let end = Instant::now() + limit;
            loop {
                if std::fs::symlink_metadata(&path).is_err() {
                    return "gone".to_string();
                }
                if Instant::now() >= end {
                    return format!("still present after {}ms", limit.as_millis());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        timed(limit + FS_TIMEOUT, wait).unwrap_or_else(|| "TIMEOUT(stat)".into())
    }

    /// stat as root on the host.
    pub fn stat(&self, path: &str) -> String {
        let path = PathBuf::from(path);
        timed(FS_TIMEOUT, move || observed(&lines::stat_line(&path))).unwrap_or_else(|| "TIMEOUT(stat)".into())
    }

    /// Sorted listing as root on the host (`OK a,b` or an errno name).
    pub fn readdir(&self, path: &str) -> String {
        let path = PathBuf::from(path);
        timed(FS_TIMEOUT, move || observed(&lines::readdir_line(&path))).unwrap_or_else(|| "TIMEOUT(readdir)".into())
    }

    /// Log text written since `from` bytes.
    pub fn log_since(&self, from: u64) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let rest = usize::try_from(from).ok().and_then(|from| text.get(from..));
        String::from_utf8_lossy(rest.unwrap_or(&[])).into_owned()
    }

    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop();
        if self.keep_log {
            let keep = PathBuf::from(format!("{}.log", self.base.display()));
            if std::fs::copy(&self.log, &keep).is_ok() {
                eprintln!("conformance: daemon log kept at {}", keep.display());
            }
        }
        if !is_mounted(&self.mount) {
            let _ = std::fs::remove_dir_all(&self.base);
        } else {
            eprintln!("conformance: {} is still mounted; leaving {}", self.mount.display(), self.base.display());
        }
    }
}

/// Unmount a FUSE mount left behind: fusermount3 -u, then lazily.
pub fn unmount(mount: &Path) {
    for args in [&["-u"][..], &["-u", "-z"][..]] {
        if !is_mounted(mount) {
            return;
        }
        let _ = Command::new("fusermount3").args(args).arg(mount).stderr(Stdio::null()).status();
    }
    if is_mounted(mount) {
        let _ = Command::new("umount").arg("-l").arg(mount).status();
    }
}

/// A probe's result line as the table shows it: `ERR EPERM` -> `EPERM`.
pub fn observed(line: &str) -> String {
    match line.strip_prefix("ERR ") {
        Some(rest) => rest.to_string(),
        None => line.to_string(),
    }
}

/// Print to stderr right away (progress while the suite runs).
pub fn progress(msg: &str) {
    let mut e = std::io::stderr();
    let _ = writeln!(e, "{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_strips_err() {
        assert_eq!(observed("ERR EPERM"), "EPERM");
        assert_eq!(observed("OK uid=0"), "OK uid=0");
        assert_eq!(observed("write=ENXIO read=ENXIO"), "write=ENXIO read=ENXIO");
    }

    #[test]
    fn own_parent_is_found() {
        let me = std::process::id();
        let parent = ppid_of(me).unwrap();
        assert!(children_of(parent).contains(&me));
    }

    #[test]
    fn mount_options_of_root() {
        let (fstype, opts) = mount_options(Path::new("/")).unwrap();
        assert!(!fstype.is_empty());
        assert!(opts.iter().any(|o| o == "rw" || o == "ro"), "{opts:?}");
    }

    #[test]
    fn root_is_mounted() {
        assert!(is_mounted(Path::new("/")));
        assert!(!is_mounted(Path::new("/definitely/not/a/mount")));
    }
}
