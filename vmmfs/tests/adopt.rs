//! VMs outlive the daemon (vmmfs(8) RESTART), on a real mount with real
//! workers and a real guest: the daemon is killed with SIGKILL while a
//! guest prints to its console; the guest keeps printing; a restarted
//! daemon on the same state directory and mount point brings the VM's node
//! and its vmm.io segment nodes back with their owner, group and mode, destroys the transient VM whose
//! creator's descriptor died with the old mount, and destroys the adopted
//! VM on request. SIGTERM still destroys every VM. Needs root, /dev/fuse,
//! /dev/kvm and gcc/binutils (the test guests); skipped loudly without them
//! outside CI.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A member of the vmm group (scripts/setup makes it), and the group.
const MEMBER: &str = "vmmtest1";

fn usable() -> bool {
    use test_support::Need;
    test_support::require(
        "the adoption test",
        &[
            Need::Root,
            Need::Device("/dev/fuse"),
            Need::Device("/dev/kvm"),
            Need::VmmMember(MEMBER),
        ],
    )
}

fn ids(user: &str) -> Option<(u32, u32)> {
    let p = fs::read_to_string("/etc/passwd").ok()?;
    p.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user)).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn group_id(name: &str) -> Option<u32> {
    let g = fs::read_to_string("/etc/group").ok()?;
    g.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f[2].parse().ok())?
    })
}

fn start(dir: &Path, state: &Path) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_vmmfs"))
        .args(["--group", "vmm", "--worker-spares", "1", "--state-dir"])
        .arg(state)
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        // Workers inherit it and outlive the daemon: not the test's pipe.
        .stderr(
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(state.with_file_name("daemon.log"))
                .unwrap(),
        )
        .spawn()
        .expect("start vmmfs");
    wait_for("vmmfs mounted", Duration::from_secs(15), || {
        dir.join("vmmctl").exists()
    });
    child
}

fn command(f: &File, line: &str) {
    let n = (&*f)
        .write(line.as_bytes())
        .unwrap_or_else(|e| panic!("'{line}': {e}"));
    assert_eq!(n, line.len(), "{line}");
}

use test_support::{pipe, wait_for};

/// Start VM `name` (root's, persistent) on multi.rom, printing 'y' forever
/// to `console`. Returns what must stay open: the input pipe's write end
/// and the `vmm/NAME` handle that ran the guest (as bhyve keeps it: when it
/// closes, the guest stops), with its hand-over socket.
fn run_printer(
    mnt: &Path,
    ctl: &File,
    name: &str,
    rom: &Path,
    console: &Path,
) -> (OwnedFd, File, OwnedFd) {
    use nix::sys::socket::{
        connect, recv, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag,
        SockType, UnixAddr,
    };
    command(ctl, &format!("create {name}"));
    let vm = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("vmm").join(name))
        .unwrap();
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(
        sock.as_raw_fd(),
        &UnixAddr::new(&mnt.join("vmm.sock")).unwrap(),
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    let greeting = String::from_utf8_lossy(&buf[..n]).to_string();
    let nonce = greeting.split_once("nonce=").unwrap().1.trim().to_string();
    command(&vm, &format!("attach {nonce}"));
    let rom = File::open(rom).unwrap();
    let (in_r, in_w) = pipe();
    let out = OpenOptions::new()
        .append(true)
        .create(true)
        .open(console)
        .unwrap();
    let fds = [rom.as_raw_fd(), in_r.as_raw_fd(), out.as_raw_fd()];
    let text = format!("fds {} {} {}", fds[0], fds[1], fds[2]);
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(text.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert_eq!(&buf[..n], b"ok");
    command(&vm, &format!("bootrom {}", fds[0]));
    command(&vm, &format!("com1 {} {}", fds[1], fds[2]));
    command(&vm, "run");
    wait_for("the guest's prompt", Duration::from_secs(10), || {
        fs::read_to_string(console).is_ok_and(|s| s.contains("ready"))
    });
    // 'y': print 'y' forever (asked again until it does).
    wait_for("the guest's output", Duration::from_secs(10), || {
        // SAFETY: a write of one byte from a live buffer.
        unsafe { libc::write(in_w.as_raw_fd(), b"y".as_ptr().cast(), 1) };
        std::thread::sleep(Duration::from_millis(100));
        fs::metadata(console).map_or(0, |m| m.len()) > 100
    });
    (in_w, vm, sock)
}

/// SIGTERM to a daemon left behind by a failed assertion.
struct Reap(u32);

impl Drop for Reap {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: signalling a daemon this test started.
            unsafe { libc::kill(test_support::pid_t(self.0), libc::SIGTERM) };
        }
    }
}

fn console_grows(console: &Path) -> bool {
    let before = fs::metadata(console).map_or(0, |m| m.len());
    std::thread::sleep(Duration::from_millis(300));
    fs::metadata(console).map_or(0, |m| m.len()) > before
}

/// The worker pid a record names for VM `name`.
fn worker_of(state: &Path, name: &str) -> Option<u32> {
    for ent in fs::read_dir(state.join("vms")).ok()?.flatten() {
        let text = fs::read_to_string(ent.path()).unwrap_or_default();
        if text.lines().any(|l| l == format!("name={name}")) {
            let w = text.lines().find_map(|l| l.strip_prefix("worker="))?;
            return w.split(':').next()?.parse().ok();
        }
    }
    None
}

/// Alive: neither gone nor a zombie (orphaned workers are reaped by init).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit_once(") ").map(|(_, r)| r.chars().next());
        !matches!(state, Some(Some('Z' | 'X')))
    })
}

fn records(state: &Path) -> Vec<String> {
    fs::read_dir(state.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".vm") || n.ends_with(".sock"))
                .collect()
        })
        .unwrap_or_default()
}

/// A fresh directory for test `tag`: (base, mount point, state directory).
fn scratch(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("vmmfs-it-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    let (mnt, state) = (base.join("mnt"), base.join("state"));
    fs::create_dir_all(&mnt).unwrap();
    (base, mnt, state)
}

fn build_guests(out: &Path) -> PathBuf {
    test_support::build_guests(out, &["multi.rom"]).join("multi.rom")
}

#[test]
fn vms_outlive_the_daemon_and_are_adopted() {
    if !usable() {
        return;
    }
    let (base, mnt, state) = scratch("adopt");
    let rom = build_guests(&base.join("guests"));
    let console = base.join("console");
    let (member_uid, member_gid) = ids(MEMBER).unwrap();
    let vmm = group_id("vmm").unwrap();

    let mut daemon = start(&mnt, &state);
    let _reap = Reap(daemon.id());
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("vmmctl"))
        .unwrap();
    let input = run_printer(&mnt, &ctl, "adopt-p", &rom, &console);
    assert!(console_grows(&console), "the guest prints");
    let node = mnt.join("vmm/adopt-p");
    fs::set_permissions(&node, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&node, Some(member_uid), Some(vmm)).unwrap();
    // A memory segment's node, shared with the vmm group read-only.
    let seg = fs::read_dir(mnt.join("vmm.io"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("adopt-p.")
        })
        .expect("a vmm.io node of adopt-p");
    fs::set_permissions(&seg, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&seg, None, Some(vmm)).unwrap();
    let persistent = worker_of(&state, "adopt-p").expect("a record of adopt-p");
    assert!(alive(persistent));
    // A second persistent VM, whose worker will crash after adoption.
    command(&ctl, "create adopt-s");
    let crashing = worker_of(&state, "adopt-s").expect("a record of adopt-s");

    // A member's monitor-mode VM, its vmmctl descriptor held by a shell.
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!(
        "exec 3<>{}/vmmctl && printf 'create adopt-t destroy-on-close' >&3 && exec sleep 600",
        mnt.display()
    ));
    let groups = [member_gid, vmm];
    // SAFETY: only async-signal-safe calls, in the forked child.
    unsafe {
        sh.pre_exec(move || {
            if libc::setgroups(2, groups.as_ptr()) != 0
                || libc::setresgid(member_gid, member_gid, member_gid) != 0
                || libc::setresuid(member_uid, member_uid, member_uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut holder = sh.spawn().unwrap();
    wait_for("the transient VM", Duration::from_secs(10), || {
        worker_of(&state, "adopt-t").is_some()
    });
    let transient = worker_of(&state, "adopt-t").unwrap();
    assert!(
        fs::read_to_string(state.join("vms").join(format!("{transient}.vm")))
            .unwrap()
            .contains("transient=1")
    );

    // The daemon dies without a word.
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    drop(ctl);
    assert!(
        console_grows(&console),
        "the guest keeps printing without a daemon"
    );
    assert!(
        alive(persistent) && alive(transient),
        "workers outlive the daemon"
    );

    // A new daemon on the same state directory and (dead) mount point.
    let mut daemon = start(&mnt, &state);
    let _reap2 = Reap(daemon.id());
    let st = fs::metadata(&node).expect("vmm/adopt-p is back");
    assert_eq!(
        (st.uid(), st.gid(), st.mode() & 0o7777),
        (member_uid, vmm, 0o640),
        "owner, group and mode come back"
    );
    let names: Vec<String> = fs::read_dir(mnt.join("vmm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["adopt-p", "adopt-s"],
        "the transient VM is destroyed at adoption"
    );
    wait_for(
        "the transient VM's worker to end",
        Duration::from_secs(5),
        || !alive(transient),
    );
    let mut status = String::new();
    File::open(&node)
        .unwrap()
        .read_to_string(&mut status)
        .unwrap();
    assert!(status.contains("state=running"), "{status}");
    assert!(console_grows(&console), "the adopted guest still prints");
    // The adopted VM's memory segments are served again, their nodes as
    // they were left.
    let st = fs::metadata(&seg).expect("the vmm.io node is back");
    assert_eq!(
        (st.uid(), st.gid(), st.mode() & 0o7777),
        (0, vmm, 0o640),
        "a segment node's owner, group and mode come back"
    );

    // An adopted worker is not the daemon's child, yet its crash is
    // reported with its cause, as for a worker the daemon started: the
    // status says how it ended for the grace time, then the VM goes.
    let crashed = mnt.join("vmm/adopt-s");
    // SIGKILL (as the OOM killer sends): a worker is the init of its PID
    // namespace, and such a process gets no other signal from outside
    // unless it handles it.
    // SAFETY: signalling the recorded worker (root may).
    unsafe { libc::kill(test_support::pid_t(crashing), libc::SIGKILL) };
    let mut last = String::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let mut s = String::new();
        match File::open(&crashed).and_then(|mut f| f.read_to_string(&mut s)) {
            Ok(_) => last = s,
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        last.contains("exit=error") && last.contains("killed by SIGKILL"),
        "the adopted worker's end and its cause: {last}"
    );
    wait_for("the crashed VM to go", Duration::from_secs(5), || {
        !crashed.exists()
    });

    // Destroyed on request: node, worker, record and socket go.
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("vmmctl"))
        .unwrap();
    command(&ctl, "destroy adopt-p");
    assert!(!node.exists());
    wait_for("the adopted worker to end", Duration::from_secs(5), || {
        !alive(persistent)
    });
    wait_for("the records to go", Duration::from_secs(5), || {
        records(&state).is_empty()
    });
    assert!(!console_grows(&console), "the guest is gone");
    drop(input);

    // SIGTERM keeps its meaning: every VM destroyed, the mount detached.
    let _input = run_printer(&mnt, &ctl, "adopt-q", &rom, &console);
    let q = worker_of(&state, "adopt-q").unwrap();
    drop(ctl);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(test_support::pid_t(daemon.id()), libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    wait_for("SIGTERM to end the worker", Duration::from_secs(5), || {
        !alive(q)
    });
    assert!(records(&state).is_empty(), "{:?}", records(&state));
    assert!(!mnt.join("vmmctl").exists(), "unmounted");

    let _ = holder.kill();
    let _ = holder.wait();
    let _ = fs::remove_dir_all(&base);
}

/// A PID namespace (a jail, vmm(4) JAILS) kept alive by `unshare`; killed
/// with it on drop.
struct Jail {
    unshare: Child,
    /// The namespace's init, as the host sees it.
    init: u32,
}

impl Jail {
    fn new() -> Jail {
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "sleep", "100000"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let pid = unshare.id();
        let mut init = 0;
        wait_for("the jail's init", Duration::from_secs(5), || {
            init = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            init != 0
        });
        Jail { unshare, init }
    }

    /// `sh -c SCRIPT` as root inside the jail, to be run.
    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "--target",
            &self.init.to_string(),
            "--pid",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::null());
        c
    }

    /// `sh -c SCRIPT` as root inside the jail; its standard output.
    fn sh(&self, script: &str) -> String {
        let out = self.command(script).output().expect("nsenter");
        assert!(
            out.status.success(),
            "in the jail: {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// A jail's VM across a daemon restart. Root in a jail is unprivileged
/// (vmm(4) JAILS): its VMs are destroy-on-close, so the record names the
/// jail (by its init's pid and start time) and says transient, and the
/// restarted daemon destroys the VM: neither the jail nor the host sees it,
/// its worker ends, its record goes.
#[test]
fn a_jails_vm_is_destroyed_at_adoption() {
    if !usable() {
        return;
    }
    let (base, mnt, state) = scratch("adopt-jail");
    let mut daemon = start(&mnt, &state);
    let _reap = Reap(daemon.id());
    let jail = Jail::new();
    let allowed = Command::new(env!("CARGO_BIN_EXE_vmmfs"))
        .args([
            "jail",
            "allow",
            "--pid",
            &jail.init.to_string(),
            "--state-dir",
        ])
        .arg(&state)
        .status()
        .unwrap();
    assert!(allowed.success(), "vmmfs jail allow");
    let m = mnt.display();
    // A persistent VM is refused in a jail; a monitor-mode one is made,
    // its vmmctl descriptor held by a shell in the jail.
    let refused = jail
        .command(&format!("printf 'create adopt-jp' > {m}/vmmctl"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!refused.success(), "a jail's persistent VM is refused");
    let mut holder = jail
        .command(&format!(
            "exec 3<>{m}/vmmctl && printf 'create adopt-j destroy-on-close' >&3 && exec sleep 600"
        ))
        .spawn()
        .unwrap();
    wait_for("the jail's VM", Duration::from_secs(10), || {
        worker_of(&state, "adopt-j").is_some()
    });
    assert_eq!(jail.sh(&format!("ls {m}/vmm")).trim(), "adopt-j");
    let worker = worker_of(&state, "adopt-j").unwrap();
    let record = fs::read_to_string(state.join("vms").join(format!("{worker}.vm"))).unwrap();
    assert!(
        record.contains(&format!(":{}:", jail.init)) && record.contains("transient=1"),
        "the record names the jail's init and says transient: {record}"
    );

    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(alive(worker), "the worker outlives the daemon");
    let mut daemon = start(&mnt, &state);
    let _reap2 = Reap(daemon.id());
    wait_for("the jail's worker to end", Duration::from_secs(5), || {
        !alive(worker)
    });
    assert_eq!(
        jail.sh(&format!("ls {m}/vmm")).trim(),
        "",
        "gone in the jail"
    );
    assert!(!mnt.join("vmm/adopt-j").exists(), "gone on the host");
    assert!(records(&state).is_empty(), "{:?}", records(&state));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(test_support::pid_t(daemon.id()), libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    let _ = holder.kill();
    let _ = holder.wait();
    drop(jail);
    let _ = fs::remove_dir_all(&base);
}
